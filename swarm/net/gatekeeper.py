"""The gatekeeper: runs admission on every new connection and guards every Covey protocol.

On each connection both sides start the challenge-response in `swarm.net.admission`. A peer is
admitted once an exchange with it completes; until then every guarded handler resets its
streams without a byte of answer. A peer that fails (wrong token, garbage, no Covey at all,
or silence past `ADMISSION_TIMEOUT_S`) is disconnected and kept out for `ban_s` seconds.
Until admitted, a peer's inbound connection counts toward the host's caps on unadmitted
connections (`swarm.net.unadmitted`); the gatekeeper tells them when it is admitted. Identify
answers admitted peers only (see `swarm.net.members_only`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from swarm.net import admission, members_only
from swarm.net.host import StreamHandler, isolate, read_exactly, reset_quietly
from swarm.net.unadmitted import ADMISSION_TIMEOUT_S, limits_of

log = logging.getLogger(__name__)


class Gatekeeper:
    def __init__(
        self,
        host: IHost,
        admission_key: bytes,
        on_admitted: Callable[[ID], Awaitable[None]],
        ban_s: float = 60.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.host = host
        self._key = admission_key
        self._on_admitted = on_admitted
        self._ban_s = ban_s
        self._clock = clock
        self.admitted: set[ID] = set()
        self._banned_until: dict[ID, float] = {}
        self._in_progress: set[ID] = set()
        self._verdicts = trio.Event()  # set, and replaced, whenever `admitted` may have changed
        self._new_conns: trio.MemorySendChannel[ID]
        self._new_conns, self._conn_events = trio.open_memory_channel[ID](1024)
        # Before the host runs, so no inbound connection stops counting before its admission.
        self._limits = limits_of(host.get_network())
        if self._limits is not None:
            self._limits.watch(self.admitted.__contains__)

    def install(self) -> None:
        self.host.set_stream_handler(
            TProtocol(admission.PROTOCOL_ID), isolate("admission", self._respond)
        )
        self.host.get_network().register_notifee(_Events(self))
        members_only.install_identify(self.host, self)

    def guard(self, name: str, handler: StreamHandler) -> StreamHandler:
        """`handler` for admitted peers only; everyone else's stream is reset unanswered."""

        async def guarded(stream: INetStream) -> None:
            if stream.muxed_conn.peer_id not in self.admitted:
                log.debug("refused %s stream from unadmitted %s", name, stream.muxed_conn.peer_id)
                await reset_quietly(stream)
                return
            await handler(stream)

        return isolate(name, guarded)

    def is_admitted(self, peer: ID) -> bool:
        return peer in self.admitted

    async def wait_admitted(self, peer: ID) -> bool:
        """True once `peer` is admitted; False as soon as it is refused or gone, or once the
        admission window has passed."""
        with trio.move_on_after(ADMISSION_TIMEOUT_S):
            while peer not in self.admitted:
                if self.is_banned(peer) or not self._connected(peer):
                    return False
                await self._verdicts.wait()
        return peer in self.admitted

    def _verdict_changed(self) -> None:
        self._verdicts.set()
        self._verdicts = trio.Event()

    def is_banned(self, peer: ID) -> bool:
        until = self._banned_until.get(peer)
        if until is None:
            return False
        if self._clock() >= until:
            del self._banned_until[peer]
            return False
        return True

    async def run(self) -> None:
        """Admit each newly connected peer, one task per peer."""
        async with trio.open_nursery() as nursery:
            async for peer in self._conn_events:
                if peer in self._in_progress or peer in self.admitted:
                    continue
                if self.is_banned(peer):
                    nursery.start_soon(self._disconnect, peer)
                    continue
                self._in_progress.add(peer)
                nursery.start_soon(self._admit, peer)

    async def _admit(self, peer: ID) -> None:
        try:
            with trio.fail_after(ADMISSION_TIMEOUT_S):
                await self._initiate(peer)
        except (admission.AdmissionFailed, trio.TooSlowError) as exc:
            await self.refuse(peer, _why(exc))
        except Exception as exc:  # noqa: BLE001 - no Covey on the other side, or it vanished
            if self._connected(peer):
                await self.refuse(peer, f"no Covey admission ({type(exc).__name__})")
        else:
            await self._mark_admitted(peer)
        finally:
            self._in_progress.discard(peer)

    async def _initiate(self, peer: ID) -> None:
        stream = await self.host.new_stream(peer, [TProtocol(admission.PROTOCOL_ID)])
        try:
            nonce_i = admission.new_nonce()
            await stream.write(admission.hello(nonce_i))
            reply = await read_exactly(stream, admission.CHALLENGE_BYTES)
            nonce_r, their_proof = reply[: admission.NONCE_BYTES], reply[admission.NONCE_BYTES :]
            me, them = self.host.get_id().to_bytes(), peer.to_bytes()
            admission.check(
                admission.proof(self._key, "responder", me, them, nonce_i, nonce_r), their_proof
            )
            await stream.write(admission.proof(self._key, "initiator", me, them, nonce_i, nonce_r))
            if await read_exactly(stream, 1) != admission.ADMITTED:
                raise admission.AdmissionFailed("the peer did not admit us")
        except EOFError:
            raise admission.AdmissionFailed("the peer closed the admission stream") from None
        finally:
            await reset_quietly(stream)

    async def _respond(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        if self.is_banned(peer):
            await reset_quietly(stream)
            return
        try:
            with trio.fail_after(ADMISSION_TIMEOUT_S):
                nonce_i = admission.parse_hello(await read_exactly(stream, admission.HELLO_BYTES))
                nonce_r = admission.new_nonce()
                them, me = peer.to_bytes(), self.host.get_id().to_bytes()
                mine = admission.proof(self._key, "responder", them, me, nonce_i, nonce_r)
                await stream.write(nonce_r + mine)
                theirs = await read_exactly(stream, admission.MAC_BYTES)
                admission.check(
                    admission.proof(self._key, "initiator", them, me, nonce_i, nonce_r), theirs
                )
                await stream.write(admission.ADMITTED)
        except (admission.AdmissionFailed, trio.TooSlowError, EOFError) as exc:
            await reset_quietly(stream)
            await self.refuse(peer, _why(exc))
            return
        await stream.close()
        await self._mark_admitted(peer)

    async def _mark_admitted(self, peer: ID) -> None:
        if peer in self.admitted or not self._connected(peer):
            return
        self.admitted.add(peer)
        if self._limits is not None:
            self._limits.admitted()
        self._verdict_changed()
        log.info("admitted peer %s", peer)
        await self._on_admitted(peer)

    async def refuse(self, peer: ID, why: str) -> None:
        """Disconnect `peer` and keep it out for a while."""
        log.warning("refused peer %s: %s", peer, why)
        self.admitted.discard(peer)
        self._banned_until[peer] = self._clock() + self._ban_s
        self._verdict_changed()
        await self._disconnect(peer)

    async def _disconnect(self, peer: ID) -> None:
        try:
            await self.host.disconnect(peer)
        except Exception as exc:  # noqa: BLE001 - already gone is fine
            log.debug("disconnect %s: %r", peer, exc)

    def _connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().get_connections(peer))

    def connection_opened(self, peer: ID) -> None:
        try:
            self._new_conns.send_nowait(peer)
        except trio.WouldBlock:
            log.warning("too many new connections at once; %s waits for the next sync", peer)

    def connection_closed(self, peer: ID) -> None:
        if not self._connected(peer):
            self.admitted.discard(peer)
            self._verdict_changed()


def _why(exc: Exception) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"admission took over {ADMISSION_TIMEOUT_S:.0f} s"
    return str(exc) or f"the admission stream ended early ({type(exc).__name__})"


class _Events(INotifee):
    """Forwards libp2p's connection events; runs inside the swarm, so it must not block."""

    def __init__(self, gatekeeper: Gatekeeper) -> None:
        self._gatekeeper = gatekeeper

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._gatekeeper.connection_opened(conn.muxed_conn.peer_id)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._gatekeeper.connection_closed(conn.muxed_conn.peer_id)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass
