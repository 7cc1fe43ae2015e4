"""A swarm member that leases a real worker node and breaks the RPC rules is cut off.

One network namespace holds a worker node, a client node with a model, and hostile members
(`tests/support/swarm_probe.py rpc-attack`, real libp2p hosts using the swarm's own lease and
relay modules). Each member leases the worker and sends one thing llama.cpp never sends: a
GGML_OP_CUSTOM graph, an out-of-bounds SET_TENSOR, an ALLOC_BUFFER beyond the share. Each is
refused with the lease's other connection cut, its lease revoked and the member barred; the
worker's RPC process lives on, /api/status counts each, and the client's sharded reply after
them is still correct.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from swarm.trust.token import new_token
from swarm.workers.rpc_guard import COMPUTE_HEADROOM_BYTES
from tests.integration.test_sharded import ShardSwarm
from tests.support.netns import Netns, netns_skip_reason
from tests.support.node_harness import REPO, RunningNode
from tests.support.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.netns

SHARE_MIB = 64
# (attack, the path it takes); the lease's other connection waits on the other path.
ATTACKS = [("custom-op", "tunnel"), ("oob-set-tensor", "direct"),
           ("alloc-beyond-share", "tunnel")]


def rpc_children(node: RunningNode) -> set[int]:
    """The node's child processes: its ggml RPC worker (the harness runs the node itself)."""
    pid = node.proc.pid
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children |= {int(c) for c in (task / "children").read_text().split()}
    return children


def certificate_sha256(swarm: ShardSwarm, node: RunningNode) -> str:
    return str(json.loads(swarm.netns.run(swarm.ns, [
        sys.executable, "-c", "import json,sys; from pathlib import Path; "
        "from swarm.workers.direct_tls import load_or_create_certificate as c; "
        "print(json.dumps(c(Path(sys.argv[1])).sha256))", str(node.data_dir)],
        cwd=REPO, timeout=30).stdout))


def probe_attack(swarm: ShardSwarm, worker: RunningNode, attack: str, path: str,
                 sha256: str) -> dict[str, Any]:
    status = worker.api("/api/status")
    result = swarm.netns.run(swarm.ns, [
        sys.executable, "-m", "tests.support.swarm_probe", "rpc-attack",
        "--target", worker.status["addresses"][0], "--token", swarm.token,
        "--attack", attack, "--path", path,
        "--direct-port", str(status["worker"]["direct_port"]), "--direct-sha256", sha256,
        "--share-bytes", str(status["worker"]["share_bytes"] + COMPUTE_HEADROOM_BYTES),
        "--timeout", "60"],
        cwd=REPO, timeout=90)
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def test_a_member_breaking_the_rpc_rules_is_cut_off_and_the_worker_serves_on(
        tmp_path: Path) -> None:
    if netns_skip_reason() is not None:
        pytest.skip(str(netns_skip_reason()))
    model = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=4, n_embd=256, n_ff=512)
    with Netns() as netns:
        swarm = ShardSwarm(netns, netns.add("rpcv"), new_token().encode(), tmp_path, {})
        worker = swarm.start("w1", "--worker", "--share-mib", str(SHARE_MIB))
        client = swarm.start("client", model=model)
        swarm.wait_workers(client, {"w1"})
        rpc_before = rpc_children(worker)
        assert len(rpc_before) == 1, rpc_before
        sha256 = certificate_sha256(swarm, worker)

        for n, (attack, path) in enumerate(ATTACKS, start=1):
            seen = probe_attack(swarm, worker, attack, path, sha256)
            assert seen.get("admitted") and "reply_bytes" in seen, (attack, seen, worker.log())
            assert seen["reply_bytes"] == 0, (attack, seen)  # nothing after the attack
            assert seen["other_path_cut"], (attack, seen)
            assert seen["lease_lost_s"] is not None, (attack, seen)
            assert seen["reacquire"] == "barred", (attack, seen)
            status = worker.api("/api/status")["worker"]
            assert status["rpc_violations"] == n, (attack, status)
            assert status["state"] == "idle" and status["enabled"], (attack, status)
            assert rpc_children(worker) == rpc_before, f"{attack}: the RPC worker was replaced"
            assert f"({seen['peer_id']}) broke the RPC rules" in worker.log(), worker.log()

        # The honest client's sharded reply still equals its local one.
        status, sharded = swarm.chat(client, "sharded")
        assert status == 200 and sharded["covey"]["route"] == "sharded", sharded
        status, local = swarm.chat(client, "local")
        assert status == 200, local
        text = sharded["choices"][0]["message"]["content"]
        assert text and text == local["choices"][0]["message"]["content"]
        assert worker.api("/api/status")["worker"]["leased_by"] == client.peer_id
        assert rpc_children(worker) == rpc_before
