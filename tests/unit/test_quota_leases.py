"""Quota leases (PostgreSQL deployments): a busy key's quota reserved a few requests ahead, never past the limit,
and what was not used given back (``server.admission.leases``), against a database stand-in with the same
conditional reservation."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import pytest

from persistence.usage import never_fits
from server.admission.leases import EXACT_HOLD_S, IDLE_S, QuotaLeases

MONTH = "2026-12"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Db:
    """The usage table and its conditional upsert; ``record`` is the writer's increment, applied at once."""

    def __init__(self) -> None:
        self.tokens: defaultdict[str, int] = defaultdict(int)
        self.requests: defaultdict[str, int] = defaultdict(int)
        self.statements: list[tuple[int, int]] = []
        self.fail = False

    async def reserve(
        self, key: str, month: str, tokens: int, requests: int, max_tokens: int | None, max_requests: int | None
    ) -> bool:
        self.statements.append((tokens, requests))
        await asyncio.sleep(0)  # in flight: other requests run meanwhile
        if self.fail:
            raise ConnectionError("the database went away")
        if never_fits(tokens, max_tokens, max_requests, requests):
            return False
        if max_tokens is not None and self.tokens[key] + tokens > max_tokens:
            return False
        if max_requests is not None and self.requests[key] + requests > max_requests:
            return False
        self.tokens[key] += tokens
        self.requests[key] += requests
        return True

    def record(self, key: str, month: str, tokens: int, requests: int) -> None:
        self.tokens[key] += tokens
        self.requests[key] += requests


def leases(db: Db, clock: Clock, ahead: int = 16) -> QuotaLeases:
    return QuotaLeases(db.reserve, db.record, ahead=ahead, clock=clock)


async def one_request(q: QuotaLeases, reserve: int, used: int, key: str = "k", **limits: int | None) -> bool:
    """Reserve ``reserve`` tokens, then settle as the gateway does (the unused part back)."""
    if not await q.reserve(key, MONTH, reserve, limits.get("max_tokens"), limits.get("max_requests")):
        return False
    q.settle(key, MONTH, used - reserve, 0)
    return True


@pytest.mark.anyio
async def test_a_key_that_calls_now_and_then_reserves_each_request_alone() -> None:
    db, clock = Db(), Clock()
    q = leases(db, clock)
    for _ in range(3):
        assert await one_request(q, 100, 30, max_tokens=10_000)
        clock.now += IDLE_S + 1
        q.give_back()  # the writer's flush: the idle lease (the unused 70) goes back
        assert q.held("k", MONTH) == (0, 0)
    assert db.statements == [(100, 1)] * 3
    assert (db.tokens["k"], db.requests["k"]) == (90, 3)


@pytest.mark.anyio
async def test_a_busy_key_leases_ahead_and_needs_the_database_for_few_of_its_requests() -> None:
    db, clock = Db(), Clock()
    q = leases(db, clock)
    for _ in range(200):
        assert await one_request(q, 50, 20, max_tokens=10**9, max_requests=10**6)
        clock.now += 0.01
    # Doubling up to 16: 1, 2, 4, 8, 16 requests, then 16 at a time (each lease keeps the unused tokens too).
    assert [r for _, r in db.statements[:5]] == [1, 2, 4, 8, 16]
    assert len(db.statements) < 200 / 8
    q.give_back(everything=True)
    assert (db.tokens["k"], db.requests["k"]) == (200 * 20, 200)


@pytest.mark.anyio
async def test_leases_of_one_request_are_a_statement_per_request() -> None:
    """``QUOTA_LEASE_REQUESTS=1``: every request reserves alone (what a finished one did not use is still held
    until its key is idle, and counted toward the next)."""
    db, clock = Db(), Clock()
    q = leases(db, clock, ahead=1)
    for _ in range(50):
        assert await one_request(q, 50, 20, max_tokens=10**9, max_requests=10**6)
        clock.now += 0.01
    assert len(db.statements) == 50 and {r for _, r in db.statements} == {1}
    assert db.statements[0] == (50, 1) and set(db.statements[1:]) == {(20, 1)}


