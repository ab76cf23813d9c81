"""One lean, pipelined connection to Redis for the scripts every metered request runs.

Admission runs a Lua script per metered request and another gives its concurrency slot back when it ends
(:mod:`server.admission.scripts`). Through ``limits``' client (coredis) each of those calls cost ~0.17-0.22 ms of
this process's CPU and several event-loop turns (measured here against a local Redis; through this module ~0.08 ms,
a bare ``EVALSHA`` on a socket ~0.06 ms). This module speaks just enough of the Redis protocol (RESP2) for those
calls, on one connection that carries every request's commands back to back: Redis answers in order, so each reply
resolves the oldest waiter.

It is used only for a single Redis (or Valkey) server named by a plain URI (``redis://``, ``rediss://``,
``redis+unix://``, with ``db`` as the only query option); any other form (other query options, Sentinel, Cluster)
leaves every call on ``limits``' own client (:meth:`RedisLink.from_uri` answers ``None``). The keys and data
structures are ``limits``' own either way.

Failure handling: a lost connection fails every command in flight (``ConnectionError``, an ``OSError``) and the
next call connects again; an error reply raises :class:`RedisReplyError`. A caller that stops waiting (a cancelled
request) leaves its place in the queue, so its reply, when it comes, is dropped and the replies stay in step; a
caller that gives up on a Redis that stopped answering calls :meth:`RedisLink.abort`. :meth:`Script.send` writes a
call without waiting for its answer (the slot's release: see ``RateLimiter.release_slot``).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_SCHEMES = {
    "redis": "tcp",
    "rediss": "tls",
    "redis+unix": "unix",
    "valkey": "tcp",
    "valkeys": "tls",
    "valkey+unix": "unix",
}
_CRLF = b"\r\n"


class RedisReplyError(Exception):
    """Redis answered a command with an error (``-ERR ...``, ``-NOSCRIPT ...``, ``-READONLY ...``)."""


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def encode(args: Sequence[str | bytes | int | float]) -> bytes:
    """One command as a RESP array of bulk strings (floats in full precision, as ``repr`` writes them)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            raise TypeError("a bool is not a Redis argument")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"not a Redis argument: {type(arg).__name__}")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """The reply that starts at ``pos`` and the offset after it.

    Simple strings as ``str``, errors as :class:`RedisReplyError` instances (returned, not raised), integers as
    ``int``, bulk strings as ``bytes`` (``None`` for a null one), arrays as lists.

    Raises:
        _Incomplete: the reply does not end within ``buf``.
        ValueError: the bytes are not RESP2.
    """
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == 0x24:  # $ bulk string
        size = int(line)
        if size < 0:
            return None, after
        stop = after + size
        if len(buf) < stop + 2:
            raise _Incomplete
        if buf[stop : stop + 2] != _CRLF:
            raise ValueError("a bulk string longer than its announced size")
        return bytes(buf[after:stop]), stop + 2
    if kind == 0x3A:  # : integer
        return int(line), after
    if kind == 0x2A:  # * array
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse(buf, after)
            items.append(item)
        return items, after
    if kind == 0x2B:  # + simple string
        return line.decode(), after
    if kind == 0x2D:  # - error
        return RedisReplyError(line.decode(errors="replace")), after
    raise ValueError(f"not a RESP2 reply type: {bytes([kind])!r}")


class _Protocol(asyncio.Protocol):
    """The connection: commands written in order, replies matched to the oldest waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.buffer = bytearray()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        waiters = self.waiters
        try:
            while pos < len(buf):
                if not waiters:
                    raise ValueError("a reply no command asked for")
                try:
                    value, pos = parse(buf, pos)
                except _Incomplete:
                    break
                waiter = waiters.popleft()
                if waiter.done():  # its caller stopped waiting: the reply is dropped, the rest stay in step
                    continue
                if isinstance(value, RedisReplyError):
                    waiter.set_exception(value)
                else:
                    waiter.set_result(value)
        except ValueError as exc:
            self._fail(ConnectionError(f"Redis sent what this client cannot read: {exc}"))
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            ConnectionError(f"the connection to Redis was lost: {exc}" if exc else "Redis closed the connection")
        )

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close after writing what is buffered; commands still waiting for their answers are cancelled (not
        failed: a release sent without waiting reached Redis, only its answer is not read)."""
        self.lost = ConnectionError("the connection to Redis was closed")
        while self.waiters:
            self.waiters.popleft().cancel()
        if self.transport is not None:
            self.transport.close()

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection to Redis is closed")
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.transport.write(command)
        return waiter


