"""How many connections one API listener holds open, and which one gives way when it is full.

A listener keeps at most `limit` connections. A new one beyond that takes the place of the
connection that has waited longest for a request (idle keep-alive, or a head still trickling
in): such a connection has nothing in progress, so closing it costs its client only a reconnect,
while a flood of idle sockets can never lock out a real caller. Only when every connection is
busy with a request is the newcomer refused. Pure bookkeeping: closing is the caller's `evict`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Slot:
    """One open connection: waiting for a request (evictable) or busy answering one."""

    evict: Callable[[], None]
    waiting_since: float | None  # None while a request is in progress

    def busy(self) -> None:
        self.waiting_since = None

    def waiting(self, now: float) -> None:
        self.waiting_since = now


@dataclass
class ConnectionSlots:
    limit: int
    evicted: int = 0
    refused: int = 0
    _open: list[Slot] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("a listener needs room for at least one connection")

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, evict: Callable[[], None], now: float) -> Slot | None:
        """A slot for a new connection, evicting the longest-waiting one if full; None to refuse.

        The new connection starts out waiting (for its first request)."""
        if len(self._open) >= self.limit:
            victim = self._longest_waiting()
            if victim is None:
                self.refused += 1
                return None
            self.release(victim)
            self.evicted += 1
            victim.evict()
        slot = Slot(evict, now)
        self._open.append(slot)
        return slot

    def release(self, slot: Slot) -> None:
        """The connection is gone (closing a slot twice is harmless)."""
        if slot in self._open:
            self._open.remove(slot)

    def _longest_waiting(self) -> Slot | None:
        waiting = [s for s in self._open if s.waiting_since is not None]
        return min(waiting, key=lambda s: s.waiting_since or 0.0, default=None)