@pytest.mark.anyio
async def test_concurrent_requests_of_one_key_grow_its_lease_at_once() -> None:
    db, clock = Db(), Clock()
    q = leases(db, clock, ahead=8)
    assert all(await asyncio.gather(*(q.reserve("k", MONTH, 10, None, 1000) for _ in range(5))))
    assert [r for _, r in db.statements] == [1, 2, 4, 8, 8]
    assert q.held("k", MONTH) == (10 * (1 + 3 + 7 + 7), 1 + 3 + 7 + 7)
    assert db.requests["k"] == 5 + 18


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("max_tokens", "max_requests", "reserve", "used"),
    [(1000, None, 300, 100), (None, 10, 5, 5), (5000, 40, 333, 7), (999, 999, 999, 999)],
)
async def test_alone_a_replica_admits_exactly_what_one_statement_per_request_would(
    max_tokens: int | None, max_requests: int | None, reserve: int, used: int
) -> None:
    """Near the limit a refused lease falls back to the request alone, and what the lease holds counts: no request
    is refused that reservations one at a time would have admitted."""

    async def one_at_a_time() -> int:  # what reserving each request alone admits, its unused part back at once
        db, n = Db(), 0
        while n < 10_000 and await db.reserve("k", MONTH, reserve, 1, max_tokens, max_requests):
            db.record("k", MONTH, used - reserve, 0)
            n += 1
        return n

    async def admitted(ahead: int) -> tuple[int, int, int]:
        db, clock = Db(), Clock()
        q = leases(db, clock, ahead=ahead)
        n = 0
        while n < 10_000 and await one_request(q, reserve, used, max_tokens=max_tokens, max_requests=max_requests):
            n += 1
            clock.now += 0.001
        q.give_back(everything=True)
        return n, db.tokens["k"], db.requests["k"]

    expected = await one_at_a_time()
    assert expected > 0
    for ahead in (1, 16):
        assert await admitted(ahead) == (expected, expected * used, expected)


@pytest.mark.anyio
async def test_replicas_sharing_a_quota_never_pass_it_and_give_back_all_they_did_not_use() -> None:
    rng = random.Random(7)
    db, clock = Db(), Clock()
    replicas = [leases(db, clock) for _ in range(3)]
    limits = {"max_tokens": 60_000, "max_requests": 400}
    used = {"tokens": 0, "requests": 0}

    async def request(q: QuotaLeases) -> None:
        reserve = rng.randint(1, 400)
        if not await q.reserve("k", MONTH, reserve, limits["max_tokens"], limits["max_requests"]):
            return
        assert db.tokens["k"] <= limits["max_tokens"] and db.requests["k"] <= limits["max_requests"]
        await asyncio.sleep(0)
        spent = rng.randint(0, reserve)
        used["tokens"] += spent
        used["requests"] += 1
        q.settle("k", MONTH, spent - reserve, 0)

    for _ in range(30):
        await asyncio.gather(*(request(rng.choice(replicas)) for _ in range(40)))
        clock.now += rng.choice([0.01, 0.5, IDLE_S + 0.1])
        for q in replicas:
            q.give_back()
    assert used["requests"] > 100  # the quota was reached, not just approached
    for q in replicas:
        q.give_back(everything=True)
    assert (db.tokens["k"], db.requests["k"]) == (used["tokens"], used["requests"])


