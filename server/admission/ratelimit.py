"""Short-window limits (RPM, TPM, per-key concurrency) in this process or in a ``limits`` storage (Redis).

RPM uses a moving window (exact; one entry per request). TPM uses a sliding-window counter (two counters per
key, so large token costs stay cheap). Concurrency is a counter in the same place, so replicas sharing Redis
share it too. In one process (``memory://``) the windows are :class:`server.admission.local.LocalWindows`, the
same algorithms without a storage's locks and awaits; on Redis they are ``limits``' own structures, several steps
at a time in one script (:mod:`server.admission.scripts`), run on a connection of this server's own where the URI
is a plain one (:mod:`server.admission.redislink`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from limits import RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from server.admission import scripts
from server.admission.local import LocalWindows
from server.admission.redislink import RedisLink, RedisReplyError

log = logging.getLogger("server.admission")
T = TypeVar("T")

NAMESPACE = "llm-server"
# A concurrency counter outlives any request; it only expires to heal slots leaked by a crashed replica.
CONCURRENCY_TTL_S = 3600
EXPIRY_S = 60
"""The requests and tokens windows span a minute."""
ADMITTED, NO_TOKENS, NO_SLOT, NO_REQUESTS = 1, 2, 3, 4
"""What :meth:`RateLimiter.test_tokens_take_slot` answers."""
_UNBOUNDED = 2**62  # a limit that no window count reaches: the sliding-window entry then always counts
STORAGE_TIMEOUT_S = 2.0
"""Longest wait for one storage (Redis) call before :class:`StorageUnavailable`."""
RETRY_AFTER_FAILURE_S = 1.0
"""After a failed storage call, calls fail at once for this long instead of each waiting up to
``STORAGE_TIMEOUT_S``: a request that makes several calls against a Redis that stopped answering pays the timeout at
most once, and the storage is tried again (and used, once it answers) after this pause."""


def _local_key(kind: str, key_id: str, limit: int) -> str:
    """A window's key in this process; the limit is part of it, as in ``limits`` (a changed limit starts afresh)."""
    return f"{kind}/{key_id}/{limit}"


class StorageUnavailable(Exception):
    """The rate-limit storage (Redis) did not answer."""


