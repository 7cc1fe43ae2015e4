"""Sharded benchmark: Gemma 3 270M split over two workers, through Covey's tunnels vs raw
loopback RPC, side by side in one run (this machine is shared: compare the ratios).

Covey: three `covey node` processes in a network namespace (a client and two workers, plus a
spare worker for the failover step). Raw: two `covey worker-rpc` processes on loopback and an
engine pointed straight at them, with the same split.

Prints generation tokens/s (streamed, timed at the reader) covey vs raw; model load time
covey vs raw, first load and reload (the workers keep their tensor cache); bulk tunnel
throughput next to raw loopback TCP (bench/tunnel.py's measurement); time to first token
when an equal worker joins the loaded pair (target: no reload) and when a killed worker
rejoins; and the time from killing a worker mid-reply to the next token. Needs root.

    .venv/bin/python bench/sharded.py [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.engine import Engine  # noqa: E402
from backends.engine_protocol import Done, EngineConfig, GenerateRequest, Token  # noqa: E402
from backends.store.model_store import DEFAULT_MODEL, ModelStore  # noqa: E402
from swarm.trust.token import new_token  # noqa: E402
from tests.support.netns import Netns, call_in  # noqa: E402
from tests.support.node_harness import RunningNode, start_node, wait_until  # noqa: E402

# A text completion: the bundled model is a base model and goes on for as long as asked.
PROMPT = "Once upon a time, in a lighthouse on a rocky northern coast, there lived"
SHARE_MIB = "200"  # Gemma 3 270M with its KV cache needs both of two such workers


def stream_chat(node: RunningNode, tokens: int, on_token: Any = None) -> dict[str, Any]:
    """One streamed sharded completion through the node's API, timed at the reader."""
    port = json.loads((node.data_dir / "api.json").read_text())["port"]
    key = (node.data_dir / "api-secret").read_text().strip()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.monotonic()
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": DEFAULT_MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
        "stream": True, "covey_route": "sharded", "covey_deterministic": True,
        "stream_options": {"include_usage": True}}),
        headers={"Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    times, covey, usage = [], {}, {}
    for raw in resp:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            break
        if not line.startswith("data: "):
            continue
        chunk = json.loads(line[len("data: "):])
        covey, usage = chunk.get("covey", covey), chunk.get("usage") or usage
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            times.append(time.monotonic())
            if on_token is not None:
                on_token(len(times))
    conn.close()
    if resp.status != 200 or len(times) < 2:
        raise RuntimeError(f"the sharded chat failed: {resp.status} {covey}")
    return {"first_s": times[0] - started, "total_s": time.monotonic() - started,
            "times": times, "covey": covey,
            "rate": (len(times) - 1) / (times[-1] - times[0]),
            "tokens": usage.get("completion_tokens")}


def raw_generate(engine: Engine, tokens: int) -> float:
    request = GenerateRequest(id=f"raw-{time.monotonic_ns()}", prompt=PROMPT,
                              max_tokens=tokens, temperature=0.0, repeat_penalty=1.0)
    times = []
    for event in engine.generate(request):
        if isinstance(event, Token) and event.text:
            times.append(time.monotonic())
        elif isinstance(event, Done):
            break
    return (len(times) - 1) / (times[-1] - times[0])


def start_raw_workers() -> tuple[list[subprocess.Popen[str]], list[str]]:
    procs, endpoints = [], []
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "backends.rpc_worker", "--share-mib", SHARE_MIB],
            stdout=subprocess.PIPE, text=True,
            env={**os.environ, "GGML_NO_BACKTRACE": "1", "OMP_WAIT_POLICY": "passive"})
        assert proc.stdout is not None
        endpoints.append(json.loads(proc.stdout.readline())["endpoint"])
        procs.append(proc)
    return procs, endpoints


