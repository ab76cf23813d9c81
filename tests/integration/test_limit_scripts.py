"""The combined limit steps (one Redis script each) keep limits' own semantics: the same answers as the separate
calls on the memory storage, and windows that limits' own readers agree with (``LLM_SERVER_TEST_REDIS_URL``)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from server.admission.gateway import Gateway
from server.admission.ratelimit import ADMITTED, NO_REQUESTS, NO_SLOT, NO_TOKENS, RateLimiter
from server.admission.redislink import RedisLink, RedisReplyError
from server.errors import OpenAIError
from server.metrics import Metrics
from tests.integration.test_scaleout import _cleanup_redis


def limiter_for(storage: str, request: pytest.FixtureRequest) -> tuple[RateLimiter, str | None, str]:
    if storage == "memory":
        return RateLimiter("async+memory://"), None, ""
    url: str = request.getfixturevalue("redis_url")
    prefix = f"llmtest-{secrets.token_hex(6)}"
    return RateLimiter("async+" + url, key_prefix=prefix), url, prefix


def circular_gap(a: float, b: float, period: float = 60.0) -> float:
    gap = abs(a - b) % period
    return min(gap, period - gap)


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_hit_windows_hits_both_and_reports_what_limits_reads(storage: str, request: pytest.FixtureRequest) -> None:
    limiter, url, prefix = limiter_for(storage, request)
    scripted = storage == "redis"
    assert (limiter._hit_script is not None) is scripted

    async def go() -> None:
        try:
            for i in range(3):
                refused, req, tok = await limiter.hit_windows("k1", 3, 100, 30)
                assert refused is None and req is not None and tok is not None
                # What the hit reports is what limits' own readers see right after it.
                again_req = await limiter.window("requests", "k1", 3)
                again_tok = await limiter.window("tokens", "k1", 100)
                assert (req.limit, req.remaining) == (again_req.limit, again_req.remaining) == (3, 2 - i)
                assert (tok.limit, tok.remaining) == (again_tok.limit, again_tok.remaining) == (100, 100 - 30 * (i + 1))
                assert abs(req.reset_s - again_req.reset_s) < 0.5 and 59 < req.reset_s < 60.01
                # limits' formula takes the counter's time to live modulo the window: 60 s read in the same
                # millisecond as the hit is 0, a moment later 59.99; either way the same instant.
                assert circular_gap(tok.reset_s, again_tok.reset_s) < 0.5
            # The requests window is full: refused, nothing hit (the tokens window keeps its 90).
            assert await limiter.hit_windows("k1", 3, 100, 5) == ("requests", None, None)
            assert (await limiter.window("tokens", "k1", 100)).remaining == 10
            # The tokens window has no room: refused; the requests hit stands, as with two separate hits.
            assert await limiter.hit_windows("k2", 10, 100, 101) == ("tokens", None, None)
            assert (await limiter.hit_windows("k2", 10, 100, 60))[0] is None
            assert await limiter.hit_windows("k2", 10, 100, 41) == ("tokens", None, None)
            assert (await limiter.window("requests", "k2", 10)).remaining == 7
            assert (await limiter.window("tokens", "k2", 100)).remaining == 40
            # Only the windows that apply.
            refused, req, tok = await limiter.hit_windows("k3", None, 50, 10)
            assert refused is None and req is None and tok is not None and tok.remaining == 40
            refused, req, tok = await limiter.hit_windows("k3", 5, None, 10)
            assert refused is None and tok is None and req is not None and req.remaining == 4
            # A window hit by the script is read and hit as one by limits' own calls.
            assert await limiter.test("requests", "k1", 3, 1) is False
            assert await limiter.hit("tokens", "k1", 100, 10) is True
            assert await limiter.hit("tokens", "k1", 100, 1) is False
        finally:
            limiter.close()
            if url is not None:
                await _cleanup_redis(url, prefix)

    asyncio.run(go())


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_a_full_requests_window_refuses_the_slot_and_the_tokens_test(
    storage: str, request: pytest.FixtureRequest
) -> None:
    limiter, url, prefix = limiter_for(storage, request)

    async def go() -> None:
        try:
            assert await limiter.test_tokens_take_slot("k", 100, 10, 2, rpm=2) == ADMITTED
            assert (await limiter.hit_windows("k", 2, None, 0))[0] is None
            assert await limiter.test_tokens_take_slot("k", 100, 10, 2, rpm=2) == ADMITTED
            assert (await limiter.hit_windows("k", 2, None, 0))[0] is None
            # Full: refused before the tokens and the slot, taking nothing (the two slots taken above remain).
            assert await limiter.test_tokens_take_slot("k", 100, 10, 2, rpm=2) == NO_REQUESTS
            assert await limiter.in_use("k") == 2
            assert await limiter.test("requests", "k", 2, 1) is False
            # The same window under another limit is another window (limits keys windows by their limit).
            assert await limiter.test_tokens_take_slot("k", 100, 10, 3, rpm=3) == ADMITTED
        finally:
            limiter.close()
            if url is not None:
                await _cleanup_redis(url, prefix)

    asyncio.run(go())


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_test_tokens_take_slot_takes_nothing_when_it_refuses(storage: str, request: pytest.FixtureRequest) -> None:
    limiter, url, prefix = limiter_for(storage, request)

    async def go() -> None:
        try:
            assert await limiter.test_tokens_take_slot("k", 100, 40, 2) == ADMITTED
            assert await limiter.test_tokens_take_slot("k", 100, 40, 2) == ADMITTED
            assert await limiter.in_use("k") == 2
            assert await limiter.test_tokens_take_slot("k", 100, 40, 2) == NO_SLOT
            assert await limiter.in_use("k") == 2
            await limiter.release_slot("k")
            # A test consumes nothing: the tokens window is still empty, so 100 fit, 101 never do.
            assert await limiter.test_tokens_take_slot("k", 100, 101, 2) == NO_TOKENS
            assert await limiter.in_use("k") == 1
            assert await limiter.test_tokens_take_slot("k", 100, 100, None) == ADMITTED
            assert await limiter.in_use("k") == 1
            # After hits the test sees the window as limits' own test does.
            assert await limiter.hit("tokens", "k", 100, 70)
            assert await limiter.test_tokens_take_slot("k", 100, 31, None) == NO_TOKENS
            assert await limiter.test("tokens", "k", 100, 31) is False
            assert await limiter.test_tokens_take_slot("k", 100, 30, 2) == ADMITTED
            assert await limiter.in_use("k") == 2
            assert await limiter.test_tokens_take_slot("k", None, 10**9, None) == ADMITTED
        finally:
            limiter.close()
            if url is not None:
                await _cleanup_redis(url, prefix)

    asyncio.run(go())


@pytest.mark.parametrize("client", ["link", "limits"])
def test_slots_given_back_never_go_below_zero(client: str, request: pytest.FixtureRequest) -> None:
    """On the lean link and through limits' own client (a URI with an option only that client reads), where the
    same release script runs."""
    limiter, url, prefix = limiter_for("redis", request)
    if client == "limits":
        assert url is not None
        limiter.close()
        limiter = RateLimiter(f"async+{url}?stream_timeout=5", key_prefix=prefix)
    assert (limiter.link is None) is (client == "limits") and limiter.admits_in_one_step

    async def go() -> list[int]:
        try:
            assert await limiter.test_tokens_take_slot("k", None, 0, 3) == ADMITTED
            seen = [await limiter.in_use("k")]
            await limiter.release_slot("k")
            seen.append(await limiter.in_use("k"))
            await limiter.release_slot("k")  # one more than was taken (as after the counter expired)
            seen.append(await limiter.in_use("k"))
            assert await limiter.test_tokens_take_slot("k", None, 0, 1) == ADMITTED  # the one slot is free
            assert await limiter.test_tokens_take_slot("k", None, 0, 1) == NO_SLOT
            seen.append(await limiter.in_use("k"))
            return seen
        finally:
            limiter.close()
            assert url is not None
            await _cleanup_redis(url, prefix)

    assert asyncio.run(go()) == [1, 0, 0, 1]


def test_the_lean_link_loads_its_scripts_again_and_reconnects_after_losing_its_connection(
    request: pytest.FixtureRequest,
) -> None:
    """Plain Redis URIs run the scripts on the lean link: after SCRIPT FLUSH (a restarted Redis) they are sent whole
    again; a connection the server closed is opened again by the next call; the URI's database is the one used."""
    limiter, url, prefix = limiter_for("redis", request)
    link = limiter.link
    assert link is not None and url is not None

    async def go() -> None:
        watcher = RedisLink.from_uri(url)
        assert watcher is not None
        try:
            assert await limiter.test_tokens_take_slot("k", 100, 10, 5) == ADMITTED
            await watcher.call("SCRIPT", "FLUSH")
            assert await limiter.test_tokens_take_slot("k", 100, 10, 5) == ADMITTED  # NOSCRIPT, then EVAL
            assert await limiter.in_use("k") == 2
            # Killed by the server (as by a restart, or its idle timeout): the next call connects again.
            own_id = await link.call("CLIENT", "ID")
            assert await watcher.call("CLIENT", "KILL", "ID", own_id) == 1
            for _ in range(100):
                if link._protocol is None or link._protocol.lost is not None:
                    break
                await asyncio.sleep(0.01)
            await limiter.release_slot("k")
            assert await link.call("CLIENT", "ID") != own_id
            assert await limiter.in_use("k") == 1
            # The database in the URI is the one written: the counter is found there by another client.
            counter = f"{prefix}:llm-server/concurrency/k"
            assert await watcher.call("GET", counter) == b"1"
            # A command whose caller stopped waiting keeps its place: the next reply is the next command's.
            slow = asyncio.ensure_future(
                link.call(
                    "EVAL",
                    "local t = redis.call('TIME') local n = 0 while n < 200000 do n = n + 1 end return 'slow'",
                    0,
                )
            )
            await asyncio.sleep(0)
            slow.cancel()
            assert await link.call("ECHO", "next") == b"next"
            assert slow.cancelled()
        finally:
            watcher.abort()
            limiter.close()
            await _cleanup_redis(url, prefix)

    asyncio.run(go())


