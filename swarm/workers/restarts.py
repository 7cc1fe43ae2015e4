"""When a worker's RPC server that died unexpectedly is started again, and when to give up.

The node restarts its ggml RPC child after a short, growing backoff; a child that keeps dying
(more than `max_per_window` times in `window_s`) is a crash loop, and worker mode stops with
`CRASH_LOOP` rather than flapping the swarm's plans forever. Pure: times are the caller's
monotonic clock.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass

CRASH_LOOP = "worker stopped: the RPC server keeps crashing"


@dataclass(frozen=True)
class RestartPolicy:
    max_per_window: int = 5
    window_s: float = 60.0
    first_delay_s: float = 0.2  # well inside the 5 s in which a client expects it back
    max_delay_s: float = 3.0

    def recent(self, crashes: Sequence[float], now: float) -> list[float]:
        """The crashes that still count against the cap."""
        return [t for t in crashes if now - t < self.window_s]

    def delay(self, crashes: Sequence[float], now: float) -> float | None:
        """Seconds to wait before restarting, given every crash so far (the latest included);
        None: too many of late, stop."""
        count = len(self.recent(crashes, now))
        if count > self.max_per_window:
            return None
        return min(self.first_delay_s * 2 ** max(count - 1, 0), self.max_delay_s)


def exit_text(returncode: int | None) -> str:
    """How a process ended, as a user reads it: "signal SIGKILL", "exit status 1"."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"
