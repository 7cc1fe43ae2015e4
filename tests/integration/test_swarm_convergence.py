"""Five real nodes, a burst of updates on every one of them at once: every replica of the
ledger ends the same, although gossip drops messages in bursts. Then one node dies without a
goodbye and the others show it offline within the heartbeat's 30 s."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from swarm.trust.token import new_token
from tests.support.netns import Netns, netns_skip_reason
from tests.support.node_harness import (
    RunningNode,
    ledger_view,
    rename_burst,
    start_node,
    wait_until,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]

BURST = 30


def test_five_nodes_converge_after_a_burst_and_notice_a_dead_node(tmp_path: Path) -> None:
    token = new_token().encode()
    with Netns() as netns:
        ns = netns.add("loop")  # all five on 127.0.0.1: mDNS on loopback only
        nodes = [start_node(netns, ns, token, f"n{i}", tmp_path,
                            "--listen", "/ip4/127.0.0.1/tcp/0") for i in range(5)]
        for node in nodes:
            wait_until(lambda n=node: len(n.others_online()) == 4, 30,
                       f"{node.name} to see four others", nodes)

        finals: dict[str, str] = {}
        threads = [threading.Thread(target=lambda n=n: finals.update({n.peer_id:
                                    rename_burst(n, BURST)})) for n in nodes]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        def converged() -> bool:
            views = [ledger_view(n) for n in nodes]
            names = [{p["peer_id"]: p["name"] for p in n.peers()} for n in nodes]
            return all(v == views[0] for v in views) and all(m == finals for m in names)

        wait_until(converged, 30, "all five ledgers to agree on the final names", nodes, every=1)
        print(f"converged {time.monotonic() - started:.1f} s after a burst of {5 * BURST}")

        victim = nodes[4]
        victim.proc.send_signal(signal.SIGKILL)  # no goodbye: only the heartbeat expiry tells
        killed = time.monotonic()
        alive = {n.peer_id for n in nodes[:4]}

        def online_ids(node: RunningNode) -> set[str]:
            return {p["peer_id"] for p in node.peers() if p["online"]}

        for node in nodes[:4]:
            wait_until(lambda n=node: online_ids(n) == alive, 35,
                       "the dead node to show offline", nodes[:4], every=1)
        offline_after = time.monotonic() - killed
        print(f"dead node shown offline on all four after {offline_after:.1f} s")
        # 30 s ttl from the last heartbeat before the kill, plus up to ~3 s of polling four nodes.
        assert offline_after <= 33
        # Still listed (offline), not forgotten at once.
        assert victim.peer_id in {p["peer_id"] for p in nodes[0].peers()}
