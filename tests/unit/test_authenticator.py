"""The key cache: lookups shared by the requests that need them at once, renewal in the background, and the bounds
on a revoke (``KEY_CACHE_TTL_S`` elsewhere, at once through :meth:`Authenticator.forget`)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from persistence.store import KeyRecord, RoleRecord
from server.auth import principal
from server.auth.keys import digest, generate_key
from server.auth.principal import REFRESH_AFTER, Authenticator
from server.errors import OpenAIError

pytestmark = pytest.mark.anyio

PEPPER = b"test-pepper-0123456789abcdef"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
ROLE = RoleRecord("r", None, None, None, None, None, None, None, None, False, NOW, NOW)


def record(key_id: str = "k1", revoked: bool = False) -> KeyRecord:
    return KeyRecord(key_id, "n", "sk-llm-abcd", "wxyz", "r", NOW, None, NOW if revoked else None, None, None)


class Database:
    """A lookup that counts its calls and answers when released (all at once, or each at once: ``open``)."""

    def __init__(self, found: KeyRecord | None) -> None:
        self.found = found
        self.calls = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    def open(self) -> Database:
        self.release.set()
        return self

    async def lookup(self, d: str) -> tuple[KeyRecord, RoleRecord] | None:
        self.calls += 1
        found = self.found  # what the database held when the statement ran
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return None if found is None else (found, ROLE)


class Clock:
    """Stands in for the ``time`` module of ``server.auth.principal``: entries age only when a test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(principal, "time", fake)
    return fake


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_requests_that_need_the_same_lookup_share_one() -> None:
    db = Database(record())
    auth = Authenticator(db.lookup, PEPPER, ttl_s=60, timeout_s=5)
    key = generate_key()
    waiting = [asyncio.create_task(auth.authenticate(key)) for _ in range(8)]
    await settle()
    assert db.calls == 1
    db.release.set()
    assert {p.key_id for p in await asyncio.gather(*waiting)} == {"k1"}
    assert db.calls == 1 and auth.cached(key) is not None
    # A different key is a different lookup; an unknown key is refused (and not cached) for everyone who asked.
    db.found = None
    other = generate_key()
    refused = await asyncio.gather(*(auth.authenticate(other) for _ in range(3)), return_exceptions=True)
    assert db.calls == 2
    assert all(isinstance(e, OpenAIError) and e.status == 401 for e in refused)
    assert auth.cached(other) is None


async def test_a_key_in_use_is_renewed_in_the_background_before_it_expires(clock: Clock) -> None:
    db = Database(record()).open()
    ttl = 10.0
    auth = Authenticator(db.lookup, PEPPER, ttl_s=ttl, timeout_s=5)
    key = generate_key()
    await auth.authenticate(key)
    assert db.calls == 1
    db.release.clear()  # the renewal will hang until released: requests must not wait for it
    clock.now += ttl * REFRESH_AFTER - 0.1
    assert auth.cached(key) is not None
    await settle()
    assert db.calls == 1  # young: no renewal yet
    clock.now += 0.2
    assert auth.cached(key) is not None  # answered from the cache at once...
    assert (await asyncio.wait_for(auth.authenticate(key), 1)).key_id == "k1"
    await settle()
    assert db.calls == 2  # ... while one renewal runs, however many requests came
    db.release.set()
    await settle()
    clock.now += ttl * (1 - REFRESH_AFTER)  # past the first entry's expiry: the renewed one holds
    assert auth.cached(key) is not None and db.calls == 2
    clock.now += ttl  # unused for a whole TTL: looked up again, and the request waits for it
    assert auth.cached(key) is None
    assert (await auth.authenticate(key)).key_id == "k1" and db.calls == 3