def raw_load(path: Path, endpoints: list[str], split: tuple[float, ...]) -> tuple[Engine, float]:
    started = time.monotonic()
    engine = Engine(EngineConfig(model_path=str(path), rpc_endpoints=tuple(endpoints),
                                 tensor_split=split, deterministic=True))
    engine.wait_loaded()
    return engine, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Netns() as netns:
        work = Path(tmp)
        ns = netns.add("shard")
        token = new_token().encode()
        nodes: dict[str, RunningNode] = {}
        for name in ("w1", "w2"):
            nodes[name] = start_node(netns, ns, token, name, work, "--lan-only", "--listen",
                                     "/ip4/127.0.0.1/tcp/0", "--worker", "--share-mib",
                                     SHARE_MIB)
        store = ModelStore(work / "client" / "models")
        model_path = store.ensure(DEFAULT_MODEL).path
        client = start_node(netns, ns, token, "client", work, "--lan-only", "--listen",
                            "/ip4/127.0.0.1/tcp/0")
        nodes["client"] = client

        def workers_seen() -> bool:
            return any("sharded" in m["covey"]["routes"]
                       for m in client.api("/v1/models")["data"])

        wait_until(workers_seen, 30, "the workers", list(nodes.values()))

        # Load: the first sharded request loads the model over the tunnels; the first token's
        # arrival time minus a warm request's is the load. Raw: the engine's own load.
        first = call_in(ns, stream_chat, client, 4)
        warm = call_in(ns, stream_chat, client, 4)
        covey_load = first["total_s"] - warm["total_s"]
        layers = [int(m.split("(")[1].split()[0]) for m in first["covey"]["machines"]]
        split = tuple(float(n) for n in layers)
        procs, endpoints = start_raw_workers()
        try:
            engine, raw_first = raw_load(model_path, endpoints, split)
            engine.close()
            engine, raw_reload = raw_load(model_path, endpoints, split)
            print(f"placement: {', '.join(first['covey']['machines'])}")
            # Covey reload: restart the client; the workers keep their tensor cache.
            client.stop()
            client = start_node(netns, ns, token, "client", work, "--lan-only", "--listen",
                                "/ip4/127.0.0.1/tcp/0")
            nodes["client"] = client
            wait_until(workers_seen, 30, "the workers again", list(nodes.values()))
            again = call_in(ns, stream_chat, client, 4)
            warm = call_in(ns, stream_chat, client, 4)
            covey_reload = again["total_s"] - warm["total_s"]
            print(f"model load, first: covey {covey_load:.2f} s, raw {raw_first:.2f} s; "
                  f"reload: covey {covey_reload:.2f} s, raw {raw_reload:.2f} s "
                  "(covey: a cold 4-token request's time minus a warm one's)")

            rates: dict[str, list[float]] = {"covey": [], "raw": []}
            for r in range(args.rounds):
                for kind in (("covey", "raw") if r % 2 == 0 else ("raw", "covey")):
                    if kind == "covey":
                        rates[kind].append(call_in(ns, stream_chat, client, args.tokens)["rate"])
                    else:
                        rates[kind].append(raw_generate(engine, args.tokens))
            covey, raw = statistics.median(rates["covey"]), statistics.median(rates["raw"])
            print(f"generation tokens/s over two workers: covey {covey:.1f}, raw {raw:.1f}, "
                  f"ratio {covey / raw:.2f} (target >= 0.90; median of {args.rounds} "
                  f"alternating rounds of {args.tokens} tokens)")
            engine.close()
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait()

        join(netns, ns, token, work, nodes, client)
        victim = failover(nodes, client)
        if victim is not None:
            rejoin(netns, ns, token, work, nodes, client, victim)
    bulk_throughput()
    return 0


def start_worker(netns: Netns, ns: str, token: str, work: Path, nodes: dict[str, RunningNode],
                 client: RunningNode, name: str) -> None:
    """Start (or restart, same data dir and peer id) a worker and wait for the client to see
    its worker entry."""
    nodes[name] = start_node(netns, ns, token, name, work, "--lan-only", "--listen",
                             "/ip4/127.0.0.1/tcp/0", "--worker", "--share-mib", SHARE_MIB)
    wait_until(lambda: any(p["name"] == name and p["worker"] for p in client.peers()), 30,
               f"{name}'s worker entry", list(nodes.values()))


def first_token_after(client: RunningNode, ns: str, change: Any) -> tuple[float, float, int]:
    """(time to first token before `change()`, after it, engine loads in between): a warm
    4-token request on the loaded session, then the change, then the next request."""
    before = call_in(ns, stream_chat, client, 4)["first_s"]
    loads = client.log().count("sharded engine loaded")
    change()
    after = call_in(ns, stream_chat, client, 4)["first_s"]
    return before, after, client.log().count("sharded engine loaded") - loads


def join(netns: Netns, ns: str, token: str, work: Path, nodes: dict[str, RunningNode],
         client: RunningNode) -> None:
    """A third worker with the same share joins the loaded pair (it is the spare the failover
    step needs): the next request's time to first token, which a reload would add to."""
    before, after, loads = first_token_after(
        client, ns, lambda: start_worker(netns, ns, token, work, nodes, client, "w3"))
    print(f"equal worker joins: first token {after:.2f} s after, {before:.2f} s before; "
          f"engine reloads: {loads} (target 0)")


def failover(nodes: dict[str, RunningNode], client: RunningNode) -> str | None:
    """Kill a worker mid-reply with a spare worker online: seconds to the next token. Returns
    the worker killed (None when the reply was too short to kill one in)."""
    serving = call_in(client.ns, stream_chat, client, 4)["covey"]["machines"]
    victim = serving[-1].split(" (")[0]
    killed_at: list[float] = []

    def kill(count: int) -> None:
        if count == 16 and not killed_at:
            nodes[victim].proc.send_signal(signal.SIGKILL)
            killed_at.append(time.monotonic())

    reply = call_in(client.ns, stream_chat, client, 160, kill)
    if not killed_at:
        print(f"failover: not measured, the reply had only {len(reply['times'])} tokens "
              f"({reply['covey']})")
        return None
    after = next(t for t in reply["times"] if t > killed_at[0])
    print(f"failover: killed {victim} after 16 tokens; next token {after - killed_at[0]:.2f} s "
          f"later (target <= 5 s), reply went on to {len(reply['times'])} tokens; "
          f"notice: {reply['covey'].get('notice')!r}")
    return victim


def rejoin(netns: Netns, ns: str, token: str, work: Path, nodes: dict[str, RunningNode],
           client: RunningNode, victim: str) -> None:
    """The killed worker comes back while the reply's new pair holds the model."""
    nodes[victim].proc.wait()
    before, after, loads = first_token_after(
        client, ns, lambda: start_worker(netns, ns, token, work, nodes, client, victim))
    print(f"killed worker rejoins: first token {after:.2f} s after, {before:.2f} s before; "
          f"engine reloads: {loads} (target 0)")


def bulk_throughput() -> None:
    """Bulk MB/s through the tunnel vs raw loopback TCP: bench/tunnel.py's transport part."""
    subprocess.run([sys.executable, str(Path(__file__).with_name("tunnel.py")),
                    "--skip-generation", "--rounds", "2"], check=True)


if __name__ == "__main__":
    sys.exit(main())
