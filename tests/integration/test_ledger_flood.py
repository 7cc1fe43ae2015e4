"""One member floods the ledger with thousands of small, validly signed entries; what a user
would notice if the quotas failed: the flood filling every replica, and the honest members'
changes no longer reaching each other because every pull fails.

One network namespace with only `lo` up holds two real `covey node` processes (`a`, which
the flooder joins, and `b`) and the flooder (`tests/support/ledger_flood.py`, a real libp2p
host run as a subprocess that joins with the swarm's token).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from swarm.ledger.rules import MAX_OWNER_ENTRIES
from swarm.trust.token import new_token
from tests.support.netns import Netns, netns_skip_reason
from tests.support.node_harness import REPO, RunningNode, start_node, wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]

LISTEN = ("--listen", "/ip4/127.0.0.1/tcp/0")
FLOOD = 8200


def held_by(node: RunningNode, owner: str) -> int:
    return sum(1 for e in node.api("/api/ledger")["entries"] if e["owner"] == owner)


def ledger_status(node: RunningNode) -> dict[str, Any]:
    return node.api("/api/status")["ledger"]


def test_a_flooding_member_is_capped_and_honest_sync_keeps_working(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    token = new_token().encode()
    workdir = tmp_path_factory.mktemp("flood")
    with Netns() as netns:
        ns = netns.add("flood")
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda name: start_node(netns, ns, token, name, workdir, *LISTEN),
                            ["a", "b"])
        nodes = [a, b]
        wait_until(lambda: a.others_online() == {"b"} and b.others_online() == {"a"}, 20,
                   "a and b to see each other", nodes)
        argv = [sys.executable, "-m", "tests.support.ledger_flood", "--token", token,
                "--target", a.status["addresses"][0], "--entries", str(FLOOD)]
        probe_log = (workdir / "flood.log").open("a")
        probe = netns.popen(ns, argv, cwd=REPO, stdout=subprocess.PIPE, stderr=probe_log,
                            text=True)
        try:
            assert probe.stdout is not None
            line = probe.stdout.readline()  # the probe reports once it has flooded
            assert line, f"the flooder exited with {probe.wait()}"
            obs = json.loads(line)
            assert obs["admitted"] is True and obs["pulls"] >= 1, obs
            flooder = obs["peer_id"]
            # a kept at most its quota of the flood and counted the rest as refused...
            wait_until(lambda: held_by(a, flooder) == MAX_OWNER_ENTRIES, 30,
                       "a to hold the flooder's quota", nodes)
            wait_until(lambda: ledger_status(a)["refused_over_quota"] >= 1000, 30,
                       "a to count the refused flood", nodes)
            # ...and so does b, which heard of the flood only from a.
            wait_until(lambda: held_by(b, flooder) == MAX_OWNER_ENTRIES, 30,
                       "b to hold the flooder's quota", nodes)
            # Honest sync keeps working: b's change reaches a, and a's reaches b, and pulls
            # between them keep completing.
            since = ledger_status(a)["last_sync_ok_at"] or 0.0
            b.api("/api/node", "POST", {"name": "b-after-flood"})
            a.api("/api/node", "POST", {"name": "a-after-flood"})
            wait_until(lambda: "b-after-flood" in a.others_online(), 20,
                       "a to see b's new name", nodes)
            wait_until(lambda: "a-after-flood" in b.others_online(), 20,
                       "b to see a's new name", nodes)
            wait_until(lambda: (ledger_status(a)["last_sync_ok_at"] or 0.0) > since, 30,
                       "a pull to complete after the flood", nodes)
            for node in nodes:
                status = ledger_status(node)
                assert status["entries"] <= 3 * 8 + MAX_OWNER_ENTRIES, status
                assert held_by(node, flooder) == MAX_OWNER_ENTRIES
        finally:
            if probe.poll() is None:
                os.killpg(probe.pid, signal.SIGKILL)
            probe.wait(timeout=10)
        for node in nodes:
            assert node.proc.poll() is None, f"node {node.name} died:\n{node.log()}"
            node.stop()
