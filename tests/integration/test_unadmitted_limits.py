"""Two real libp2p hosts with gatekeepers on loopback, one of them flooded with idle TCP
connections from another loopback address: the flood holds a handful of places for a few
seconds at most, and a member with the token still dials in and is admitted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from swarm.net.gatekeeper import Gatekeeper
from swarm.net.host import build_host
from swarm.net.unadmitted import HANDSHAKE_TIMEOUT_S, PER_SOURCE, UnadmittedLimits
from swarm.trust.identity import Identity

pytestmark = pytest.mark.processes

ATTACKER_IP = "127.0.0.2"
FLOOD = 300  # more than py-libp2p's 250 inbound slots
KEY = b"k" * 32


@asynccontextmanager
async def member() -> AsyncIterator[tuple[IHost, Gatekeeper]]:
    host = build_host(Identity(Ed25519PrivateKey.new().to_bytes()))
    # As from other machines: loopback is normally exempt from the per-address cap.
    limits = UnadmittedLimits(exempt_loopback=False)
    limits.attach(host.get_network())

    async def on_admitted(peer: ID) -> None:
        pass

    gatekeeper = Gatekeeper(host, KEY, on_admitted)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        gatekeeper.install()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gatekeeper.run)
            try:
                yield host, gatekeeper
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await host.close()


async def idle_connection(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.bind((ATTACKER_IP, 0))
    await sock.connect(("127.0.0.1", port))
    return sock


async def closed_after(sock: trio.socket.SocketType, limit: float) -> float | None:
    """Seconds until the node closes `sock` (EOF or reset), or None if it stays open."""
    started = trio.current_time()
    with trio.move_on_after(limit):
        try:
            while await sock.recv(4096):
                pass
        except OSError:
            pass
        return trio.current_time() - started
    return None


def test_idle_flood_from_one_address_leaves_room_for_a_member() -> None:
    async def main() -> None:
        async with member() as (target, target_gk), member() as (joiner, joiner_gk):
            port = int(target.get_addrs()[0].value_for_protocol("tcp"))
            limits = target_gk._limits
            assert limits is not None
            flood = [await idle_connection(port) for _ in range(FLOOD)]
            closed: list[float | None] = [None] * FLOOD

            async def watch(i: int) -> None:
                closed[i] = await closed_after(flood[i], HANDSHAKE_TIMEOUT_S + 3)

            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for i in range(FLOOD):
                    nursery.start_soon(watch, i)
                await trio.sleep(0.5)
                assert limits.caps.held_by(ATTACKER_IP) == PER_SOURCE
                # A member dials in while the flood holds its places, and both admit it.
                await joiner.connect(PeerInfo(target.get_id(), target.get_addrs()))
                with trio.fail_after(10):
                    while not (joiner.get_id() in target_gk.admitted
                               and target.get_id() in joiner_gk.admitted):
                        await trio.sleep(0.05)
                joined_after = trio.current_time() - started
                # Admitted, it no longer counts; the flood still holds its places.
                assert limits.caps.unproven == PER_SOURCE
            for sock in flood:
                sock.close()

            quick = [t for t in closed if t is not None and t < 1.0]
            assert len(quick) == FLOOD - PER_SOURCE, closed
            # The few it let in are dropped when their handshake does not come.
            slow = sorted(t for t in closed if t is not None and t >= 1.0)
            assert len(slow) == PER_SOURCE, closed
            assert slow[0] > HANDSHAKE_TIMEOUT_S - 1 and slow[-1] < HANDSHAKE_TIMEOUT_S + 3
            with trio.fail_after(2):  # (the node may still be tidying up the last ones)
                while limits.caps.unproven:
                    await trio.sleep(0.05)
            assert joined_after < 10
            print(f"\nadmitted {joined_after:.2f} s into a flood of {FLOOD} idle connections")

    trio.run(main)
