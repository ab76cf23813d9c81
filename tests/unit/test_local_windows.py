"""The in-process windows answer as ``limits``' own memory storage and strategies do, operation by operation."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from server.admission import local as local_module
from server.admission.local import LocalWindows
from server.admission.ratelimit import _UNBOUNDED, EXPIRY_S, NAMESPACE, RateLimiter


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Reference:
    """``limits``' memory storage driven as the limiter drove it before it had windows of its own."""

    def __init__(self) -> None:
        self.storage = MemoryStorage()
        self.moving = MovingWindowRateLimiter(self.storage)
        self.sliding = SlidingWindowCounterRateLimiter(self.storage)

    def _strategy(self, kind: str) -> MovingWindowRateLimiter | SlidingWindowCounterRateLimiter:
        return self.sliding if kind == "tokens" else self.moving

    async def hit(self, kind: str, key: str, limit: int, cost: int) -> bool:
        if cost > limit:
            return False
        return await self._strategy(kind).hit(RateLimitItemPerMinute(limit), NAMESPACE, kind, key, cost=cost)

    async def test(self, kind: str, key: str, limit: int, cost: int) -> bool:
        if cost > limit:
            return False
        return await self._strategy(kind).test(RateLimitItemPerMinute(limit), NAMESPACE, kind, key, cost=cost)

    async def window(self, kind: str, key: str, limit: int) -> tuple[int, float]:
        reset, remaining = await self._strategy(kind).get_window_stats(
            RateLimitItemPerMinute(limit), NAMESPACE, kind, key
        )
        return max(0, int(remaining)), max(0.0, reset - time.time())

    async def add(self, key: str, limit: int, cost: int) -> None:
        item = RateLimitItemPerMinute(limit)
        await self.storage.acquire_sliding_window_entry(
            item.key_for(NAMESPACE, "tokens", key), _UNBOUNDED, item.get_expiry(), cost
        )


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_get_limits_answers(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    clock = Clock(1_800_000_000.0 + rng.random() * 60)
    monkeypatch.setattr(time, "time", clock)
    limits_of = {"requests": [1, 3, 7], "tokens": [50, 100, 1000], "auth": [2, 5]}

    async def go() -> None:
        ours, theirs = RateLimiter("async+memory://"), Reference()
        assert ours.local is not None
        compared = 0
        for _ in range(600):
            clock.now += rng.choice([0.0, 0.0, rng.random() * 0.5, rng.random() * 7, rng.random() * 40])
            kind = rng.choice(list(limits_of))
            key, limit = rng.choice(["k1", "k2", "k3"]), rng.choice(limits_of[kind])
            cost = 1 if kind != "tokens" else rng.choice([1, 10, 30, 49, 120, 2000])
            op = rng.choice(["hit", "hit", "test", "window", "add"] if kind == "tokens" else ["hit", "test", "window"])
            if op == "hit":
                assert await ours.hit(kind, key, limit, cost) == await theirs.hit(kind, key, limit, cost)
            elif op == "test":
                assert await ours.test(kind, key, limit, cost) == await theirs.test(kind, key, limit, cost)
            elif op == "add":
                await ours.add(kind, key, limit, cost)
                await theirs.add(key, limit, cost)
            else:
                window = await ours.window(kind, key, limit)
                remaining, reset_s = await theirs.window(kind, key, limit)
                assert window.remaining == remaining, (kind, key, limit)
                if remaining < limit:  # an empty window's reset differs in limits itself (now, or an old entry's)
                    assert window.reset_s == pytest.approx(reset_s, abs=1e-6)
                    compared += 1
        assert compared > 20

    asyncio.run(go())


def test_windows_slide_and_refuse_without_consuming(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(1_800_000_010.0)  # 10 s into a fixed minute
    monkeypatch.setattr(time, "time", clock)
    windows = LocalWindows(EXPIRY_S)
    assert [windows.acquire("r", 2) for _ in range(3)] == [True, True, False]
    assert windows.moving_window("r") == (clock.now, 2)
    clock.now += 60.5  # both entries left the window
    assert windows.moving_window("r")[1] == 0 and windows.acquire("r", 2, amount=2)
    assert not windows.acquire("r", 5, amount=6)  # more than the limit: refused outright

    assert windows.acquire_sliding("t", 100, 60) and not windows.acquire_sliding("t", 100, 41)
    assert windows.sliding_window("t")[2] == 60
    clock.now += 60  # next fixed window, 10.5 s in: the previous 60 weigh 49.5/60 of themselves (49 rounded down)
    previous, previous_ttl, current, _ = windows.sliding_window("t")
    assert (previous, current) == (60, 0) and previous_ttl == pytest.approx(49.5)
    assert windows.acquire_sliding("t", 100, 51) and not windows.acquire_sliding("t", 100, 1)

    assert windows.incr("c") == 1 and windows.incr("c", -1) == 0 and windows.get("c") == 0


def test_idle_keys_are_swept_a_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(1_800_000_000.0)
    monkeypatch.setattr(time, "time", clock)
    windows = LocalWindows(EXPIRY_S)
    for i in range(1200):
        windows.acquire(f"addr-{i}", 5)
        windows.acquire_sliding(f"key-{i}", 100, 3)
    assert len(windows) == 2400
    clock.now += 121  # every entry and both fixed windows are over
    calls = 0
    while len(windows) > 1:
        windows.acquire("live", 5)
        calls += 1
        assert calls < 20
    # Each call looked at a bounded batch, and the key in use stays.
    assert calls >= 2400 // local_module.SWEEP_BATCH and windows.moving_window("live")[1] >= 1
    # A key still in its window is kept by a sweep.
    clock.now += local_module.SWEEP_INTERVAL_S + 1
    windows.acquire("live", 5)
    assert windows.moving_window("live")[1] >= 1 and len(windows) == 1
