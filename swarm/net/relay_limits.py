"""What one relaying node lends the swarm: its caps on reservations, circuits, bytes, time and
rate. Apart from the relay itself (swarm/net/relay.py) so that settings and the command line
read the defaults without loading the network stack."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class RelayLimits:
    """What one relaying node lends the swarm."""

    max_reservations: int = 32
    reservation_s: float = 600.0
    max_circuits: int = 32
    max_circuits_per_peer: int = 4  # as either end
    circuit_bytes: int = 256 * MiB  # both directions together; then the circuit is reset
    circuit_s: float = 3600.0
    rate_bytes_s: float = 8 * MiB  # all circuits together
    opens_per_min: float = 30.0  # circuits one member may open per minute, after a burst of
    opens_burst: int = 8
