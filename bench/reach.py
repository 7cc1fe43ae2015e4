"""Reach benchmark: two homes behind their own NAT routers (iptables MASQUERADE, nothing
inbound) and one reachable member that relays, all in network namespaces.

Prints the time from starting the nodes until home 1 has a federated reply from home 2's
model (through the relay), then federated generation tokens/s of home 2's model asked by
home 1 (relayed) and by the relaying member (direct), rounds alternating, medians. Hole
punching is not built yet, so there is no "ends direct" share to measure. Needs root.

    .venv/bin/python bench/reach.py [--model tiny|gemma] [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.store.model_store import DEFAULT_MODEL, ModelStore  # noqa: E402
from bench.federated import chat  # noqa: E402
from swarm.trust.token import new_token  # noqa: E402
from tests.support.netns import Netns, call_in, two_homes  # noqa: E402
from tests.support.node_harness import (  # noqa: E402
    RunningNode,
    launch_homes,
    wait_started,
    wait_until,
)
from tests.support.tiny_gguf import write_tiny_gguf  # noqa: E402


def ask(node: RunningNode, model: str, tokens: int) -> dict[str, Any]:
    port = json.loads((node.data_dir / "api.json").read_text())["port"]
    key = (node.data_dir / "api-secret").read_text().strip()
    return call_in(node.ns, chat, port, key, model, tokens, "federated", timeout=600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", choices=("gemma", "tiny"), default="gemma")
    args = parser.parse_args()
    model, token = DEFAULT_MODEL if args.model == "gemma" else "tiny", new_token().encode()
    with tempfile.TemporaryDirectory() as tmp, Netns() as netns:
        work = Path(tmp)
        store = ModelStore(work / "home2" / "models")
        if args.model == "tiny":
            store.import_file(write_tiny_gguf(work / "tiny.gguf"), "tiny")
        else:
            store.ensure(DEFAULT_MODEL)
        net = two_homes(netns)
        started = time.monotonic()
        nodes = launch_homes(netns, net, token, work, [
            ("home2", net.home2, ["--federated", "--model", model]), ("home1", net.home1, [])])
        office, home2, home1 = (wait_started(n) for n in nodes)

        def first_reply() -> bool:
            return ask(home1, model, 4)["status"] == 200

        wait_until(first_reply, 120, "home1's first federated reply", nodes, every=0.5)
        first = time.monotonic() - started
        link = next(p.get("link") for p in home1.peers() if p["name"] == "home2")
        print(f"time from start to home1's first federated reply from home2: {first:.1f} s "
              f"(home1 -> home2 link: {link})")
        rates: dict[str, list[float]] = {"relayed (home1)": [], "direct (office)": []}
        for r in range(args.rounds):
            order = [("relayed (home1)", home1), ("direct (office)", office)]
            for label, node in order if r % 2 == 0 else order[::-1]:
                result = ask(node, model, args.tokens)
                assert result["status"] == 200, result
                rates[label].append(result["rate"])
        medians = {label: statistics.median(v) for label, v in rates.items()}
        for label, value in medians.items():
            print(f"federated {label}: {value:.1f} tokens/s (rounds: "
                  f"{', '.join(f'{x:.1f}' for x in rates[label])})")
        print(f"relayed / direct: {medians['relayed (home1)'] / medians['direct (office)']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