class Script:
    """A Lua script run by its SHA-1 (``EVALSHA``), sent whole when the server does not have it yet."""

    def __init__(self, link: RedisLink, text: str) -> None:
        self.link = link
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def send(
        self, keys: Sequence[str], args: Sequence[str | int | float], on_error: Callable[[BaseException], None]
    ) -> bool:
        """Write the script's call now without waiting for its answer; ``False`` (nothing sent) when the link is not
        connected. A ``NOSCRIPT`` answer sends it again whole; any other failure goes to ``on_error``.

        Written at once on the one connection, it reaches Redis before anything this process sends afterwards."""
        protocol = self.link.connected()
        if protocol is None:
            return False
        tail = (len(keys), *keys, *args)

        def answered(reply: asyncio.Future[Any]) -> None:
            if reply.cancelled():
                return
            exc = reply.exception()
            if exc is None:
                return
            if isinstance(exc, RedisReplyError) and str(exc).startswith("NOSCRIPT"):
                again = self.link.connected()
                if again is not None:
                    again.send(encode(("EVAL", self.text, *tail))).add_done_callback(answered)
                    return
                exc = ConnectionError("the connection to Redis was lost before the script could be sent again")
            on_error(exc)

        protocol.send(encode(("EVALSHA", self.sha, *tail))).add_done_callback(answered)
        return True

    async def execute(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        """Run the script on ``keys`` and ``args`` and return its reply."""
        tail = (len(keys), *keys, *args)
        try:
            return await self.link.call("EVALSHA", self.sha, *tail)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.link.call("EVAL", self.text, *tail)  # loads it for the next EVALSHA too


class RedisLink:
    """One connection to one Redis server, opened on first use and again after it is lost.

    Args:
        address: ``(host, port)`` for TCP and TLS, a socket path for a Unix socket.
        db: The database number (``SELECT``ed on connecting).
        username, password: For ``AUTH``, as the URI gave them.
        tls: Connect with TLS, verifying the server as Python's default context does.
    """

    def __init__(
        self,
        address: tuple[str, int] | str,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
    ) -> None:
        self.address = address
        self.db = db
        self._username = username
        self._password = password
        self._tls = tls
        self._protocol: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the connection's (a new loop connects afresh)
        self._connecting = asyncio.Lock()

    @classmethod
    def from_uri(cls, uri: str) -> RedisLink | None:
        """The link for a ``limits`` Redis storage URI, or ``None`` when its form is one this module leaves to
        ``limits``' own client (see the module's docstring)."""
        parts = urlsplit(uri.removeprefix("async+"))
        mode = _SCHEMES.get(parts.scheme)
        if mode is None or parts.fragment:
            return None
        query = parse_qs(parts.query, keep_blank_values=True)
        if set(query) - {"db"} or len(query.get("db", ())) > 1:
            return None
        try:
            db = int(query["db"][0]) if "db" in query else 0
            if mode == "unix":
                if not parts.path:
                    return None
                address: tuple[str, int] | str = unquote(parts.path)
            else:
                path = parts.path.strip("/")
                if path:
                    if "db" in query:
                        return None  # two database numbers: leave it to limits to say which wins
                    db = int(path)
                address = (parts.hostname or "localhost", parts.port or 6379)
        except ValueError:
            return None
        return cls(
            address,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=mode == "tls",
        )

    async def call(self, *args: str | bytes | int | float) -> Any:
        """Send one command and return its reply.

        Raises:
            ConnectionError: not connected, or the connection was lost before the reply came.
            RedisReplyError: the reply is an error.
        """
        protocol = self.connected() or await self._connect()
        return await protocol.send(encode(args))

    def connected(self) -> _Protocol | None:
        """The connection, if it is open now and belongs to the running event loop (nothing is awaited)."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None or protocol.transport is None:
            return None
        if protocol.transport.is_closing() or self._loop is not asyncio.get_running_loop():
            return None
        return protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or another event loop than the connection's: start afresh there
            self.abort()
            self._loop, self._connecting = loop, asyncio.Lock()
        async with self._connecting:
            protocol = self.connected()
            if protocol is not None:
                return protocol
            if isinstance(self.address, str):
                _, protocol = await loop.create_unix_connection(_Protocol, self.address)
            else:
                host, port = self.address
                context = ssl.create_default_context() if self._tls else None
                _, protocol = await loop.create_connection(
                    _Protocol, host, port, ssl=context, server_hostname=host if context else None
                )
            try:
                hello: list[asyncio.Future[Any]] = []
                if self._password is not None:
                    auth = (self._username, self._password) if self._username else (self._password,)
                    hello.append(protocol.send(encode(("AUTH", *auth))))
                if self.db:
                    hello.append(protocol.send(encode(("SELECT", self.db))))
                for answer in hello:
                    await answer
            except BaseException:
                if protocol.transport is not None:
                    protocol.transport.abort()
                raise
            self._protocol = protocol
            return protocol

    def abort(self) -> None:
        """Drop the connection (commands in flight fail); the next call connects again."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol._fail(ConnectionError("the connection to Redis was dropped"))

    def close(self) -> None:
        """Close the connection once what was written is sent (at shutdown); a later call connects again."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.close()

    def script(self, text: str) -> Script:
        """A script to run on this link."""
        return Script(self, text)
