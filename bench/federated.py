"""Federated benchmark: a client node sends a batch of concurrent chats to one federated node,
then to two (same machine, so compare ratios, not absolute speed), and one streamed reply
through the federated route against the same reply on the client's own engine.

Prints requests per minute, p50/p95 latency, the CPU seconds each node and its engine used,
and tokens/s federated vs local; then model copy throughput from a federated node to new
nodes over the direct TLS path and over a libp2p stream, next to a raw loopback socket copy of
the same file (all end with a sha256 of what arrived). Needs root (nodes run in a network
namespace). `--copy-only` runs the copy part alone.

    .venv/bin/python bench/federated.py [--model tiny|gemma] [--batch 8] [--tokens 32]
                                        [--copy-only] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.store.model_store import DEFAULT_MODEL, ModelStore  # noqa: E402
from swarm.client.sync_client import NodeClient  # noqa: E402
from swarm.node.main import DIRECT_COPY_ENV  # noqa: E402
from swarm.trust.token import new_token  # noqa: E402
from tests.support.netns import Netns, call_in  # noqa: E402
from tests.support.node_harness import RunningNode, start_node, wait_until  # noqa: E402
from tests.support.tiny_gguf import write_tiny_gguf  # noqa: E402

CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (the engine), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    # Children are listed per thread, and the engine is started from a worker thread.
    pids = [pid] + [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                    for child in (task / "children").read_text().split()]
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def chat(port: int, key: str, model: str, tokens: int, route: str) -> dict[str, Any]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": model, "messages": CHAT, "max_tokens": tokens, "temperature": 0,
        "stream": True, "covey_route": route}), headers={"Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    first = last = None
    count = 0
    for raw in resp:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            break
        if line.startswith("data: "):
            for choice in json.loads(line[6:]).get("choices", []):
                if choice["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                    count += 1
    conn.close()
    return {"status": resp.status, "latency": time.perf_counter() - start, "tokens": count,
            "rate": (count - 1) / (last - first) if first and last and last > first else 0.0}


def batch(port: int, key: str, model: str, n: int, tokens: int) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: chat(port, key, model, tokens, "federated"),
                                range(n)))
    return time.perf_counter() - start, results


def report(label: str, wall: float, results: list[dict], cpu: dict[str, float]) -> float:
    ok = [r for r in results if r["status"] == 200]
    lat = sorted(r["latency"] for r in ok)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    rpm = len(ok) / wall * 60
    cpu_text = ", ".join(f"{k} {v:.1f} s" for k, v in cpu.items())
    print(f"{label}: {len(ok)}/{len(results)} answered in {wall:.1f} s = {rpm:.1f} req/min; "
          f"latency p50 {statistics.median(lat):.2f} s, p95 {p95:.2f} s; CPU {cpu_text}")
    return rpm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "gemma"), default="gemma")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--copy-only", action="store_true",
                        help="only the model copy part: raw socket, direct TLS, libp2p")
    parser.add_argument("--rounds", type=int, default=3, help="copy rounds of each kind")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Netns() as netns:
        work = Path(tmp)
        model = DEFAULT_MODEL if args.model == "gemma" else "tiny"
        if args.model == "tiny":
            write_tiny_gguf(work / "tiny.gguf")
        ns = netns.add("fed")
        token = new_token().encode()
        nodes: dict[str, RunningNode] = {}
        for name in ("f1",) if args.copy_only else ("f1", "f2", "client"):
            data_dir = work / name
            store = ModelStore(data_dir / "models")
            if args.model == "tiny":
                store.import_file(work / "tiny.gguf", "tiny")
            else:
                store.ensure(DEFAULT_MODEL)
            extra = ["--federated", "--model", model] if name != "client" else []
            nodes[name] = start_node(netns, ns, token, name, work, "--lan-only", "--listen",
                                     "/ip4/127.0.0.1/tcp/0", *extra, data_dir=data_dir)
        if args.copy_only:
            copy_benchmark(netns, ns, token, work, nodes["f1"], model, args.rounds)
            return 0
        client = nodes["client"]
        port = json.loads((client.data_dir / "api.json").read_text())["port"]
        key = (client.data_dir / "api-secret").read_text().strip()

        def serving() -> list[str]:
            models = {m["id"]: m for m in client.api("/v1/models")["data"]}
            machines = models.get(model, {}).get("covey", {}).get("machines", [])
            return sorted(m for m in machines if m != "client")  # the client has it locally

        wait_until(lambda: serving() == ["f1", "f2"], 30, "both federated nodes", [client])
        for name in ("f1", "f2"):  # load both engines before timing anything
            nodes[name].api("/api/federated", "POST", {"enabled": False, "model": model})
        for warm in ("f1", "f2"):
            nodes[warm].api("/api/federated", "POST", {"enabled": True, "model": model})
            wait_until(lambda w=warm: serving() == [w], 10, "one node serving", [client])
            call_in(ns, chat, port, key, model, 4, "federated")
            nodes[warm].api("/api/federated", "POST", {"enabled": False, "model": model})

        nodes["f1"].api("/api/federated", "POST", {"enabled": True, "model": model})
        wait_until(lambda: serving() == ["f1"], 10, "f1 alone", [client])
        before = {n: cpu_seconds(nodes[n].proc.pid) for n in ("f1", "f2", "client")}
        wall, results = call_in(ns, batch, port, key, model, args.batch, args.tokens)
        cpu = {n: cpu_seconds(nodes[n].proc.pid) - before[n] for n in before}
        one = report("one federated node ", wall, results, cpu)

        nodes["f2"].api("/api/federated", "POST", {"enabled": True, "model": model})
        wait_until(lambda: serving() == ["f1", "f2"], 10, "both", [client])
        before = {n: cpu_seconds(nodes[n].proc.pid) for n in ("f1", "f2", "client")}
        wall, results = call_in(ns, batch, port, key, model, args.batch, args.tokens)
        cpu = {n: cpu_seconds(nodes[n].proc.pid) - before[n] for n in before}
        two = report("two federated nodes", wall, results, cpu)
        print(f"two / one, requests per minute: {two / one:.2f} (one machine's 2 cores "
              "shared by both engines, so ~1 is expected here)")

        nodes["f2"].api("/api/federated", "POST", {"enabled": False, "model": model})
        rates = {"federated": [], "local": []}
        call_in(ns, chat, port, key, model, 4, "local")  # load the client's own engine
        for r in range(5):
            for route in (("federated", "local") if r % 2 == 0 else ("local", "federated")):
                rates[route].append(call_in(ns, chat, port, key, model, 64, route)["rate"])
        fed, loc = statistics.median(rates["federated"]), statistics.median(rates["local"])
        print(f"streamed tokens/s, one reply at a time: federated {fed:.1f}, local {loc:.1f}, "
              f"ratio {fed / loc:.2f} (5 alternating rounds of 64 tokens)")
        nodes["f2"].stop()  # one source, so every kind copies from the same machine
        copy_benchmark(netns, ns, token, work, nodes["f1"], model, args.rounds)
    return 0


def copy_benchmark(netns: Netns, ns: str, token: str, work: Path, source_node: RunningNode,
                   model: str, rounds: int) -> None:
    """MB/s of copying the model to a new node over the direct TLS path and over a libp2p
    stream (a second new node that does not ask for the direct path), vs a raw loopback
    socket; the kinds take turns in a rotating order, so a noisy neighbour hits each alike."""
    source = ModelStore(source_node.data_dir / "models").model_path(model)
    size = source.stat().st_size
    copiers = {}
    for kind, direct in (("direct", "1"), ("libp2p", "0")):
        copiers[kind] = start_node(netns, ns, token, f"copier-{kind}", work, "--lan-only",
                                   "--listen", "/ip4/127.0.0.1/tcp/0",
                                   env={**os.environ, DIRECT_COPY_ENV: direct})
    def offered(node: RunningNode) -> bool:
        return any(r["name"] == model for r in node.api("/api/models")["swarm"])

    for node in copiers.values():
        wait_until(partial(offered, node), 30, "the model offered", [node])
    kinds = ["raw", "direct", "libp2p"]
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds[r % 3:] + kinds[:r % 3]:
            started = time.monotonic()
            if kind == "raw":
                call_in(ns, raw_copy, source, work / "raw-copy.gguf")
            else:
                job = call_in(ns, copy_over_swarm, copiers[kind].data_dir, model)
                assert job["state"] == "done" and job["path"] == kind, job
            rates[kind].append(size / (time.monotonic() - started) / 1e6)
            if kind != "raw":
                ModelStore(copiers[kind].data_dir / "models").remove(model)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"model copy of {size / 1e6:.0f} MB on loopback, incl. sha256 of what arrived "
          f"(median of {rounds} rounds, order rotated each round; covey's figures include "
          "the API polling every 20 ms):")
    for kind in kinds:
        runs = ", ".join(f"{x:.0f}" for x in rates[kind])
        print(f"  {kind:7s} {med[kind]:7.1f} MB/s  ratio to raw {med[kind] / med['raw']:.2f}"
              f"  (rounds: {runs})")


def copy_over_swarm(data_dir: Path, model: str) -> dict[str, Any]:
    """Start the node's copy of `model` and poll its API every 20 ms until it ends."""
    client = NodeClient.from_data_dir(data_dir)
    job = client.post_json("/api/models/copy", {"model": model})
    while job["state"] in ("running", "verifying"):
        time.sleep(0.02)
        job = next(j for j in client.get_json("/api/models")["copies"] if j["model"] == model)
    return job


def raw_copy(source: Path, target: Path) -> None:
    """Send `source` over one loopback TCP connection into `target`, then hash `target`."""
    import hashlib
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def send() -> None:
        conn, _ = server.accept()
        with conn, source.open("rb") as f:
            conn.sendfile(f)

    sender = threading.Thread(target=send)
    sender.start()
    with socket.create_connection(("127.0.0.1", port)) as conn, target.open("wb") as out:
        while block := conn.recv(1 << 20):
            out.write(block)
    sender.join()
    server.close()
    with target.open("rb") as f:
        hashlib.file_digest(f, "sha256")
    target.unlink()


if __name__ == "__main__":
    sys.exit(main())
