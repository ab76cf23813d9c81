"""Stop-string matching over a stream of text deltas.

Stop strings can span token boundaries, so text that could still turn into a stop string is held back until
it either completes one (it is dropped, with everything after it) or can no longer (it is released).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Finds the earliest stop string in streamed text and withholds possible stop prefixes.

    Args:
        stops: Non-empty stop strings.
    """

    __slots__ = ("_held", "_max_len", "_stopped", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        if not stops or any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(dict.fromkeys(stops))
        self._max_len = max(len(s) for s in self._stops)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once a stop string was found; later input is ignored."""
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return ``(text safe to emit, whether a stop string was hit)``."""
        if self._stopped:
            return "", True
        buf = self._held + text
        cut = -1
        for stop in self._stops:
            pos = buf.find(stop)
            if pos != -1 and (cut == -1 or pos < cut):
                cut = pos
        if cut != -1:
            self._held = ""
            self._stopped = True
            return buf[:cut], True
        keep = self._held_suffix_len(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release held text at the end of generation (it never became a stop string)."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _held_suffix_len(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string; every position where a stop
        # could still start lies inside it, so everything before it is safe to release.
        for n in range(min(len(buf), self._max_len - 1), 0, -1):
            tail = buf[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0