@pytest.mark.anyio
async def test_a_lease_refused_near_the_limit_leaves_the_key_exact_for_a_while() -> None:
    db, clock = Db(), Clock()
    q = leases(db, clock)
    while len(db.statements) < 4:  # a busy key: 1, 2, 4, then 8 requests ahead
        assert await q.reserve("k", MONTH, 10, None, 100)
    while q.held("k", MONTH)[1]:
        assert await q.reserve("k", MONTH, 10, None, 100)
    assert [r for _, r in db.statements] == [1, 2, 4, 8]
    db.requests["k"] = 98  # other replicas took nearly all the rest
    assert await q.reserve("k", MONTH, 10, None, 100)
    assert db.statements[4:] == [(160, 16), (10, 1)]  # the lease refused, then the request alone
    assert await q.reserve("k", MONTH, 10, None, 100)
    assert db.statements[6:] == [(10, 1)]  # exact: no lease tried
    assert not await q.reserve("k", MONTH, 10, None, 100)  # the 100th request was the last
    clock.now += EXACT_HOLD_S
    db.requests["k"] = 0  # a new limit's worth of room (as after a raise)
    assert await q.reserve("k", MONTH, 10, None, 100)
    assert await q.reserve("k", MONTH, 10, None, 100)
    assert db.statements[-2:] == [(10, 1), (20, 2)]  # leasing again, from 1


@pytest.mark.anyio
async def test_changed_limits_give_the_lease_back_first() -> None:
    db, clock = Db(), Clock()
    q = leases(db, clock, ahead=4)
    for _ in range(4):  # 1, 2 (one used from the lease), then 4 ahead
        assert await q.reserve("k", MONTH, 10, 10_000, 100)
    assert q.held("k", MONTH) == (30, 3)
    assert db.requests["k"] == 4 + 3
    assert await q.reserve("k", MONTH, 10, 10_000, 50)  # the role changed: its lease goes back, then one alone
    assert q.held("k", MONTH) == (0, 0)
    assert (db.tokens["k"], db.requests["k"]) == (50, 5)
    assert db.statements[-1] == (10, 1)


@pytest.mark.anyio
async def test_a_failed_statement_puts_back_what_the_lease_held() -> None:
    db, clock = Db(), Clock()
    q = leases(db, clock, ahead=4)
    assert await q.reserve("k", MONTH, 10, None, None)
    q.settle("k", MONTH, -8, 0)  # used 2: the lease holds 8 tokens, no request
    assert q.held("k", MONTH) == (8, 0)
    db.fail = True
    with pytest.raises(ConnectionError):
        await q.reserve("k", MONTH, 10, None, None)
    assert q.held("k", MONTH) == (8, 0)
    db.fail = False
    assert await q.reserve("k", MONTH, 10, None, None)
    assert db.statements[-1] == (10 * 4 - 8, 4)  # what the lease held counted toward it (the failed try had 2)


@pytest.mark.anyio
async def test_a_lease_given_back_while_its_statement_ran_returns_the_new_part_too() -> None:
    db, clock = Db(), Clock()
    q = leases(db, clock, ahead=4)
    assert await q.reserve("k", MONTH, 10, None, None)
    pending = asyncio.ensure_future(q.reserve("k", MONTH, 10, None, None))  # leases 2 ahead
    await asyncio.sleep(0)
    q.give_back(everything=True)  # shutdown while it runs
    assert await pending
    assert q.held("k", MONTH) == (0, 0)
    assert (db.tokens["k"], db.requests["k"]) == (20, 2)  # the two requests, nothing held


@pytest.mark.anyio
async def test_usage_beyond_what_a_lease_holds_is_recorded() -> None:
    db, clock = Db(), Clock()
    q = leases(db, clock)
    assert await q.reserve("k", MONTH, 10, None, None)
    q.settle("k", MONTH, 25, 0)  # more than reserved (an estimate that fell short)
    assert q.held("k", MONTH) == (0, 0)
    assert db.tokens["k"] == 35
    q.settle("k", MONTH, 0, -1)  # a request given back (refused after its reservation)
    assert q.held("k", MONTH) == (0, 1)
    q.settle("other", MONTH, 5, 1)  # a key without a lease: straight to the database
    assert (db.tokens["other"], db.requests["other"]) == (5, 1)


def test_ahead_must_be_positive() -> None:
    db = Db()
    with pytest.raises(ValueError, match="ahead"):
        QuotaLeases(db.reserve, db.record, ahead=0)
