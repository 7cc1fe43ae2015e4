"""Reach benchmark: two homes behind their own NAT routers (iptables, nothing inbound) and one
reachable member that relays, all in network namespaces.

1. The share of attempts that end direct after hole punching, behind endpoint-independent
   ("cone": port-preserving MASQUERADE) and symmetric (MASQUERADE --random) NATs: each attempt
   starts the three nodes afresh and waits until home 1's link to home 2 says "hole-punched"
   or every punch has missed.
2. Time from starting the nodes until home 1 has a federated reply from home 2's model, then
   federated generation tokens/s of that model asked by home 1 and by the relaying member
   (direct), rounds alternating, medians: behind symmetric NATs (home 1 relayed) and behind
   cone NATs once hole-punched. Needs root.

    .venv/bin/python bench/reach.py [--model tiny|gemma] [--attempts 5] [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.store.model_store import DEFAULT_MODEL, ModelStore  # noqa: E402
from bench.federated import chat  # noqa: E402
from swarm.net.holepunch import MAX_ATTEMPTS, MISSED  # noqa: E402
from swarm.trust.token import new_token  # noqa: E402
from tests.support.netns import Netns, call_in, two_homes  # noqa: E402
from tests.support.node_harness import (  # noqa: E402
    RunningNode,
    launch_homes,
    wait_started,
    wait_until,
)
from tests.support.tiny_gguf import write_tiny_gguf  # noqa: E402

PUNCH_WAIT_S = 90.0


def ask(node: RunningNode, model: str, tokens: int) -> dict[str, Any]:
    port = json.loads((node.data_dir / "api.json").read_text())["port"]
    key = (node.data_dir / "api-secret").read_text().strip()
    return call_in(node.ns, chat, port, key, model, tokens, "federated", timeout=600)


def link(node: RunningNode, name: str) -> str | None:
    return next((p.get("link") for p in node.peers() if p["name"] == name and p["connected"]),
                None)


@contextmanager
def homes(nat: str, home2_args: Sequence[str],
          prepare: Callable[[Path], None] = lambda _: None) -> Iterator[list[RunningNode]]:
    """Office, home 2 and home 1 started (in that order) behind `nat` routers."""
    with tempfile.TemporaryDirectory() as tmp, Netns() as netns:
        work = Path(tmp)
        prepare(work)
        net = two_homes(netns, nat=nat)
        nodes = launch_homes(netns, net, new_token().encode(), work,
                             [("home2", net.home2, home2_args), ("home1", net.home1, [])])
        yield [wait_started(n) for n in nodes]


def punch_outcome(nat: str) -> tuple[bool, float]:
    """One fresh start: whether home 1 ends hole-punched to home 2, and when (s after start)."""
    started = time.monotonic()
    with homes(nat, []) as nodes:
        _, home2, home1 = nodes

        def settled() -> bool:
            missed = (home1.log() + home2.log()).count(MISSED)
            return link(home1, "home2") == "hole-punched" or missed >= MAX_ATTEMPTS

        wait_until(settled, PUNCH_WAIT_S, "a hole punch or every attempt missed", nodes)
        return link(home1, "home2") == "hole-punched", time.monotonic() - started


def rates(nat: str, model: str, store_model: Callable[[Path], None], rounds: int,
          tokens: int) -> None:
    started = time.monotonic()
    with homes(nat, ["--federated", "--model", model], store_model) as nodes:
        office, home2, home1 = nodes
        wait_until(lambda: ask(home1, model, 4)["status"] == 200, 120,
                   "home1's first federated reply", nodes, every=0.5)
        first = time.monotonic() - started
        if nat == "cone":
            wait_until(lambda: link(home1, "home2") == "hole-punched", PUNCH_WAIT_S,
                       "the hole punch", nodes)
        via = link(home1, "home2")
        print(f"{nat} NATs: first federated reply from home2 {first:.1f} s after start; "
              f"home1 -> home2 link: {via}")
        found: dict[str, list[float]] = {f"home1 ({via})": [], "office (direct)": []}
        order = list(zip(found, (home1, office), strict=True))
        for r in range(rounds):
            for label, node in order if r % 2 == 0 else order[::-1]:
                result = ask(node, model, tokens)
                assert result["status"] == 200, result
                found[label].append(result["rate"])
        medians = [statistics.median(v) for v in found.values()]
        for (label, values), value in zip(found.items(), medians, strict=True):
            print(f"  federated {label}: {value:.1f} tokens/s (rounds: "
                  f"{', '.join(f'{x:.1f}' for x in values)})")
        print(f"  home1 / office: {medians[0] / medians[1]:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", choices=("gemma", "tiny"), default="gemma")
    args = parser.parse_args()
    for nat in ("cone", "symmetric"):
        outcomes = [punch_outcome(nat) for _ in range(args.attempts)]
        direct = [t for ok, t in outcomes if ok]
        when = f", hole-punched {statistics.median(direct):.1f} s after start (median)" \
            if direct else ""
        print(f"{nat} NATs: {len(direct)}/{len(outcomes)} attempts ended direct{when} "
              f"(each: {', '.join(f'{t:.1f} s' if ok else 'relayed' for ok, t in outcomes)})")
    model = DEFAULT_MODEL if args.model == "gemma" else "tiny"

    def store_model(work: Path) -> None:
        store = ModelStore(work / "home2" / "models")
        if args.model == "tiny":
            store.import_file(write_tiny_gguf(work / "tiny.gguf"), "tiny")
        else:
            store.ensure(DEFAULT_MODEL)

    for nat in ("symmetric", "cone"):
        rates(nat, model, store_model, args.rounds, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
