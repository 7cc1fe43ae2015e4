"""Finds stop sequences in streamed text without ever showing the user part of one.

Text that could still grow into a stop sequence is held back until the next piece decides.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add streamed text; return what can be shown now. After a stop, returns ""."""
        if self.stopped:
            return ""
        self._pending += text
        cut = _first_stop(self._pending, self._stops)
        if cut is not None:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = _longest_stop_prefix_suffix(self._pending, self._stops)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        """At the end of generation: whatever was held back is not a stop, show it."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of some stop sequence."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
