"""OpenAI API benchmark: one real node serving the bundled Gemma 3 270M.

1. Load: 50 concurrent streaming chat requests. Every one must end as a complete answer
   (`finish_reason` then `data: [DONE]`) or a 429 with Retry-After; none lost or cut short.
   Prints p50/p95 time to first token of the answered ones, and the node's RSS when idle,
   at its peak during the burst, and after (target: back within 10% of idle).
2. Overhead: generation tokens/s through the API (streamed, measured by the client) against
   Covey's engine driven directly in this process, rounds alternating; median of the
   per-round ratios (target >= 0.95).

Needs root (the node runs in a network namespace the benchmark creates).

    .venv/bin/python bench/api.py [--concurrent 50] [--rounds 7] [--tokens 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.engine import Engine  # noqa: E402
from backends.engine_protocol import Done, EngineConfig, GenerateRequest  # noqa: E402
from backends.store.model_store import DEFAULT_MODEL, ModelStore  # noqa: E402
from swarm.trust.token import new_token  # noqa: E402
from tests.support.netns import Netns, call_in  # noqa: E402
from tests.support.node_harness import start_node  # noqa: E402

PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
          "Begin: ")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Client:
    def __init__(self, port: int, key: str) -> None:
        self.port, self.key = port, key

    def stream(self, messages: list[dict[str, str]], max_tokens: int,
               temperature: float = 0.0, **fields: Any) -> dict[str, Any]:
        """One streamed chat request: status, time to first token, tokens and their timing."""
        body = json.dumps({"model": DEFAULT_MODEL, "messages": messages, "stream": True,
                           "max_tokens": max_tokens, "temperature": temperature,
                           "stream_options": {"include_usage": True}, **fields})
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {self.key}"})
        resp = conn.getresponse()
        out: dict[str, Any] = {"status": resp.status, "retry_after": resp.getheader("retry-after")}
        if resp.status != 200:
            resp.read()
            conn.close()
            return out
        first = last = None
        finish = usage = None
        done = False
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                finish = choice.get("finish_reason") or finish
        conn.close()
        out.update(done=done, finish=finish, usage=usage,
                   ttft=(first - start) if first else None,
                   gen_s=(last - first) if first and last else None)
        return out


def burst(client: Client, node_pid: int, n: int) -> dict[str, Any]:
    peak = [rss_bytes(node_pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(rss_bytes(node_pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    messages = [{"role": "user", "content": PROMPT}]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: client.stream(messages, 32), range(n)))
    stop.set()
    sampler.join()
    return {"results": results, "peak": max(peak)}


def direct_rate(engine: Engine, prompt: str, tokens: int) -> float:
    first = last = None
    count = 0
    for event in engine.generate(GenerateRequest(id="", messages=(
            {"role": "user", "content": prompt},), max_tokens=tokens, temperature=0.0)):
        if isinstance(event, Done):
            break
        last = time.perf_counter()
        first = first or last
        count += 1
    return (count - 1) / (last - first)


def api_rate(client: Client, prompt: str, tokens: int) -> float:
    r = client.stream([{"role": "user", "content": prompt}], tokens)
    # Streamed text arrives once per token here (Gemma's tokens are whole pieces of text).
    return (r["usage"]["completion_tokens"] - 1) / r["gen_s"]


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 30},
                         "age": {"type": "integer"}}}


def report_grammar_ttft(client: Client, ns: str, rounds: int = 5) -> None:
    """Time to first token with and without a json_schema grammar (reported, no target)."""
    grammar = {"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}}}
    times: dict[str, list[float]] = {"plain": [], "json_schema": []}
    for r in range(rounds):
        messages = [{"role": "user", "content": f"{r}. Invent a person: a name and an age."}]
        for which, extra in (("plain", {}), ("json_schema", grammar)):
            got = call_in(ns, lambda m=messages, e=extra: client.stream(m, 32, **e))
            if got.get("ttft") is not None:
                times[which].append(got["ttft"])
    print("time to first token, median: " + ", ".join(
        f"{k} {statistics.median(v):.3f} s" for k, v in times.items() if v))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Netns() as netns:
        workdir = Path(tmp)
        data_dir = workdir / "node"
        model = ModelStore(data_dir / "models").ensure(DEFAULT_MODEL).path
        ns = netns.add("api")
        node = start_node(netns, ns, new_token().encode(), "bench", workdir, "--lan-only",
                          "--listen", "/ip4/127.0.0.1/tcp/0", data_dir=data_dir)
        port = json.loads((data_dir / "api.json").read_text())["port"]
        client = Client(port, (data_dir / "api-secret").read_text().strip())
        pid = node.proc.pid

        call_in(ns, client.stream, [{"role": "user", "content": "Hi"}], 8)  # load + warm up
        time.sleep(1)
        idle = rss_bytes(pid)
        load = call_in(ns, burst, client, pid, args.concurrent)
        time.sleep(2)
        after = rss_bytes(pid)

        results = load["results"]
        answered = [r for r in results if r["status"] == 200]
        refused = [r for r in results if r["status"] == 429]
        complete = [r for r in answered if r["done"] and r["finish"] in ("stop", "length")]
        ttfts = sorted(r["ttft"] for r in answered if r["ttft"] is not None)
        print(f"{args.concurrent} concurrent streams: {len(answered)} answered "
              f"({len(complete)} complete), {len(refused)} refused with 429 "
              f"(all with Retry-After: {all(r['retry_after'] for r in refused)}), "
              f"{len(results) - len(answered) - len(refused)} other")
        if ttfts:
            p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
            print(f"time to first token: p50 {statistics.median(ttfts):.2f} s, p95 {p95:.2f} s")
        print(f"node RSS: idle {idle / 2**20:.1f} MiB, peak {load['peak'] / 2**20:.1f} MiB, "
              f"after {after / 2**20:.1f} MiB (after/idle {after / idle:.3f}: "
              f"{'pass' if after <= idle * 1.10 else 'FAIL'})")
        lost = len(answered) - len(complete) + len(results) - len(answered) - len(refused)
        report_grammar_ttft(client, ns)

        with Engine(EngineConfig(model_path=str(model))) as engine:
            engine.wait_loaded()
            direct_rate(engine, "Hi", 4)
            ratios, api_rates, direct_rates = [], [], []
            for r in range(args.rounds):
                prompt = f"{r}. {PROMPT}"
                order = ("api", "direct") if r % 2 == 0 else ("direct", "api")
                got: dict[str, float] = {}
                for which in order:
                    if which == "api":
                        got[which] = call_in(ns, api_rate, client, prompt, args.tokens)
                    else:
                        got[which] = direct_rate(engine, prompt, args.tokens)
                api_rates.append(got["api"])
                direct_rates.append(got["direct"])
                ratios.append(got["api"] / got["direct"])
                print(f"round {r + 1}: api {got['api']:.1f} tok/s, direct "
                      f"{got['direct']:.1f} tok/s, ratio {ratios[-1]:.3f}", flush=True)
        ratio = statistics.median(ratios)
        print(f"generation tok/s: api {statistics.median(api_rates):.1f}, direct "
              f"{statistics.median(direct_rates):.1f}; median per-round ratio {ratio:.3f} "
              f"(target >= 0.95: {'pass' if ratio >= 0.95 else 'FAIL'})")
        ok = lost == 0 and after <= idle * 1.10 and ratio >= 0.95
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
