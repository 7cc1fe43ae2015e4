"""Bulk transfers to or from a peer reached only through a relay (a model copy, a worker's
share of a model's weights): whether to start one, and the plain words saying why not.

A relay ends a circuit after a number of bytes (both directions together) and shares a few
MiB/s among all its circuits. A transfer that the cap would cut is not started: the user is
told the peer is reachable only through a relay, and Covey waits for a direct path (hole
punching, UPnP, the peer moving) and starts once there is one. A transfer the cap allows still
goes through the relay, slowly, and the user is told that too.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.sizes import human_bytes

HEADROOM = 0.9  # the circuit also carries admission, the ledger and the requests themselves


@dataclass(frozen=True)
class Relayed:
    """A peer this node reaches only through a relay: the relay's name, and the bytes one
    circuit carries before the relay ends it (None: the relay named no cap)."""

    relay: str
    circuit_bytes: int | None


@dataclass(frozen=True)
class BulkPath:
    go: bool  # False: wait for a direct path
    notice: str | None = None  # for the user; None on a direct path
    why: str | None = None  # why it waits, after the peer's name ("NAME is …", "NAME (…)")


def bulk_path(peer: str, relayed: Relayed | None, need: int, what: str) -> BulkPath:
    """Whether `what` (`need` bytes, e.g. "the copy") may start with `peer` now."""
    if relayed is None:
        return BulkPath(True)
    through = f"reachable only through a relay ({relayed.relay})"
    cap = relayed.circuit_bytes
    if cap is not None and need > cap * HEADROOM:
        why = (f"{through}, which ends a connection after {human_bytes(cap)}: {what} "
               f"({human_bytes(need)}) would be cut short there")
        return BulkPath(False, f"{peer} is {why}. Waiting for a direct path to {peer}; it "
                               "starts as soon as there is one.", why)
    return BulkPath(True, f"{peer} is {through}: {what} goes that way, slowly")