def test_the_lean_link_authenticates_as_the_uri_says(redis_url: str) -> None:
    """AUTH is sent first when the URI has credentials: the test server's default user takes any password
    (no ``requirepass``), while a password alone is refused there; the refusal is the call's error."""
    parts = redis_url.split("://", 1)

    async def go() -> None:
        named = RedisLink.from_uri(f"{parts[0]}://default:anything@{parts[1]}")
        bare = RedisLink.from_uri(f"{parts[0]}://:anything@{parts[1]}")
        assert named is not None and bare is not None
        try:
            assert await named.call("PING") == "PONG"
            with pytest.raises(RedisReplyError, match="AUTH"):
                await bare.call("PING")
        finally:
            named.abort()
            bare.abort()

    asyncio.run(go())


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_a_request_the_quota_refuses_keeps_no_window_hit_and_no_slot(
    storage: str, request: pytest.FixtureRequest
) -> None:
    """On Redis the windows are hit in the same round trip as the tests and the slot (before the quota), and taken
    back when the quota refuses: what is left is what the memory storage (tests, quota, then hits) leaves."""
    from tests.unit.test_gateway import Quota, principal

    limiter, url, prefix = limiter_for(storage, request)
    assert limiter.admits_in_one_step is (storage == "redis")
    quota = Quota()
    gw = Gateway(limiter, quota.reserve, quota.settle, Metrics(), fail_open=False)

    async def go() -> None:
        try:
            who = principal(rpm=5, tpm=1000, max_concurrency=2, monthly_requests=100)
            first = await gw.admit(who, prompt_tokens=10, max_new_tokens=20, explicit_max=True)
            assert first.headers["x-ratelimit-remaining-requests"] == "4"
            assert first.headers["x-ratelimit-remaining-tokens"] == "970"
            quota.ok = False
            for _ in range(3):
                with pytest.raises(OpenAIError) as err:
                    await gw.admit(who, prompt_tokens=100, max_new_tokens=200, explicit_max=True)
                assert err.value.code == "insufficient_quota"
            assert (await limiter.window("requests", "k1", 5)).remaining == 4
            assert (await limiter.window("tokens", "k1", 1000)).remaining == 970
            assert await limiter.in_use("k1") == 1  # the first request's slot only
            await gw.finish(first, used_tokens=25)
            assert await limiter.in_use("k1") == 0
            # A refused request that had taken the last place in the window: the place is free again, and this
            # replica does not refuse the next request for a window it had noted full.
            last = principal(rpm=1, monthly_requests=100)
            with pytest.raises(OpenAIError) as err:
                await gw.admit(last, prompt_tokens=1, max_new_tokens=1, explicit_max=True)
            assert err.value.code == "insufficient_quota"
            await gw.precheck(last)
            quota.ok = True
            ticket = await gw.admit(last, prompt_tokens=1, max_new_tokens=1, explicit_max=True)
            assert ticket.headers["x-ratelimit-remaining-requests"] == "0"
            await gw.finish(ticket, used_tokens=2)
        finally:
            limiter.close()
            if url is not None:
                await _cleanup_redis(url, prefix)

    asyncio.run(go())