@dataclass(frozen=True, slots=True)
class Window:
    """One limit's state for the ``x-ratelimit-*`` headers."""

    limit: int
    remaining: int
    reset_s: float


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``6s``, ``1m0s``, ``1m30s``, ``120ms``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    minutes, secs = divmod(total, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class RateLimiter:
    """RPM, TPM and concurrency for keys, identified by key id; failed key checks (``auth``) per client address.

    Args:
        uri: ``limits`` storage URI (``async+memory://``, ``async+redis://host:6379/0``).
        key_prefix: Prefix of every Redis key (tests isolate runs with it).
    """

    def __init__(self, uri: str, *, key_prefix: str = "LIMITS") -> None:
        scheme = uri.split("://", 1)[0]
        self.remote = scheme not in ("memory", "async+memory")
        self.local = None if self.remote else LocalWindows(EXPIRY_S)
        self.storage: Any = None
        if self.remote:
            options: dict[str, Any] = {"wrap_exceptions": True}
            if "redis" in scheme:
                options["key_prefix"] = key_prefix
            self.storage = storage_from_string(uri, **options)
        self._hit_script: Any = None
        self._test_script: Any = None
        self._release_script: Any = None
        self._admit_script: Any = None
        self._undo_script: Any = None
        self.link: RedisLink | None = None
        bridge: Any = getattr(self.storage, "bridge", None)
        # One Redis server (not a cluster: a script's keys would lie in different slots) through limits' coredis
        # bridge: several steps of admission in one round trip each (server.admission.scripts), on a lean
        # connection of this module's own where the URI is a plain one (server.admission.redislink).
        if type(self.storage).__name__ == "RedisStorage" and hasattr(bridge, "get_connection"):
            self.link = RedisLink.from_uri(uri)
            register = self.link.script if self.link is not None else bridge.get_connection().register_script
            self._hit_script = register(scripts.HIT_WINDOWS)
            self._test_script = register(scripts.TEST_TOKENS_TAKE_SLOT)
            self._admit_script = register(scripts.ADMIT)
            self._undo_script = register(scripts.UNDO_ADMIT)
            self._release_script = register(scripts.RELEASE_SLOT)
            self._prefixed = bridge.prefixed_key
        self._rpm = None if self.storage is None else MovingWindowRateLimiter(self.storage)
        self._tpm = None if self.storage is None else SlidingWindowCounterRateLimiter(self.storage)
        self._retry_at = 0.0  # monotonic time before which the storage is not tried (after a failure)
        self._down_since: float | None = None  # start of the current outage, for the log

    def _strategy(self, kind: str) -> Any:
        """Tokens: sliding-window counter; requests and failed key checks (``auth``): exact moving window."""
        return self._tpm if kind == "tokens" else self._rpm

    async def _call(self, coro: Awaitable[T]) -> T:
        if time.monotonic() < self._retry_at:
            close = getattr(coro, "close", None)
            if close is not None:
                close()  # a coroutine that will not run: close it so it is not reported as never awaited
            raise StorageUnavailable("the rate-limit storage failed a moment ago; not retried yet")
        try:
            async with asyncio.timeout(STORAGE_TIMEOUT_S):
                result = await coro
        except TimeoutError as exc:
            if self.link is not None:
                self.link.abort()  # it may be the link that stopped answering: its next call connects afresh
            raise self._failed(exc) from exc
        except (OSError, RedisReplyError) as exc:
            raise self._failed(exc) from exc
        except Exception as exc:  # limits wraps driver errors in StorageError; anything else is the same fault
            if type(exc).__module__.startswith(("limits", "coredis", "redis")):
                raise self._failed(exc) from exc
            raise
        if self._down_since is not None:
            log.warning("rate-limit storage answers again after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None
        return result

    def _failed(self, exc: Exception) -> StorageUnavailable:
        """Note a failed call (logged once per outage) and pause further calls for ``RETRY_AFTER_FAILURE_S``."""
        now = time.monotonic()
        self._retry_at = now + RETRY_AFTER_FAILURE_S
        reason = str(exc) or type(exc).__name__
        if self._down_since is None:
            self._down_since = now
            log.warning("rate-limit storage unavailable (%s); retrying every %gs", reason, RETRY_AFTER_FAILURE_S)
        return StorageUnavailable(reason)

    async def window(self, kind: str, key_id: str, limit: int) -> Window:
        """Current state of the ``kind`` (``requests``/``tokens``) window without consuming anything."""
        local = self.local
        if local is not None:
            key = _local_key(kind, key_id, limit)
            if kind == "tokens":
                remaining, reset_s = scripts.sliding_window_stats(limit, EXPIRY_S, *local.sliding_window(key))
            else:
                remaining, reset_s = scripts.moving_window(limit, EXPIRY_S, *local.moving_window(key))
            return Window(limit=limit, remaining=remaining, reset_s=reset_s)
        item = RateLimitItemPerMinute(limit)
        limiter = self._strategy(kind)
        reset_time, remaining = await self._call(limiter.get_window_stats(item, NAMESPACE, kind, key_id))
        return Window(limit=limit, remaining=max(0, int(remaining)), reset_s=max(0.0, reset_time - time.time()))

    async def test(self, kind: str, key_id: str, limit: int, cost: int) -> bool:
        """Whether ``cost`` fits now (consumes nothing)."""
        if cost > limit:
            return False
        local = self.local
        if local is not None:
            key = _local_key(kind, key_id, limit)
            if kind == "tokens":
                previous, previous_ttl, current, _ = local.sliding_window(key)
                return previous * previous_ttl / EXPIRY_S + current < limit - cost + 1
            return local.moving_window(key)[1] < limit - cost + 1
        item = RateLimitItemPerMinute(limit)
        limiter = self._strategy(kind)
        return bool(await self._call(limiter.test(item, NAMESPACE, kind, key_id, cost=cost)))

    async def hit(self, kind: str, key_id: str, limit: int, cost: int) -> bool:
        """Consume ``cost`` if it fits; a refused hit consumes nothing (moving / sliding windows)."""
        if cost > limit:
            return False
        local = self.local
        if local is not None:
            key = _local_key(kind, key_id, limit)
            return local.acquire_sliding(key, limit, cost) if kind == "tokens" else local.acquire(key, limit, cost)
        item = RateLimitItemPerMinute(limit)
        limiter = self._strategy(kind)
        return bool(await self._call(limiter.hit(item, NAMESPACE, kind, key_id, cost=cost)))

    async def add(self, kind: str, key_id: str, limit: int, cost: int) -> None:
        """Count ``cost`` in the ``kind`` window whatever room it has left (tokens used beyond what was counted).

        The window may go past its limit: it then shows 0 remaining and refuses until the excess slides out. Only
        for the sliding-window counter (``tokens``): the same storage entry as :meth:`hit` (same keys, one atomic
        call, on memory and Redis alike), with a bound no cost reaches.
        """
        if kind != "tokens":
            raise ValueError(f"only the tokens window takes an unconditional count, not {kind!r}")
        if cost <= 0:
            return
        if self.local is not None:
            self.local.acquire_sliding(_local_key(kind, key_id, limit), _UNBOUNDED, cost)
            return
        item = RateLimitItemPerMinute(limit)
        key = item.key_for(NAMESPACE, kind, key_id)
        await self._call(self.storage.acquire_sliding_window_entry(key, _UNBOUNDED, item.get_expiry(), cost))

    async def hit_windows(
        self, key_id: str, rpm: int | None, tpm: int | None, tokens: int
    ) -> tuple[str | None, Window | None, Window | None]:
        """Hit the requests window (cost 1), then the tokens window (``tokens``), then read both for the headers.

        Returns:
            The kind refused (``"requests"``: nothing hit; ``"tokens"``: the requests hit stands, as with two
            :meth:`hit` calls) or ``None``, and the windows that apply as they are after the hits. On Redis one
            round trip, atomic (four calls before).
        """
        if self._hit_script is None:
            if rpm is not None and not await self.hit("requests", key_id, rpm, 1):
                return "requests", None, None
            if tpm is not None and not await self.hit("tokens", key_id, tpm, tokens):
                return "tokens", None, None
            req = await self.window("requests", key_id, rpm) if rpm else None
            tok = await self.window("tokens", key_id, tpm) if tpm else None
            return None, req, tok
        tokens_key = self._sliding_key(key_id, tpm)
        now = time.time()
        keys = [self._prefixed(self._key("requests", key_id, rpm)), f"{tokens_key}/-1", tokens_key]
        args = [now, EXPIRY_S, rpm or 0, tpm or 0, tokens]
        out = await self._call(self._hit_script.execute(keys, args))
        status = int(out[0])
        if status != 1:
            return ("requests" if status == 2 else "tokens"), None, None
        req = Window(rpm, *scripts.moving_window(rpm, EXPIRY_S, out[1], out[2], now)) if rpm else None
        tok = Window(tpm, *scripts.sliding_window(tpm, EXPIRY_S, out[3:7])) if tpm else None
        return None, req, tok

    async def test_tokens_take_slot(
        self, key_id: str, tpm: int | None, tokens: int, slots: int | None, *, rpm: int | None = None
    ) -> int:
        """Test the requests window (``rpm``: room for one) and the tokens window (``tokens``), consuming nothing,
        then take one of ``slots`` concurrency slots.

        Returns:
            :data:`ADMITTED` (the slot, if ``slots`` is given, is taken), :data:`NO_REQUESTS`, :data:`NO_TOKENS` or
            :data:`NO_SLOT` (nothing taken). On Redis one round trip, atomic.
        """
        if self._test_script is None:
            if rpm is not None and not await self.test("requests", key_id, rpm, 1):
                return NO_REQUESTS
            if tpm is not None and not await self.test("tokens", key_id, tpm, tokens):
                return NO_TOKENS
            if slots is not None and not await self.acquire_slot(key_id, slots):
                return NO_SLOT
            return ADMITTED
        tokens_key = self._sliding_key(key_id, tpm)
        keys = [
            f"{tokens_key}/-1",
            tokens_key,
            self._prefixed(f"{NAMESPACE}/concurrency/{key_id}"),
            self._prefixed(self._key("requests", key_id, rpm)),
        ]
        args = [EXPIRY_S, tpm or 0, tokens, slots or 0, CONCURRENCY_TTL_S, time.time(), rpm or 0]
        return int(await self._call(self._test_script.execute(keys, args)))

    @property
    def admits_in_one_step(self) -> bool:
        """Whether :meth:`admit_windows` is available (a single Redis server: one script)."""
        return self._admit_script is not None

    async def admit_windows(
        self, key_id: str, rpm: int | None, tpm: int | None, tokens: int, slots: int | None
    ) -> tuple[int, Window | None, Window | None, float]:
        """Test the requests window (room for one) and the tokens window (``tokens``), take one of ``slots``, then
        hit both windows and read them: all of it or nothing, in one round trip (Redis only, see
        :attr:`admits_in_one_step`).

        Returns:
            :data:`ADMITTED`, :data:`NO_REQUESTS`, :data:`NO_TOKENS` or :data:`NO_SLOT` (nothing taken); the windows
            that apply as they are after the hits (for the headers); and the time stamp of the requests entry,
            which :meth:`undo_admit` needs to take it back.
        """
        tokens_key = self._sliding_key(key_id, tpm)
        now = time.time()
        keys = [
            self._prefixed(self._key("requests", key_id, rpm)),
            f"{tokens_key}/-1",
            tokens_key,
            self._prefixed(f"{NAMESPACE}/concurrency/{key_id}"),
        ]
        args = [now, EXPIRY_S, rpm or 0, tpm or 0, tokens, slots or 0, CONCURRENCY_TTL_S]
        out = await self._call(self._admit_script.execute(keys, args))
        status = int(out[0])
        if status != ADMITTED:
            return status, None, None, now
        req = Window(rpm, *scripts.moving_window(rpm, EXPIRY_S, out[1], out[2], now)) if rpm else None
        tok = Window(tpm, *scripts.sliding_window(tpm, EXPIRY_S, out[3:7])) if tpm else None
        return ADMITTED, req, tok, now

    async def undo_admit(
        self, key_id: str, rpm: int | None, tpm: int | None, tokens: int, slot: bool, stamp: float
    ) -> None:
        """Take back what :meth:`admit_windows` took (at ``stamp``) for a request refused after it: one round trip."""
        keys = [
            self._prefixed(self._key("requests", key_id, rpm)),
            self._sliding_key(key_id, tpm),
            self._prefixed(f"{NAMESPACE}/concurrency/{key_id}"),
        ]
        args = [stamp, rpm or 0, tokens if tpm else 0, int(slot), CONCURRENCY_TTL_S]
        await self._call(self._undo_script.execute(keys, args))

    @staticmethod
    def _key(kind: str, key_id: str, limit: int | None) -> str:
        return RateLimitItemPerMinute(limit or 1).key_for(NAMESPACE, kind, key_id)

    def _sliding_key(self, key_id: str, limit: int | None) -> str:
        """The current counter of a tokens window on Redis, as limits names it (``{key}``; ``{key}/-1`` before)."""
        return str(self._prefixed(f"{{{self._key('tokens', key_id, limit)}}}"))

    async def acquire_slot(self, key_id: str, limit: int) -> bool:
        """Take one of ``limit`` concurrent slots of ``key_id``."""
        key = f"{NAMESPACE}/concurrency/{key_id}"
        if self.local is not None:
            if self.local.incr(key) > limit:
                self.local.incr(key, -1)
                return False
            return True
        value = int(await self._call(self.storage.incr(key, CONCURRENCY_TTL_S, 1)))
        if value > limit:
            await self._call(self.storage.incr(key, CONCURRENCY_TTL_S, -1))
            return False
        return True

    async def release_slot(self, key_id: str) -> None:
        """Give a slot back (never below zero).

        On the lean link the release is written to Redis at once and not waited for: it reaches Redis before
        anything this replica sends afterwards (the next request's admission included, on the same connection) and
        before the client can have read the answer it precedes, so no client sees its own slot still held; the
        round trip is off the request's path. A release that fails is logged, as one that was waited for.
        """
        key = f"{NAMESPACE}/concurrency/{key_id}"
        if self.local is not None:
            if self.local.incr(key, -1) < 0:
                self.local.incr(key)
            return
        if self._release_script is not None:
            keys, args = [self._prefixed(key)], [CONCURRENCY_TTL_S]
            sendable = self.link is not None and time.monotonic() >= self._retry_at
            if sendable and self._release_script.send(keys, args, self._release_failed):
                return
            await self._call(self._release_script.execute(keys, args))
            return
        value = int(await self._call(self.storage.incr(key, CONCURRENCY_TTL_S, -1)))
        if value < 0:  # the counter expired while the request ran: do not let it go negative
            await self._call(self.storage.incr(key, CONCURRENCY_TTL_S, -value))

    def _release_failed(self, exc: BaseException) -> None:
        """A release sent without waiting failed: the slot stays counted until the counter's expiry."""
        if isinstance(exc, Exception):
            exc = self._failed(exc)
        log.warning("could not release a concurrency slot: %s", exc)

    async def in_use(self, key_id: str) -> int:
        """Slots currently held by ``key_id`` (on the lean link: after every release this replica sent before)."""
        if self.local is not None:
            return self.local.get(f"{NAMESPACE}/concurrency/{key_id}")
        if self.link is not None:
            value = await self._call(self.link.call("GET", self._prefixed(f"{NAMESPACE}/concurrency/{key_id}")))
            return int(value or 0)
        return int(await self._call(self.storage.get(f"{NAMESPACE}/concurrency/{key_id}")))

    def close(self) -> None:
        """Drop the storage's connections (Redis); the memory storage has none.

        limits has no public close: the pool is reached through the storage's ``bridge`` (pyproject bounds limits
        to the minor series tested); an attribute missing there makes this a no-op, never an error.
        """
        if self.link is not None:
            self.link.close()
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            pool.disconnect()

    async def check(self) -> bool:
        """Whether the storage answers (in this process: always)."""
        if self.local is not None:
            return True
        try:
            return bool(await self._call(self.storage.check()))
        except StorageUnavailable:
            return False
