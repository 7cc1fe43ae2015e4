"""Caps on connections that have proved nothing yet, per source address and in all.

Pure bookkeeping, shared by the libp2p host (until admission) and the direct TLS path (until
a lease secret): an outsider opening idle connections from one address holds at most
`per_source` of them, and all outsiders together at most `total`, so the slots members need
stay free. A connection stops counting once it proves itself, so members behind one NAT
address are never limited by it. Not thread-safe: callers that share it hold their own lock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


def source_of(host: str) -> str:
    """The address connections are counted under: an IPv4 address as it is (IPv4-mapped IPv6
    included), an IPv6 address as its /64 (one machine or network usually holds a whole /64),
    anything unparsable as the text itself."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def is_loopback(source: str) -> bool:
    try:
        return ipaddress.ip_network(source, strict=False).is_loopback
    except ValueError:
        return False


@dataclass
class Ticket:
    """One counted connection; `SourceCaps.leave` it once (more calls do nothing)."""

    source: str
    held: bool = True


@dataclass
class SourceCaps:
    """How many unproven connections each source holds. With `exempt_loopback`, connections
    from this machine itself count only toward `total`."""

    per_source: int
    total: int
    exempt_loopback: bool = False
    _counts: dict[str, int] = field(default_factory=dict)
    _total: int = 0

    def enter(self, host: str) -> Ticket | None:
        """Count a new connection from `host`; None means refuse it (close it at once)."""
        source = source_of(host)
        held = self._counts.get(source, 0)
        over_source = held >= self.per_source and not (self.exempt_loopback
                                                       and is_loopback(source))
        if over_source or self._total >= self.total:
            return None
        self._counts[source] = held + 1
        self._total += 1
        return Ticket(source)

    def leave(self, ticket: Ticket) -> None:
        """The connection proved itself or ended: it no longer counts."""
        if not ticket.held:
            return
        ticket.held = False
        self._total -= 1
        left = self._counts[ticket.source] - 1
        if left:
            self._counts[ticket.source] = left
        else:
            del self._counts[ticket.source]

    @property
    def unproven(self) -> int:
        return self._total

    def held_by(self, host: str) -> int:
        return self._counts.get(source_of(host), 0)
