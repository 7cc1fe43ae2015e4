"""Inbound libp2p connections until admission: capped per source address and in all, and
closed when admission does not come in time.

py-libp2p holds an inbound slot (250 in all) for every accepted TCP connection, from before
the Noise handshake until the connection ends, so idle connections from outsiders could take
every slot a member needs. The host's inbound handler (`swarm.net.host`) asks the
`UnadmittedLimits` of its swarm before doing any work for a connection and closes a refused
one at once; the gatekeeper says which peers are admitted, and an admitted connection stops
counting. A host without a gatekeeper (tests, benchmarks) counts a connection only until its
handshake ends.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetwork
from libp2p.peer.id import ID

from swarm.net.source_caps import SourceCaps, Ticket

log = logging.getLogger(__name__)

PER_SOURCE = 8  # unadmitted connections one address may hold (loopback: no per-address cap)
TOTAL = 64  # unadmitted connections in all, well below py-libp2p's 250 inbound slots
HANDSHAKE_TIMEOUT_S = 5.0  # TCP accept to the end of Noise and Yamux negotiation
ADMISSION_TIMEOUT_S = 5.0  # the gatekeeper's three-message exchange
_GRACE_S = 2.0  # past the gatekeeper's own timeout, before the host closes the connection

_limits: weakref.WeakKeyDictionary[INetwork, UnadmittedLimits] = weakref.WeakKeyDictionary()


class UnadmittedLimits:
    def __init__(self, per_source: int = PER_SOURCE, total: int = TOTAL,
                 window_s: float = ADMISSION_TIMEOUT_S + _GRACE_S,
                 exempt_loopback: bool = True) -> None:
        # Loopback is exempt from the per-address cap: nodes on one machine (tests, several
        # data directories) share 127.0.0.1; the total cap still holds.
        self.caps = SourceCaps(per_source, total, exempt_loopback)
        self.window_s = window_s
        self._is_admitted: Callable[[ID], bool] | None = None
        self._changed = trio.Event()

    def attach(self, network: INetwork) -> None:
        _limits[network] = self

    def watch(self, is_admitted: Callable[[ID], bool]) -> None:
        """From now on a connection counts until `is_admitted` says yes (the gatekeeper)."""
        self._is_admitted = is_admitted

    def admitted(self) -> None:
        """Some peer was just admitted: wake the connections waiting for their admission."""
        self._changed.set()
        self._changed = trio.Event()

    def enter(self, address: tuple[str, int] | None) -> Ticket | None:
        ticket = self.caps.enter(address[0] if address else "unknown")
        if ticket is None:
            log.debug("refused an inbound connection from %s: %d unadmitted already",
                      address, self.caps.unproven)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        self.caps.leave(ticket)

    async def hold(self, ticket: Ticket, peer: ID,
                   close: Callable[[], Awaitable[None]]) -> None:
        """Count `ticket` until `peer` is admitted; call `close` if that takes too long."""
        with trio.move_on_after(self.window_s):
            while self._is_admitted is not None and not self._is_admitted(peer):
                await self._changed.wait()
            self.leave(ticket)
            return
        log.info("closing the connection of %s: not admitted within %.0f s", peer, self.window_s)
        await close()


def limits_of(network: INetwork) -> UnadmittedLimits | None:
    return _limits.get(network)
