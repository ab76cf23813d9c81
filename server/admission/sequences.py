"""Per-key bound on sequences in flight, so one tenant cannot fill the engine's shared queue.

A request holds as many sequences as it asks the engine (or an upstream) to generate: ``n`` for each prompt. A
key's sequences running and queued on this replica are counted here from admission until the request settles;
past ``limit`` the request is refused with 429 before it reaches the engine. The queue (``MAX_QUEUE_SIZE``) is
shared by every tenant and a full queue answers everyone 503, so the bound is a share of it, not a rate: a key
that stays within it leaves room for the others.

The count is per replica and in memory, like the engine queue it protects (each replica has its own).
"""

from __future__ import annotations


class SequenceBudget:
    """Sequences in flight per key id, at most ``limit`` each.

    Args:
        limit: Most sequences one key may have running or queued at once on this replica.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the sequence limit must be at least 1, got {limit}")
        self.limit = limit
        self._held: dict[str, int] = {}

    def held(self, key_id: str) -> int:
        """Sequences ``key_id`` has in flight now."""
        return self._held.get(key_id, 0)

    def take(self, key_id: str, sequences: int) -> bool:
        """Count ``sequences`` for ``key_id`` if they fit (no ``await``: check and update are one step)."""
        if sequences <= 0:  # a request that runs no model holds none (and leaves no entry behind)
            return True
        held = self._held.get(key_id, 0)
        if held + sequences > self.limit:
            return False
        self._held[key_id] = held + sequences
        return True

    def give(self, key_id: str, sequences: int) -> None:
        """Return sequences taken with :meth:`take` (the entry is dropped at zero, so idle keys cost nothing)."""
        left = self._held.get(key_id, 0) - sequences
        if left > 0:
            self._held[key_id] = left
        else:
            self._held.pop(key_id, None)