async def test_a_renewal_that_finds_the_key_revoked_refuses_it_at_once(clock: Clock) -> None:
    db = Database(record()).open()
    auth = Authenticator(db.lookup, PEPPER, ttl_s=10, timeout_s=5)
    key = generate_key()
    await auth.authenticate(key)
    db.found = record(revoked=True)  # revoked by another replica
    clock.now += 10 * REFRESH_AFTER
    assert auth.cached(key) is not None  # the request that started the renewal is still served (within the TTL)
    await settle()
    assert auth.cached(key) is None
    with pytest.raises(OpenAIError, match="revoked"):
        await auth.authenticate(key)
    # A key deleted meanwhile: its entry goes.
    db.found = record()
    await auth.authenticate(fresh := generate_key())
    db.found = None
    clock.now += 10 * REFRESH_AFTER
    assert auth.cached(fresh) is not None
    await settle()
    assert auth.cached(fresh) is None
    assert auth._cache.get(digest(fresh, PEPPER)) is None


async def test_a_failed_renewal_leaves_the_entry_to_expire(clock: Clock) -> None:
    db = Database(record()).open()
    auth = Authenticator(db.lookup, PEPPER, ttl_s=10, timeout_s=0.05)
    key = generate_key()
    await auth.authenticate(key)
    db.fail = ConnectionError("database down")
    clock.now += 10 * REFRESH_AFTER
    assert auth.cached(key) is not None
    await settle()
    assert db.calls == 2 and auth.cached(key) is not None  # the failure was dropped; the entry still holds
    clock.now += 10 * (1 - REFRESH_AFTER)
    with pytest.raises(OpenAIError) as unavailable:
        await auth.authenticate(key)
    assert unavailable.value.status == 503
    db.fail = None
    assert (await auth.authenticate(key)).key_id == "k1"


async def test_a_lookup_under_way_when_the_key_is_revoked_here_is_neither_cached_nor_joined() -> None:
    current = record()
    gates: list[asyncio.Event] = []

    async def lookup(d: str) -> tuple[KeyRecord, RoleRecord] | None:
        found = current  # what the database held when the statement ran
        gates.append(gate := asyncio.Event())
        await gate.wait()
        return found, ROLE

    auth = Authenticator(lookup, PEPPER, ttl_s=60, timeout_s=5)
    key = generate_key()
    before = asyncio.create_task(auth.authenticate(key))
    await settle()
    current = record(revoked=True)
    auth.forget("k1")  # the revoke through this replica, while the lookup that read the key unrevoked runs
    after = asyncio.create_task(auth.authenticate(key))
    await settle()
    assert len(gates) == 2  # the request after the revoke did not join the stale lookup
    gates[1].set()
    with pytest.raises(OpenAIError, match="revoked"):
        await after
    gates[0].set()  # the stale lookup ends last
    assert (await before).key_id == "k1"  # it was in flight before the revoke
    with pytest.raises(OpenAIError, match="revoked"):  # and its read was not cached over the fresh one
        await auth.authenticate(key)
    assert auth.cached(key) is None and len(gates) == 2


async def test_a_throttled_lookup_ends_with_its_request() -> None:
    """A lookup waiting for the throttle's lane is cancelled when its request gives up: guesses queue nothing."""
    db = Database(record()).open()
    auth = Authenticator(db.lookup, PEPPER, ttl_s=60, timeout_s=0.05)
    lane = asyncio.Semaphore(1)
    await lane.acquire()  # the lane is busy
    for _ in range(5):
        with pytest.raises(OpenAIError) as unavailable:
            await auth.authenticate(generate_key(), lane=lane)
        assert unavailable.value.status == 503
    lane.release()
    await settle()
    assert db.calls == 0 and not auth._fetching
    assert (await auth.authenticate(generate_key(), lane=lane)).key_id == "k1"
    assert db.calls == 1


async def test_a_shared_lookup_that_outlives_its_requests_still_fills_the_cache() -> None:
    db = Database(record())
    auth = Authenticator(db.lookup, PEPPER, ttl_s=60, timeout_s=0.05)
    key = generate_key()
    with pytest.raises(OpenAIError) as slow:
        await auth.authenticate(key)
    assert slow.value.status == 503
    db.release.set()
    await settle()
    assert auth.cached(key) is not None and db.calls == 1


async def test_without_a_cache_every_request_looks_the_key_up() -> None:
    db = Database(record()).open()
    auth = Authenticator(db.lookup, PEPPER, ttl_s=0, timeout_s=5)
    key = generate_key()
    for _ in range(3):
        await auth.authenticate(key)
        assert auth.cached(key) is None
    assert db.calls == 3
