"""A peer that connects and stalls admission learns nothing of the swarm from gossip, identify
or multistream `ls`, while the members beside it gossip as before. Real hosts in this process,
on loopback."""

from __future__ import annotations

import pytest
import trio
from libp2p.abc import IMultiselectCommunicator
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from swarm.net.host import build_host
from tests.support.inprocess_swarm import (
    Member,
    join,
    member,
    new_identity,
    new_keys,
    outsider,
    run,
)

pytestmark = pytest.mark.processes

TTL_S = 600.0


def has_entry(reader: Member, writer: Member, key: str) -> bool:
    return reader.sync.ledger.get(writer.peer_id.to_base58(), key) is not None


def test_stalled_outsider_gets_no_gossip_and_no_protocols_while_members_gossip() -> None:
    async def main() -> None:
        keys = new_keys()
        topic = keys.gossip_topic
        async with member(keys) as a, member(keys) as b, outsider() as spy:
            # The worst case: the spy knows the topic and listens on it like a member would.
            spy_pubsub = Pubsub(spy, GossipSub([PROTOCOL_ID_V12], degree=6, degree_low=4,
                                               degree_high=12, heartbeat_interval=1))
            received: list[bytes] = []
            async with (background_trio_service(spy_pubsub),
                        background_trio_service(spy_pubsub.router),  # type: ignore[arg-type]
                        trio.open_nursery() as nursery):
                await spy_pubsub.wait_until_ready()
                subscription = await spy_pubsub.subscribe(topic)

                async def listen() -> None:
                    while True:
                        received.append((await subscription.get()).data)

                nursery.start_soon(listen)
                await spy.connect(a.info)
                await join(b, a)
                await a.sync.pubsub.wait_for_subscription(b.peer_id, topic, timeout=5)
                await b.sync.pubsub.wait_for_subscription(a.peer_id, topic, timeout=5)
                for i in range(3):
                    await a.sync.publish(f"from-a-{i}", {"i": i}, TTL_S)
                    await b.sync.publish(f"from-b-{i}", {"i": i}, TTL_S)
                # No pull runs here: what the members have of each other came by gossip.
                with trio.fail_after(5):
                    while not all(has_entry(a, b, f"from-b-{i}") and has_entry(b, a, f"from-a-{i}")
                                  for i in range(3)):
                        await trio.sleep(0.05)
                await trio.sleep(1.5)  # a gossipsub heartbeat or so, for IHAVE and the like
                identify_bytes = await read_identify(spy, a)
                # Still inside its admission window, so everything above had the chance to leak.
                assert spy.get_network().get_connections(a.peer_id), "spy dropped too early"
                assert received == []
                assert spy_pubsub.peer_topics == {}, "the spy learned who is on which topic"
                assert identify_bytes == 0
                protocols = [str(p) for p in spy.get_peerstore().get_protocols(a.peer_id)]
                assert not [p for p in protocols if "covey" in p or "meshsub" in p], protocols
                nursery.cancel_scope.cancel()

    run(main)


async def read_identify(spy: object, node: Member) -> int:
    """Bytes an explicit identify request gets within a second (the node answers members)."""
    stream = await spy.new_stream(node.peer_id, [IDENTIFY_PROTOCOL])  # type: ignore[attr-defined]
    got = 0
    with trio.move_on_after(1.0):
        try:
            while chunk := await stream.read(4096):
                got += len(chunk)
        except Exception:  # noqa: BLE001 - a reset is fine: it carries nothing
            pass
    await stream.reset()
    return got


def test_members_get_identify_once_admitted() -> None:
    async def main() -> None:
        keys = new_keys()
        async with member(keys) as a, member(keys) as b:
            await join(b, a)
            stream = await b.host.new_stream(a.peer_id, [IDENTIFY_PROTOCOL])
            with trio.fail_after(5):
                reply = await stream.read(65536)
            assert b"/covey/" in reply

    run(main)


class _Script(IMultiselectCommunicator):
    def __init__(self, commands: list[str]) -> None:
        self.commands = commands
        self.written: list[str] = []

    async def read(self) -> str:
        return self.commands.pop(0)

    async def write(self, msg_str: str) -> None:
        self.written.append(msg_str)


def test_multistream_ls_lists_nothing_but_protocols_still_negotiate() -> None:
    async def main() -> None:
        host = build_host(new_identity())
        script = _Script(["/multistream/1.0.0", "ls", str(IDENTIFY_PROTOCOL)])
        protocol, _ = await host.get_mux().negotiate(script)
        assert protocol == IDENTIFY_PROTOCOL
        assert script.written == ["/multistream/1.0.0", "na", str(IDENTIFY_PROTOCOL)]

    run(main)
