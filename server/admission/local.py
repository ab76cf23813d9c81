"""In-process windows for one replica: ``limits``' moving window and sliding-window counter, without its storage.

With no shared storage (``RATELIMIT_STORAGE_URI=memory://``) every limit lives in this process and the event loop is
the only writer, so a check and its update need neither a lock nor an ``await``. ``limits``' asynchronous memory
storage pays for both on every call (an ``asyncio.Lock`` per key, a coroutine per step, wrappers and dataclasses):
four such calls per request were a fifth of the chat route's cost. The answers here are ``limits``' answers
(``tests/unit/test_local_windows.py`` replays random operations against its memory storage and compares):

- Moving window (requests, failed key checks): exact; one timestamp per unit, oldest first, dropped when they leave
  the window. Appending is O(1) (``limits`` inserts at the front of a list, O(limit)).
- Sliding-window counter (tokens): a counter per fixed window of ``expiry`` seconds (aligned as ``limits`` aligns
  them); the previous window's count weighs in proportion to how much of it still overlaps the sliding window.
- Counters (concurrency slots): plain integers, dropped at zero. They never expire: in one process a slot is held
  by a request that is still running (the shared storage's expiry heals slots leaked by crashed replicas).

Idle keys are swept a few hundred at a time, at most every :data:`SWEEP_INTERVAL_S`, so memory follows the keys
active in the last window and no call pays for a sweep of every key.
"""

from __future__ import annotations

import math
import time
from collections import deque

SWEEP_INTERVAL_S = 5.0
SWEEP_BATCH = 512
"""Keys examined per call while a sweep is under way."""


class _Sliding:
    """The counts of a key's current and previous fixed windows (``index``: the current window's number)."""

    __slots__ = ("current", "index", "previous")

    def __init__(self, index: int) -> None:
        self.index = index
        self.previous = 0
        self.current = 0

    def roll(self, index: int) -> None:
        """Move to window ``index`` (the counts of windows before the previous one are gone)."""
        if index == self.index:
            return
        self.previous = self.current if index == self.index + 1 else 0
        self.current = 0
        self.index = index


class LocalWindows:
    """Moving windows, sliding-window counters and counters of one process (synchronous; one event loop).


    Args:
        expiry: Every window's length in seconds.
    """

    def __init__(self, expiry: int) -> None:
        self.expiry = expiry
        self._moving: dict[str, deque[float]] = {}
        self._sliding: dict[str, _Sliding] = {}
        self._counters: dict[str, int] = {}
        self._next_sweep = 0.0
        self._sweep_keys: list[tuple[bool, str]] = []

    # -- moving window ------------------------------------------------------------------------------------
    def _events(self, key: str, now: float) -> deque[float] | None:
        events = self._moving.get(key)
        if events is not None:
            cutoff = now - self.expiry
            while events and events[0] < cutoff:
                events.popleft()
        return events

    def acquire(self, key: str, limit: int, amount: int = 1) -> bool:
        """Add ``amount`` entries to the moving window if it then holds at most ``limit``."""
        if amount > limit:
            return False
        now = time.time()
        self._maybe_sweep(now)
        events = self._events(key, now)
        if events is None:
            events = self._moving[key] = deque()
        if len(events) + amount > limit:
            return False
        if amount == 1:
            events.append(now)
        else:
            events.extend([now] * amount)
        return True

    def moving_window(self, key: str) -> tuple[float, int]:
        """(oldest entry's time, entries) in the moving window; (now, 0) when it is empty."""
        now = time.time()
        events = self._events(key, now)
        if not events:
            return now, 0
        return events[0], len(events)

    # -- sliding-window counter ---------------------------------------------------------------------------
    def sliding_window(self, key: str) -> tuple[int, float, int, float]:
        """(previous count, seconds it still weighs, current count, seconds the current counter lives)."""
        return self._sliding_info(self._sliding.get(key), time.time())

    def _sliding_info(self, state: _Sliding | None, now: float) -> tuple[int, float, int, float]:
        expiry = self.expiry
        previous = current = 0
        if state is not None:
            state.roll(int(now / expiry))
            previous, current = state.previous, state.current
        previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry if previous else 0.0
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous, previous_ttl, current, current_ttl

    def acquire_sliding(self, key: str, limit: int, amount: int = 1) -> bool:
        """Count ``amount`` if the weighted count (rounded down) plus ``amount`` stays within ``limit``."""
        if amount > limit:
            return False
        now = time.time()
        self._maybe_sweep(now)
        state = self._sliding.get(key)
        previous, previous_ttl, current, _ = self._sliding_info(state, now)
        if math.floor(previous * previous_ttl / self.expiry + current) + amount > limit:
            return False
        if state is None:
            state = self._sliding[key] = _Sliding(int(now / self.expiry))
        state.current += amount
        return True

    # -- counters -----------------------------------------------------------------------------------------
    def get(self, key: str) -> int:
        return self._counters.get(key, 0)

    def incr(self, key: str, amount: int = 1) -> int:
        """Add ``amount`` (may be negative) and return the new value; a counter at zero is dropped."""
        value = self._counters.get(key, 0) + amount
        if value:
            self._counters[key] = value
        else:
            self._counters.pop(key, None)
        return value

    # -- memory ---------------------------------------------------------------------------------------------
    def _maybe_sweep(self, now: float) -> None:
        """Drop a batch of idle keys; a new round starts ``SWEEP_INTERVAL_S`` after the last one ended."""
        if now < self._next_sweep:
            return
        if not self._sweep_keys:
            self._sweep_keys = [(True, key) for key in self._moving] + [(False, key) for key in self._sliding]
        batch, self._sweep_keys = self._sweep_keys[-SWEEP_BATCH:], self._sweep_keys[:-SWEEP_BATCH]
        index = int(now / self.expiry)
        for moving, key in batch:
            if moving:
                events = self._moving.get(key)
                if events is not None and (not events or events[-1] < now - self.expiry):
                    del self._moving[key]  # its newest entry left the window
            else:
                state = self._sliding.get(key)
                if state is not None:
                    state.roll(index)
                    if not (state.previous or state.current):
                        del self._sliding[key]
        if not self._sweep_keys:
            self._next_sweep = now + SWEEP_INTERVAL_S

    def __len__(self) -> int:
        """Keys held (windows and counters)."""
        return len(self._moving) + len(self._sliding) + len(self._counters)