def test_a_slot_release_is_not_waited_for_and_is_seen_by_everything_sent_after_it(
    request: pytest.FixtureRequest,
) -> None:
    """On the lean link ``release_slot`` returns once the release is written (its answer still to come); the next
    call on the link (the next admission, or ``in_use``) sees it, as another replica would."""
    limiter, url, prefix = limiter_for("redis", request)
    link = limiter.link
    assert link is not None and url is not None

    async def go() -> list[int]:
        other = RateLimiter("async+" + url, key_prefix=prefix)  # another replica, its own connection
        try:
            seen = []
            for _ in range(3):
                assert await limiter.test_tokens_take_slot("k", None, 0, 1) == ADMITTED
                await limiter.release_slot("k")
                assert link._protocol is not None and len(link._protocol.waiters) == 1  # sent, not answered yet
                assert await limiter.test_tokens_take_slot("k", None, 0, 1) == ADMITTED  # the one slot again
                await limiter.release_slot("k")
                seen.append(await limiter.in_use("k"))
                seen.append(await other.in_use("k"))
            return seen
        finally:
            other.close()
            limiter.close()
            await _cleanup_redis(url, prefix)

    assert asyncio.run(go()) == [0] * 6


def test_the_lean_link_connects_afresh_on_another_event_loop(redis_url: str) -> None:
    """A connection belongs to the loop that opened it: used from a new loop (a test's second client, a restarted
    loop), the link connects again there instead of touching the old loop's transport."""
    link = RedisLink.from_uri(redis_url)
    assert link is not None

    async def one_loop() -> tuple[Any, list[bytes]]:
        try:
            echoed = await asyncio.gather(*(link.call("ECHO", str(i)) for i in range(5)))  # all on one connect
            return await link.call("CLIENT", "ID"), list(echoed)
        finally:
            link.close()  # as the app's shutdown does, on its own loop

    first, second = asyncio.run(one_loop()), asyncio.run(one_loop())
    assert first[0] != second[0]
    assert first[1] == second[1] == [b"0", b"1", b"2", b"3", b"4"]
