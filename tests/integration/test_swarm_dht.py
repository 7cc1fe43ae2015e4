"""Across networks: two nodes in two subnets, joined only by a router that also runs the
bootstrap node. mDNS cannot cross the router, so only the DHT rendezvous can bring them
together; the test checks they end up connected to each other directly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from swarm.trust.token import new_token
from tests.support.netns import Netns, netns_skip_reason
from tests.support.node_harness import RunningNode, start_node, wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]


def direct_peers(node: RunningNode) -> set[str]:
    return {p["name"] for p in node.peers() if p["connected"] and p["online"]}


def two_subnets(
    netns: Netns, workdir: Path, subnet: int, *leaf_args: str
) -> tuple[RunningNode, RunningNode, RunningNode]:
    """The bootstrap node on the router, then leaf a (left) and leaf c (right), each given
    only the router's address on its own side."""
    token = new_token().encode()
    left, right = netns.add("left"), netns.add("right")
    router = netns.router(left, right, f"10.{subnet}.0.0/24", f"10.{subnet + 1}.0.0/24")
    boot = start_node(netns, router.ns, token, "boot", workdir,
                      "--listen", "/ip4/0.0.0.0/tcp/4001")
    leaves = [
        start_node(netns, ns, token, name, workdir, *leaf_args,
                   "--bootstrap", f"/ip4/{gateway}/tcp/4001/p2p/{boot.peer_id}")
        for ns, name, gateway in ((left, "a", router.gateway_a), (right, "c", router.gateway_b))
    ]
    return boot, leaves[0], leaves[1]


def test_two_subnets_meet_through_the_dht(tmp_path: Path) -> None:
    with Netns() as netns:
        started = time.monotonic()
        boot, a, c = two_subnets(netns, tmp_path, 91)
        nodes = [boot, a, c]
        wait_until(lambda: "c" in direct_peers(a), 20, "a connected directly to c", nodes)
        wait_until(lambda: "a" in direct_peers(c), 5, "c connected directly to a", nodes)
        elapsed = time.monotonic() - started
        # The bootstrap node saw both, and neither leaf heard the other over mDNS.
        assert {"a", "c"} <= direct_peers(boot)
        assert f"connected to {c.peer_id} (found by mDNS)" not in a.log()
        assert f"connected to {a.peer_id} (found by mDNS)" not in c.log()
        assert elapsed < 25
        print(f"DHT rendezvous: a and c connected {elapsed:.1f} s after the bootstrap started")


def test_lan_only_turns_the_dht_off(tmp_path: Path) -> None:
    with Netns() as netns:
        boot, a, c = two_subnets(netns, tmp_path, 93, "--lan-only")
        nodes = [boot, a, c]
        # Both reach the bootstrap node (given by address) and learn of each other through
        # the ledger, but with no DHT they never connect directly.
        wait_until(lambda: "c" in {p["name"] for p in a.peers()}, 20, "a to hear of c", nodes)
        time.sleep(6)
        assert "c" not in direct_peers(a) and "a" not in direct_peers(c)
