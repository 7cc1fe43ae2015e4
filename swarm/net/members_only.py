"""What py-libp2p itself tells a peer, held back until the gatekeeper has admitted it.

Three things answer any connected peer out of the box: gossipsub (our topic, every message on
it with its origin's peer id and size), identify (every protocol we speak) and multistream's
`ls` (the same list). An outsider that connects and stalls admission would learn the swarm's
members and activity from them. Here:
- `AdmittedPubsub` opens its gossip stream to a peer, and reads the peer's, only once the peer
  is admitted (waiting out the admission window, then giving up);
- `identify_for_members` answers identify likewise, and resets the stream for anyone who is not
  admitted by then;
- `swarm.net.host` answers multistream's `ls` with nothing, for everyone.
So an unadmitted peer learns only that a libp2p host is there (and, from the admission attempt
itself, that it wants a Covey token).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from libp2p.abc import IHost, INetStream, IPubsubRouter
from libp2p.custom_types import StreamHandlerFn
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.identify import identify_handler_for
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import Pubsub

from swarm.net.host import isolate, reset_quietly

log = logging.getLogger(__name__)


class Admissions(Protocol):
    """The gatekeeper's verdicts, as the services here need them."""

    def is_admitted(self, peer: ID) -> bool: ...

    async def wait_admitted(self, peer: ID) -> bool:
        """True once `peer` is admitted; False once it is refused, gone or out of time."""
        ...


class AdmittedPubsub(Pubsub):
    """Pubsub that neither sends to nor reads from a peer before its admission."""

    def __init__(self, host: IHost, router: IPubsubRouter, admissions: Admissions,
                 **options: Any) -> None:
        self._admissions = admissions
        super().__init__(host, router, **options)

    async def _handle_new_peer(self, peer_id: ID) -> None:
        # Every way the library adds a peer (the connection notifee, its retries,
        # ensure_peer_stream) comes through here; our hello would name the topic.
        if not await self._admissions.wait_admitted(peer_id):
            log.debug("no gossip with unadmitted peer %s", peer_id)
            return
        await super()._handle_new_peer(peer_id)

    async def stream_handler(self, stream: INetStream) -> None:
        # Waiting, not refusing at once: a member's stream may come just before our own
        # gatekeeper has finished admitting it.
        if not await self._admissions.wait_admitted(stream.muxed_conn.peer_id):
            await reset_quietly(stream)
            return
        await super().stream_handler(stream)


def identify_for_members(host: IHost, admissions: Admissions) -> StreamHandlerFn:
    """The library's identify handler, for admitted peers only."""
    answer = identify_handler_for(host, use_varint_format=True)

    async def handle(stream: INetStream) -> None:
        if not await admissions.wait_admitted(stream.muxed_conn.peer_id):
            await reset_quietly(stream)
            return
        await answer(stream)

    return handle


def install_identify(host: IHost, admissions: Admissions) -> None:
    host.set_stream_handler(IDENTIFY_PROTOCOL,
                            isolate("identify", identify_for_members(host, admissions)))
