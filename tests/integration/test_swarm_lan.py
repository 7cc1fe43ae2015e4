"""Several real nodes on one LAN (network namespaces on a bridge): they find each other by
mDNS with no address given; a node with another token sees and reaches nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from swarm.trust.token import new_token
from tests.support.netns import Netns, netns_skip_reason
from tests.support.node_harness import lan, start_node, wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]


def test_three_nodes_find_each_other_and_an_outsider_sees_nobody(tmp_path: Path) -> None:
    token, other = new_token().encode(), new_token().encode()
    with Netns() as netns:
        hosts = lan(netns, 4)
        started = time.monotonic()
        nodes = [
            start_node(netns, ns, token, f"n{i}", tmp_path) for i, (ns, _) in enumerate(hosts[:3])
        ]
        outsider = start_node(netns, hosts[3][0], other, "outsider", tmp_path)
        for node in nodes:
            names = {"n0", "n1", "n2"} - {node.name}
            wait_until(lambda n=node, want=names: n.others_online() == want, 20,
                       f"{node.name} to see {names}", nodes)
        elapsed = time.monotonic() - started
        # Each sees the other two online over a direct, admitted connection.
        for node in nodes:
            others = [p for p in node.peers() if not p["self"]]
            assert {p["name"] for p in others} == {"n0", "n1", "n2"} - {node.name}
            assert all(p["online"] and p["connected"] for p in others)
            assert all(p["rpc_protocol"] == "7.0.0" and p["cores"] >= 1 for p in others)
            assert not any(str(a).startswith("/ip4/0.0.0.0") for a in node.status["addresses"])
        # The outsider shares the LAN but not the token: it lists nobody, nobody lists it.
        assert [p["name"] for p in outsider.peers()] == ["outsider"]
        assert outsider.api("/api/status")["connected_peers"] == []
        for node in nodes:
            assert "outsider" not in {p["name"] for p in node.peers()}
        assert elapsed < 25


def test_token_is_remembered_and_peer_id_kept_across_restart(tmp_path: Path) -> None:
    token = new_token().encode()
    with Netns() as netns:
        (ns_a, _), (ns_b, _) = lan(netns, 2)
        a = start_node(netns, ns_a, token, "a", tmp_path)
        b = start_node(netns, ns_b, token, "b", tmp_path)
        wait_until(lambda: a.others_online() == {"b"}, 20, "a to see b", [a, b])
        first_id = b.peer_id
        assert b.stop() == 0
        assert not (b.data_dir / "api.json").exists()
        # A clean stop says goodbye: a shows b offline at once, not after the heartbeat ttl.
        wait_until(lambda: a.others_online() == set(), 5, "a to show b offline", [a, b])
        again = start_node(netns, ns_b, "", "b", tmp_path, data_dir=b.data_dir)
        assert again.peer_id == first_id
        wait_until(lambda: a.others_online() == {"b"}, 20, "a to see b again", [a, again])
