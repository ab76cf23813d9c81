"""Several limit operations in one Redis round trip, on the very data structures ``limits`` keeps.

Each script below runs ``limits``' own Lua for the operations it replaces (same keys, same algorithms, same order;
written once as the functions of ``_FUNCTIONS``), so a window written by one is read correctly by the other, and
running them as one script makes the sequence atomic where it used to be several round trips. The window figures are
turned into ``(remaining, reset_s)`` by the formulas of ``limits``' strategies (:func:`moving_window`,
:func:`sliding_window`).

- :data:`HIT_WINDOWS`: hit the requests window (moving window, cost 1), then, if it had room, the tokens window
  (sliding-window counter, the request's cost), then read both windows for the ``x-ratelimit-*`` headers: four
  round trips before.
- :data:`TEST_TOKENS_TAKE_SLOT`: test the requests and tokens windows (consumes nothing) and, if they have room,
  take a concurrency slot: three round trips before (four for a key's first slot).
- :data:`ADMIT`: both of the above in one round trip, all or nothing (tests, slot, hits, windows read), and
  :data:`UNDO_ADMIT` to take it back for a request that a later step (its quota) refuses.
- :data:`RELEASE_SLOT`: give the slot back, never below zero.
"""

from __future__ import annotations

import math
import time
from typing import Any

# Moving window (limits: acquire_moving_window.lua, then moving_window.lua) and sliding-window counter (limits:
# acquire_sliding_window.lua, then sliding_window.lua), with the arguments named; the scripts below are made of these
# functions.
_FUNCTIONS = """
local function shift(prev, cur, expiry_ms)
    local ttl = tonumber(redis.call('pttl', cur))
    if ttl > 0 and ttl < expiry_ms then
        redis.call('rename', cur, prev)
        redis.call('set', cur, 0, 'PX', ttl + expiry_ms)
    end
end
local function sliding(prev, cur, expiry_ms)
    local pc = tonumber(redis.call('get', prev)) or 0
    local pt = tonumber(redis.call('pttl', prev)) or 0
    local cc = tonumber(redis.call('get', cur)) or 0
    local ct = tonumber(redis.call('pttl', cur)) or 0
    if pt < 0 then pt = 0 end
    if ct < 0 then ct = 0 end
    return pc, pt, cc, ct
end
-- limits' moving-window test: the window is full when its limit-th newest entry is still in it
local function requests_full(list, rpm, now, expiry)
    local entry = redis.call('lindex', list, rpm - 1)
    return entry and tonumber(entry) >= now - expiry
end
-- limits' sliding-window test: weighted count < limit - cost + 1, the weighted count not rounded
local function tokens_fit(prev, cur, expiry_ms, tpm, amount)
    if amount > tpm then
        return false
    end
    shift(prev, cur, expiry_ms)
    local pc, pt, cc, ct = sliding(prev, cur, expiry_ms)
    return pc * pt / expiry_ms + cc < tpm - amount + 1
end
local function push_request(list, rpm, now, expiry)
    redis.call('lpush', list, now)
    redis.call('ltrim', list, 0, rpm - 1)
    redis.call('expire', list, expiry)
end
local function add_tokens(cur, amount, expiry_ms)
    if redis.call('exists', cur) == 1 then
        redis.call('incrby', cur, amount)
    else
        redis.call('set', cur, amount, 'PX', expiry_ms * 2)
    end
end
-- a concurrency slot, if one of `slots` is free (the counter expires only to heal slots of crashed replicas)
local function take_slot(counter, slots, ttl)
    local value = redis.call('incrby', counter, 1)
    if value == 1 then
        redis.call('expire', counter, ttl)
    end
    if value > slots then
        value = redis.call('incrby', counter, -1)
        if value == -1 then
            redis.call('expire', counter, ttl)
        end
        return false
    end
    return true
end
-- both windows as the headers need them: {1, oldest, count, previous count, previous pttl, current count, pttl}
local function read_windows(list, prev, cur, rpm, tpm, now, expiry)
    local out = {1, tostring(now), 0, 0, 0, 0, 0}
    if rpm > 0 then
        -- the oldest entry still in the window, by binary search (limits: moving_window.lua)
        local target = now - expiry
        local low, high, index = 0, rpm - 1, nil
        while low <= high do
            local mid = math.floor((low + high) / 2)
            local val = tonumber(redis.call('lindex', list, mid))
            if val and val >= target then
                index = mid
                low = mid + 1
            else
                high = mid - 1
            end
        end
        if index then
            out[2] = tostring(tonumber(redis.call('lindex', list, index)))
            out[3] = index + 1
        end
    end
    if tpm > 0 then
        shift(prev, cur, expiry * 1000)
        out[4], out[5], out[6], out[7] = sliding(prev, cur, expiry * 1000)
    end
    return out
end
"""

