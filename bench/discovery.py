"""Discovery benchmark: how fast real `covey node` processes find each other.

Three measurements, each repeated and reported as median against its target:
- LAN: two namespaces on one switch; time from starting the second node's process to its
  admitting the first (found by mDNS). Target <= 3 s.
- DHT: two subnets joined only by a router running the bootstrap node; time from starting
  the second leaf to its admitting the first leaf (found through the DHT). Target <= 10 s.
- Convergence: five nodes, each renamed 30 times at once; time from the burst's start until
  all five ledgers agree (the burst's own duration is printed too).

Times come from the nodes' own log timestamps (same machine clock), so slow polling does not
inflate them. Needs root (network namespaces); sends nothing outside them.

    .venv/bin/python bench/discovery.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm.trust.token import new_token  # noqa: E402
from tests.support.netns import Netns  # noqa: E402
from tests.support.node_harness import (  # noqa: E402
    RunningNode,
    lan,
    ledger_view,
    rename_burst,
    start_node,
    wait_until,
)

LAN_TARGET_S = 3.0
DHT_TARGET_S = 10.0


def admitted_at(node: RunningNode, peer_id: str, timeout: float = 30) -> float:
    """Unix time of the log line where `node` admitted `peer_id`."""
    pattern = re.compile(rf"^(\S+ \S+) swarm\.gatekeeper: admitted peer {peer_id}$", re.M)
    match = wait_until(lambda: pattern.search(node.log()), timeout, "admission", [node])
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def lan_round(workdir: Path) -> float:
    token = new_token().encode()
    with Netns() as netns:
        (ns_a, _), (ns_b, _) = lan(netns, 2)
        a = start_node(netns, ns_a, token, "a", workdir)
        launched = time.time()
        b = start_node(netns, ns_b, token, "b", workdir)
        return admitted_at(b, a.peer_id) - launched


def dht_round(workdir: Path) -> float:
    token = new_token().encode()
    with Netns() as netns:
        left, right = netns.add("left"), netns.add("right")
        router = netns.router(left, right, "10.81.0.0/24", "10.82.0.0/24")
        boot = start_node(netns, router.ns, token, "boot", workdir,
                          "--listen", "/ip4/0.0.0.0/tcp/4001")
        a = start_node(netns, left, token, "a", workdir,
                       "--bootstrap", f"/ip4/{router.gateway_a}/tcp/4001/p2p/{boot.peer_id}")
        admitted_at(a, boot.peer_id)
        launched = time.time()
        c = start_node(netns, right, token, "c", workdir,
                       "--bootstrap", f"/ip4/{router.gateway_b}/tcp/4001/p2p/{boot.peer_id}")
        return admitted_at(c, a.peer_id) - launched


def convergence_round(workdir: Path, burst: int = 30) -> float:
    token = new_token().encode()
    with Netns() as netns:
        ns = netns.add("loop")
        nodes = [start_node(netns, ns, token, f"n{i}", workdir, "--listen",
                            "/ip4/127.0.0.1/tcp/0") for i in range(5)]
        for node in nodes:
            wait_until(lambda n=node: len(n.others_online()) == 4, 30, "mesh", nodes)
        started = time.time()
        threads = [threading.Thread(target=rename_burst, args=(n, burst)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        burst_done = time.time()

        def agreed() -> bool:
            views = [ledger_view(n) for n in nodes]
            names = {p["name"] for p in nodes[0].peers()}
            return all(v == views[0] for v in views) and names == {
                f"n{i}-v{burst - 1}" for i in range(5)}

        wait_until(agreed, 60, "convergence", nodes, every=0.5)
        now = time.time()
        print(f"  (the burst itself took {burst_done - started:.2f} s; agreement "
              f"{now - burst_done:.2f} s after it ended, polled every 0.5 s)")
        return now - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"lan": [], "dht": [], "converge": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, fn in (("lan", lan_round), ("dht", dht_round),
                             ("converge", convergence_round)):
                workdir = Path(tmp) / f"{name}-{r}"
                workdir.mkdir()
                results[name].append(fn(workdir))
                print(f"round {r + 1} {name}: {results[name][-1]:.2f} s", flush=True)
    lan_s, dht_s = statistics.median(results["lan"]), statistics.median(results["dht"])
    conv_s = statistics.median(results["converge"])
    print()
    print(f"LAN (mDNS) start -> peer admitted:  median {lan_s:.2f} s  "
          f"(target {LAN_TARGET_S} s, ratio {lan_s / LAN_TARGET_S:.2f}: "
          f"{'pass' if lan_s <= LAN_TARGET_S else 'FAIL'})")
    print(f"DHT across subnets:                 median {dht_s:.2f} s  "
          f"(target {DHT_TARGET_S} s, ratio {dht_s / DHT_TARGET_S:.2f}: "
          f"{'pass' if dht_s <= DHT_TARGET_S else 'FAIL'})")
    print(f"5-node ledger convergence after a burst of 150 updates: median {conv_s:.2f} s")
    print("all rounds:", {k: [round(v, 2) for v in vs] for k, vs in results.items()})
    return 0 if lan_s <= LAN_TARGET_S and dht_s <= DHT_TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
