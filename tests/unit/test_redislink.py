"""The lean Redis connection's protocol, without a server: commands as written, replies as read (whole, split at
every byte, several in one read), waiters resolved in order, and the URIs it takes or leaves to limits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.admission.redislink import RedisLink, RedisReplyError, _Incomplete, _Protocol, encode, parse

REPLIES: list[tuple[bytes, Any]] = [
    (b"+OK\r\n", "OK"),
    (b":42\r\n", 42),
    (b":-3\r\n", -3),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),  # a bulk string may hold CRLF: its size decides, not the first CRLF
    (b"*0\r\n", []),
    (b"*-1\r\n", None),
    (b"*3\r\n:1\r\n$17\r\n1733443200.123456\r\n$-1\r\n", [1, b"1733443200.123456", None]),
    (b"*2\r\n*1\r\n:7\r\n+x\r\n", [[7], "x"]),
]


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode(("EVALSHA", "ab", 2, "k1", "k2", 1733443200.123456, -1, b"\x00raw")) == (
        b"*8\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$2\r\nk1\r\n$2\r\nk2\r\n$17\r\n1733443200.123456\r\n"
        b"$2\r\n-1\r\n$4\r\n\x00raw\r\n"
    )
    assert encode(("SET", "é")) == b"*2\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n"  # the size is in bytes
    with pytest.raises(TypeError):
        encode(("SET", True))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode(("SET", None))  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "value"), REPLIES)
def test_each_reply_type_is_read_whole_and_never_from_a_prefix(raw: bytes, value: Any) -> None:
    assert parse(raw, 0) == (value, len(raw))
    assert parse(b"junk" + raw + b":1\r\n", 4) == (value, 4 + len(raw))  # from an offset, stopping at its end
    for cut in range(1, len(raw)):
        with pytest.raises(_Incomplete):
            parse(raw[:cut], 0)


def test_error_replies_are_returned_as_errors_and_garbage_is_refused() -> None:
    error, end = parse(b"-NOSCRIPT No matching script.\r\n", 0)
    assert isinstance(error, RedisReplyError) and str(error) == "NOSCRIPT No matching script." and end == 31
    with pytest.raises(ValueError):
        parse(b"?what\r\n", 0)
    with pytest.raises(ValueError):
        parse(b"$2\r\nabc\r\n", 0)  # longer than announced
    with pytest.raises(ValueError):
        parse(b":notanumber\r\n", 0)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


def connected() -> tuple[_Protocol, FakeTransport]:
    protocol, transport = _Protocol(), FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


def test_replies_resolve_the_waiters_in_order_however_the_bytes_arrive() -> None:
    stream = b"".join(raw for raw, _ in REPLIES)

    async def go(chunk: int) -> list[Any]:
        protocol, transport = connected()
        waiters = [protocol.send(encode(("PING",))) for _ in REPLIES]
        assert len(transport.written) == len(REPLIES)
        for start in range(0, len(stream), chunk):
            protocol.data_received(stream[start : start + chunk])
        assert not protocol.buffer and not protocol.waiters
        return [w.result() for w in waiters]

    for chunk in (1, 2, 3, 7, len(stream)):
        assert asyncio.run(go(chunk)) == [value for _, value in REPLIES]


def test_a_waiter_given_up_loses_its_reply_and_the_rest_stay_in_step() -> None:
    async def go() -> tuple[Any, Any]:
        protocol, _ = connected()
        gone = protocol.send(encode(("GET", "a")))
        kept = protocol.send(encode(("GET", "b")))
        gone.cancel()  # its caller was cancelled (a client that went away) or timed out
        protocol.data_received(b"$1\r\na\r\n$1\r\nb\r\n")
        return gone.cancelled(), kept.result()

    assert asyncio.run(go()) == (True, b"b")


def test_an_error_reply_fails_only_its_own_command() -> None:
    async def go() -> tuple[BaseException | None, Any]:
        protocol, _ = connected()
        failed = protocol.send(encode(("EVALSHA", "x", 0)))
        fine = protocol.send(encode(("PING",)))
        protocol.data_received(b"-NOSCRIPT No matching script.\r\n+PONG\r\n")
        return failed.exception(), fine.result()

    error, pong = asyncio.run(go())
    assert isinstance(error, RedisReplyError) and pong == "PONG"


@pytest.mark.parametrize("event", ["lost", "garbage"])
def test_a_lost_connection_or_an_unreadable_reply_fails_every_command_in_flight(event: str) -> None:
    async def go() -> tuple[Any, list[BaseException | None], bool]:
        protocol, transport = connected()
        waiters = [protocol.send(encode(("PING",))) for _ in range(3)]
        protocol.data_received(b"+PONG\r\n")
        if event == "lost":
            protocol.connection_lost(ConnectionResetError("reset by peer"))
        else:
            protocol.data_received(b"!oops\r\n")
        with pytest.raises(ConnectionError):
            protocol.send(encode(("PING",)))  # nothing more is written on it
        return waiters[0].result(), [w.exception() for w in waiters[1:]], transport.aborted

    first, errors, aborted = asyncio.run(go())
    assert first == "PONG" and aborted
    assert len(errors) == 2 and all(isinstance(e, ConnectionError) for e in errors)


def test_a_reply_nobody_asked_for_drops_the_connection() -> None:
    async def go() -> tuple[bool, bool]:
        protocol, transport = connected()
        protocol.data_received(b"+PONG\r\n")
        return transport.aborted, protocol.lost is not None

    assert asyncio.run(go()) == (True, True)


@pytest.mark.parametrize(
    ("uri", "address", "db", "username", "password", "tls"),
    [
        ("async+redis://127.0.0.1:6379/0", ("127.0.0.1", 6379), 0, None, None, False),
        ("async+redis://cache", ("cache", 6379), 0, None, None, False),
        ("async+redis://cache:7000/5", ("cache", 7000), 5, None, None, False),
        ("async+redis://:s%40cret@cache:6379", ("cache", 6379), 0, None, "s@cret", False),
        ("async+redis://app:pw@cache/2", ("cache", 6379), 2, "app", "pw", False),
        ("async+redis://cache?db=3", ("cache", 6379), 3, None, None, False),
        ("async+rediss://cache.example:6380/1", ("cache.example", 6380), 1, None, None, True),
        ("async+redis+unix:///run/redis/redis.sock?db=4", "/run/redis/redis.sock", 4, None, None, False),
        ("async+valkey://cache", ("cache", 6379), 0, None, None, False),
        ("redis://cache/0", ("cache", 6379), 0, None, None, False),
    ],
)
def test_plain_uris_get_a_link(
    uri: str, address: Any, db: int, username: str | None, password: str | None, tls: bool
) -> None:
    link = RedisLink.from_uri(uri)
    assert link is not None
    assert (link.address, link.db, link._username, link._password, link._tls) == (address, db, username, password, tls)


@pytest.mark.parametrize(
    "uri",
    [
        "async+redis://cache?ssl_cert_reqs=none",  # options only limits' client knows
        "async+redis://cache/1?db=2",  # two database numbers
        "async+redis://cache/notanumber",
        "async+redis+sentinel://sentinel:26379/mymaster",
        "async+redis+cluster://a:7000,b:7001",
        "async+memcached://cache:11211",
        "async+memory://",
    ],
)
def test_other_uris_stay_with_limits_client(uri: str) -> None:
    assert RedisLink.from_uri(uri) is None


def test_a_redis_that_stops_answering_times_out_and_the_link_starts_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limiter gives up after its storage timeout (StorageUnavailable) and drops the link, so the next call
    does not queue behind replies that will never come; the connection is opened again once the pause is over."""
    from server.admission import ratelimit
    from server.admission.ratelimit import RateLimiter, StorageUnavailable

    monkeypatch.setattr(ratelimit, "STORAGE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(ratelimit, "RETRY_AFTER_FAILURE_S", 0.0)

    async def go() -> int:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # reads nothing, answers nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        limiter = RateLimiter(f"async+redis://127.0.0.1:{port}/0", key_prefix="t")
        assert limiter.link is not None
        try:
            for _ in range(2):
                with pytest.raises(StorageUnavailable):
                    await limiter.release_slot("k")
                assert limiter.link._protocol is None  # dropped: the next call connects again
            return len(accepted)
        finally:
            limiter.close()
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(go()) == 2  # one connection per try


def test_a_script_sent_without_waiting_is_written_at_once_and_sent_whole_after_noscript() -> None:
    """``Script.send`` writes before returning; a NOSCRIPT answer sends the script whole (still not waited for);
    another failure goes to the caller's handler; with no open connection nothing is sent."""

    async def go() -> None:
        link = RedisLink(("127.0.0.1", 1))
        script = link.script("return 1")
        errors: list[BaseException] = []
        assert script.send(["k"], [1], errors.append) is False  # never connected: the caller waits instead
        protocol, transport = connected()
        link._protocol, link._loop = protocol, asyncio.get_running_loop()
        assert script.send(["k"], [1], errors.append) is True
        assert transport.written == [encode(("EVALSHA", script.sha, 1, "k", 1))]
        protocol.data_received(b"-NOSCRIPT No matching script.\r\n")
        await asyncio.sleep(0)  # a future's callbacks run on the loop's next turn
        assert transport.written[-1] == encode(("EVAL", "return 1", 1, "k", 1)) and errors == []
        protocol.data_received(b":1\r\n")
        await asyncio.sleep(0)
        assert errors == [] and not protocol.waiters
        assert script.send(["k"], [1], errors.append)
        protocol.data_received(b"-ERR something else\r\n")
        await asyncio.sleep(0)
        assert len(errors) == 1 and isinstance(errors[0], RedisReplyError)
        assert script.send(["k"], [1], errors.append)
        protocol.connection_lost(None)
        await asyncio.sleep(0)
        assert len(errors) == 2 and isinstance(errors[1], ConnectionError)
        assert script.send(["k"], [1], errors.append) is False  # the connection is gone

    asyncio.run(go())


def test_closing_at_shutdown_cancels_the_waiters_without_reporting_failures() -> None:
    """A release sent without waiting has reached Redis when the link closes: its unread answer is no failure."""

    async def go() -> tuple[list[BaseException], bool, bool, bool]:
        link = RedisLink(("127.0.0.1", 1))
        protocol, transport = connected()
        link._protocol, link._loop = protocol, asyncio.get_running_loop()
        errors: list[BaseException] = []
        assert link.script("return 1").send(["k"], [1], errors.append)
        link.close()
        await asyncio.sleep(0)
        return errors, transport.closed, transport.aborted, link.connected() is None

    assert asyncio.run(go()) == ([], True, False, True)