HIT_WINDOWS = (
    _FUNCTIONS
    + """
-- KEYS: requests list, tokens previous, tokens current. ARGV: now (s), expiry (s), rpm (0: none), tpm (0: none), cost.
local now = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2])
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local amount = tonumber(ARGV[5])
local expiry_ms = expiry * 1000
if rpm > 0 then
    if requests_full(KEYS[1], rpm, now, expiry) then
        return {2}
    end
    push_request(KEYS[1], rpm, now, expiry)
end
if tpm > 0 then
    if amount > tpm then
        return {3}
    end
    shift(KEYS[2], KEYS[3], expiry_ms)
    local pc, pt, cc, ct = sliding(KEYS[2], KEYS[3], expiry_ms)
    -- limits' acquire: the weighted count rounded down
    if math.floor(pc * pt / expiry_ms) + cc + amount > tpm then
        return {3}
    end
    add_tokens(KEYS[3], amount, expiry_ms)
end
return read_windows(KEYS[1], KEYS[2], KEYS[3], rpm, tpm, now, expiry)
"""
)
"""Returns ``{1, oldest, count, previous count, previous pttl, current count, current pttl}`` after hitting both
windows, or ``{2}`` (the requests window is full: nothing hit) or ``{3}`` (the tokens window is: only the requests
window was hit, as when the two hits were separate calls)."""

TEST_TOKENS_TAKE_SLOT = (
    _FUNCTIONS
    + """
-- KEYS: tokens previous, tokens current, concurrency counter, requests list.
-- ARGV: expiry (s), tpm (0: none), cost, slots (0: none), counter ttl (s), now (s), rpm (0: none).
local expiry = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local slots = tonumber(ARGV[4])
local rpm = tonumber(ARGV[7])
if rpm > 0 and requests_full(KEYS[4], rpm, tonumber(ARGV[6]), expiry) then
    return 4
end
if tpm > 0 and not tokens_fit(KEYS[1], KEYS[2], expiry * 1000, tpm, tonumber(ARGV[3])) then
    return 2
end
if slots > 0 and not take_slot(KEYS[3], slots, ARGV[5]) then
    return 3
end
return 1
"""
)
"""Returns 1 (the request and its tokens fit; the slot, if asked for, is taken), 4 (the requests window is full),
2 (the tokens window has no room) or 3 (no slot free); nothing is taken unless it returns 1."""

ADMIT = (
    _FUNCTIONS
    + """
-- KEYS: requests list, tokens previous, tokens current, concurrency counter.
-- ARGV: now (s), expiry (s), rpm (0: none), tpm (0: none), cost, slots (0: none), counter ttl (s).
local now = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2])
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local amount = tonumber(ARGV[5])
local slots = tonumber(ARGV[6])
-- the tests of TEST_TOKENS_TAKE_SLOT: nothing is written unless all pass
if rpm > 0 and requests_full(KEYS[1], rpm, now, expiry) then
    return {4}
end
if tpm > 0 and not tokens_fit(KEYS[2], KEYS[3], expiry * 1000, tpm, amount) then
    return {2}
end
if slots > 0 and not take_slot(KEYS[4], slots, ARGV[7]) then
    return {3}
end
-- the hits of HIT_WINDOWS (their own conditions follow from the tests above), then both windows read
if rpm > 0 then
    push_request(KEYS[1], rpm, now, expiry)
end
if tpm > 0 then
    add_tokens(KEYS[3], amount, expiry * 1000)
end
return read_windows(KEYS[1], KEYS[2], KEYS[3], rpm, tpm, now, expiry)
"""
)
"""Returns what :data:`HIT_WINDOWS` returns after taking the slot (if asked for) and hitting both windows, or
``{4}`` (the requests window is full), ``{2}`` (the tokens window has no room) or ``{3}`` (no slot free): nothing is
taken then. One round trip for what :data:`TEST_TOKENS_TAKE_SLOT` and :data:`HIT_WINDOWS` did in two."""

