"""Real `covey node` processes in network namespaces, for multi-node tests.

Every node runs in a namespace the test creates, so mDNS and libp2p traffic never touch this
machine's own interfaces. The node's API listens on 127.0.0.1 inside its namespace, so API
calls run there too (`ip netns exec`), through the same client the CLI uses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm.trust.identity import load_or_create_identity
from tests.support.netns import NatHome, Netns, TwoHomes

REPO = Path(__file__).resolve().parents[2]
_API_SNIPPET = """
import json, sys
from pathlib import Path
from swarm.client.sync_client import NodeClient
client = NodeClient.from_data_dir(Path(sys.argv[1]), timeout=10)
body = json.loads(sys.argv[4]) if sys.argv[4] else None
print(json.dumps(client.request(sys.argv[2], sys.argv[3],
                                json.dumps(body).encode() if body is not None else None)))
"""


@dataclass
class RunningNode:
    netns: Netns
    ns: str
    name: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[Any]
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.status["peer_id"]

    def api(self, path: str, method: str = "GET", body: Any = None) -> Any:
        result = self.netns.run(
            self.ns,
            [sys.executable, "-c", _API_SNIPPET, str(self.data_dir), method, path,
             json.dumps(body) if body is not None else ""],
            cwd=REPO, timeout=30,
        )
        return json.loads(result.stdout)

    def peers(self) -> list[dict[str, Any]]:
        return self.api("/api/peers")["peers"]

    def others_online(self) -> set[str]:
        return {p["name"] for p in self.peers() if p["online"] and not p["self"]}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout: float = 15.0) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=timeout)


def start_node(
    netns: Netns, ns: str, token: str, name: str, workdir: Path, *extra: str,
    data_dir: Path | None = None, **popen_kw: Any,
) -> RunningNode:
    """Start `covey node` in `ns` and wait until its API answers; `popen_kw` go to Popen (a
    token on stdin, limits set in preexec_fn)."""
    return wait_started(launch_node(netns, ns, token, name, workdir, *extra, data_dir=data_dir,
                                    **popen_kw))


def launch_node(
    netns: Netns, ns: str, token: str, name: str, workdir: Path, *extra: str,
    data_dir: Path | None = None, **popen_kw: Any,
) -> RunningNode:
    """Start `covey node` in `ns` without waiting (several start side by side); then
    `wait_started`."""
    data_dir = data_dir or workdir / name
    log_path = workdir / f"{name}.log"
    argv = [sys.executable, "-m", "app.cli", "node", "--data-dir", str(data_dir),
            "--name", name, "--api-port", "0", *extra]
    if token:
        argv += ["--token", token]
    log = log_path.open("ab")
    proc = netns.popen(ns, argv, cwd=REPO, stdout=log, stderr=log, **popen_kw)
    return RunningNode(netns, ns, name, data_dir, log_path, proc)


def wait_started(node: RunningNode) -> RunningNode:
    """`node` once its API answers (with its status read), or AssertionError with its log."""
    name, proc, data_dir = node.name, node.proc, node.data_dir
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"node {name} exited with {proc.returncode}:\n{node.log()}")
        if (data_dir / "api.json").exists():
            try:
                node.status = node.api("/api/status")
                return node
            except subprocess.CalledProcessError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"node {name} did not start in 30 s:\n{node.log()}")


def wait_until(
    check: Callable[[], Any], timeout: float, what: str, nodes: list[RunningNode] = (),
    every: float = 0.3,
) -> Any:
    """Poll `check` until it returns something truthy; fail with the nodes' logs if not."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    logs = "\n".join(f"--- {n.name} ---\n{n.log()}" for n in nodes)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})\n{logs}")


def lan(netns: Netns, count: int, subnet: str = "10.77.0") -> list[tuple[str, str]]:
    """`count` namespaces on one switched LAN; returns (namespace, ip) pairs."""
    bridge = netns.bridge()
    hosts = []
    for i in range(count):
        ns = netns.add(f"h{i}")
        ip = f"{subnet}.{i + 2}"
        netns.attach(bridge, ns, ip)
        hosts.append((ns, ip))
    return hosts


_BURST_SNIPPET = """
import sys
from pathlib import Path
from swarm.client.sync_client import NodeClient
client = NodeClient.from_data_dir(Path(sys.argv[1]), timeout=10)
for i in range(int(sys.argv[3])):
    client.post_json("/api/node", {"name": f"{sys.argv[2]}-v{i}"})
"""


def rename_burst(node: RunningNode, count: int) -> str:
    """Rename `node` `count` times as fast as its API allows; returns the final name."""
    node.netns.run(node.ns, [sys.executable, "-c", _BURST_SNIPPET, str(node.data_dir),
                             node.name, str(count)], cwd=REPO, timeout=60)
    return f"{node.name}-v{count - 1}"


def ledger_view(node: RunningNode) -> dict[tuple[str, str], int]:
    return {(e["owner"], e["key"]): e["seq"] for e in node.api("/api/ledger")["entries"]}


def launch_homes(netns: Netns, net: TwoHomes, token: str, workdir: Path,
                 homes: Sequence[tuple[str, NatHome, Sequence[str]]]) -> list[RunningNode]:
    """The relaying member "office" on the public segment, then each (name, home, args) behind
    its NAT, all launched side by side (each on its own port; the homes bootstrap from the
    office, whose identity is made first so its peer id is known). Office first."""
    relay_id = load_or_create_identity(workdir / "office").peer_id.to_base58()
    boot = f"/ip4/{net.public_ip}/tcp/4001/p2p/{relay_id}"
    nodes = [launch_node(netns, net.public, token, "office", workdir, "--relay",
                         "--listen", f"/ip4/{net.public_ip}/tcp/4001")]
    for port, (name, home, args) in enumerate(homes, 4001):
        nodes.append(launch_node(netns, home.ns, token, name, workdir, "--bootstrap", boot,
                                 "--listen", f"/ip4/{home.ip}/tcp/{port}", *args))
    return nodes
