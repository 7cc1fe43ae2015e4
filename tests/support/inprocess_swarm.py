"""Covey peers run inside the test's own trio loop, on loopback, wired as a node wires them.

`member` is a real host with the gatekeeper, the ledger's gossip and a guarded echo protocol
(a stand-in for any Covey service); `outsider` is a plain host of the same build that connects
and holds the member's admission attempt open without ever answering it: the peer that is
connected but unadmitted for a whole admission window. What each test sends or measures is
the test's own business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from swarm.exception_groups import first_leaf
from swarm.ledger.sync import LedgerSync
from swarm.net import admission
from swarm.net.gatekeeper import Gatekeeper
from swarm.net.host import build_host, isolate, read_exactly
from swarm.trust.identity import Identity
from swarm.trust.keys import SwarmKeys
from swarm.trust.token import new_token

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
ECHO_PROTOCOL = TProtocol("/covey-test/echo/1.0.0")


def run(test: Callable[[], Awaitable[None]], timeout_s: float = 60) -> None:
    """trio.run `test` with a deadline, raising the error that failed it rather than the
    nested exception groups the hosts' nurseries wrap it in."""

    async def bounded() -> None:
        with trio.fail_after(timeout_s):
            await test()

    try:
        trio.run(bounded)
    except BaseExceptionGroup as group:
        leaf = first_leaf(group, Exception)
        if leaf is None:
            raise
        raise leaf from group


def new_keys() -> SwarmKeys:
    return SwarmKeys.derive(new_token())


def new_identity() -> Identity:
    return Identity(Ed25519PrivateKey.new().to_bytes())


@dataclass
class Member:
    host: IHost
    gatekeeper: Gatekeeper
    sync: LedgerSync

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    @property
    def info(self) -> PeerInfo:
        return PeerInfo(self.host.get_id(), self.host.get_addrs())


async def _echo(stream: INetStream) -> None:
    await stream.write(await stream.read(1024))


async def _noop(peer: ID) -> None:
    return None


@asynccontextmanager
async def running(host: IHost) -> AsyncIterator[IHost]:
    async with host.run(listen_addrs=[LOOPBACK]):
        try:
            yield host
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await host.close()


@asynccontextmanager
async def member(keys: SwarmKeys) -> AsyncIterator[Member]:
    identity = new_identity()
    host = build_host(identity)
    gatekeeper = Gatekeeper(host, keys.admission_key, _noop)
    sync = LedgerSync(host, identity, keys.ledger_key, keys.gossip_topic, gatekeeper)
    async with running(host):
        gatekeeper.install()
        host.set_stream_handler(ECHO_PROTOCOL, gatekeeper.guard("echo", _echo))
        async with (background_trio_service(sync.pubsub), background_trio_service(sync.router),
                    trio.open_nursery() as nursery):
            nursery.start_soon(gatekeeper.run)
            nursery.start_soon(sync.run_gossip)
            yield Member(host, gatekeeper, sync)
            nursery.cancel_scope.cancel()


async def _stall(stream: INetStream) -> None:
    await read_exactly(stream, admission.HELLO_BYTES)
    await read_exactly(stream, 1)  # returns only when the member gives up on us


@asynccontextmanager
async def outsider() -> AsyncIterator[IHost]:
    """A host that answers a member's admission attempt with silence."""
    host = build_host(new_identity())
    host.set_stream_handler(TProtocol(admission.PROTOCOL_ID), isolate("admission", _stall))
    async with running(host):
        yield host


async def echo_works(host: IHost, peer: ID) -> bool:
    """Whether `peer` answers a guarded Covey protocol for `host` (i.e. admitted it)."""
    stream = await host.new_stream(peer, [ECHO_PROTOCOL])
    try:
        await stream.write(b"ping")
        return await stream.read(1024) == b"ping"
    except Exception:  # noqa: BLE001 - a reset is the answer "not admitted"
        return False
    finally:
        await stream.close()


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = trio.current_time() + timeout
    while not condition():
        if trio.current_time() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        await trio.sleep(0.02)


async def join(newcomer: Member, node: Member) -> None:
    """Connect `newcomer` to `node` and wait until each has admitted the other."""
    await newcomer.host.connect(node.info)
    await wait_for(lambda: newcomer.peer_id in node.gatekeeper.admitted
                   and node.peer_id in newcomer.gatekeeper.admitted, 5, "mutual admission")