UNDO_ADMIT = """
-- KEYS: requests list, tokens current, concurrency counter.
-- ARGV: now (s) as ADMIT pushed it, rpm (0: none), cost (0: none), slot taken (0/1), counter ttl (s).
if tonumber(ARGV[2]) > 0 then
    redis.call('lrem', KEYS[1], 1, tonumber(ARGV[1]))
end
local amount = tonumber(ARGV[3])
if amount > 0 and redis.call('exists', KEYS[2]) == 1 then
    if redis.call('decrby', KEYS[2], amount) < 0 then
        redis.call('set', KEYS[2], 0, 'KEEPTTL')
    end
end
if tonumber(ARGV[4]) == 1 then
    if redis.call('incrby', KEYS[3], -1) < 0 then
        redis.call('set', KEYS[3], 0, 'EX', ARGV[5])
    end
end
return 1
"""
"""Takes back what :data:`ADMIT` took for a request refused afterwards (its quota): its entry in the requests
window, its tokens from the current tokens counter (never below zero; should the window have moved on in between,
the tokens stay counted in the previous one), and its slot."""

RELEASE_SLOT = """
-- KEYS: concurrency counter. ARGV: counter ttl (s).
local value = redis.call('incrby', KEYS[1], -1)
if value < 0 then
    -- the counter expired while the request ran: back to zero, not below
    redis.call('set', KEYS[1], 0, 'EX', ARGV[1])
end
return value
"""
"""Gives a concurrency slot back (never below zero): one round trip where ``limits``' ``incr`` took one to four."""


def moving_window(limit: int, expiry: int, oldest: Any, count: Any, now: float | None = None) -> tuple[int, float]:
    """The requests window (remaining, seconds to reset) from its oldest entry and count.

    As limits' ``MovingWindowRateLimiter.get_window_stats`` computes it.
    """
    reset = float(oldest) + expiry
    remaining = limit - int(count)
    return max(0, remaining), max(0.0, reset - (now or time.time()))


def sliding_window(limit: int, expiry: int, counts: list[Any]) -> tuple[int, float]:
    """The tokens window (remaining, seconds to reset) from its counters as the script returns them.

    ``counts``: previous count, previous pttl (ms), current count, current pttl (ms).
    """
    return sliding_window_stats(
        limit,
        expiry,
        int(counts[0] or 0),
        max(0.0, float(counts[1] or 0)) / 1000,
        int(counts[2] or 0),
        max(0.0, float(counts[3] or 0)) / 1000,
    )


def sliding_window_stats(
    limit: int,
    expiry: int,
    previous_count: int,
    previous_expires_in: float,
    current_count: int,
    current_expires_in: float,
) -> tuple[int, float]:
    """The tokens window (remaining, seconds to reset) from its counters and their times to live in seconds.

    As limits' ``SlidingWindowCounterRateLimiter.get_window_stats`` computes it.
    """
    weighted = previous_count * previous_expires_in / expiry + current_count
    remaining = max(0, limit - math.floor(weighted))
    if not (previous_count or current_count):
        return remaining, 0.0
    previous_reset_in, current_reset_in = math.inf, math.inf
    if previous_count:
        previous_reset_in = previous_expires_in % (expiry / previous_count)
    if current_count:
        current_reset_in = current_expires_in % expiry
    return remaining, max(0.0, min(previous_reset_in, current_reset_in))
