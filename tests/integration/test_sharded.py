"""Sharded chat with real nodes: two workers with different shares and a client, in a network
namespace. Greedy output over the workers equals local output; the layers follow the shares;
the reply survives a worker killed or turned off mid-reply; a worker that joins does not
reload what is loaded; a second client gets a clear refusal; a model too big for the swarm
says how much memory is missing."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backends.layer_split import layers_per_device
from backends.store.model_store import ModelStore
from swarm.trust.token import new_token
from tests.support.netns import Netns, call_in, netns_skip_reason
from tests.support.node_harness import REPO, RunningNode, start_node, wait_until
from tests.support.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.netns

CHAT = [{"role": "user", "content": "Tell me a story"}]
N_LAYERS = 8


@dataclass
class ShardSwarm:
    netns: Netns
    ns: str
    token: str
    workdir: Path
    nodes: dict[str, RunningNode]

    def start(self, name: str, *extra: str, model: Path | None = None) -> RunningNode:
        data_dir = self.workdir / name
        if model is not None:
            ModelStore(data_dir / "models").import_file(model, model.stem)
        node = start_node(self.netns, self.ns, self.token, name, self.workdir, "--lan-only",
                          "--listen", "/ip4/127.0.0.1/tcp/0", *extra, data_dir=data_dir)
        self.nodes[name] = node
        return node

    def wait_workers(self, client: RunningNode, names: set[str]) -> None:
        def seen() -> bool:
            models = {m["id"]: m for m in client.api("/v1/models")["data"]}
            machines = models.get("tiny", {}).get("covey", {}).get("machines", [])
            return names <= set(machines)
        wait_until(seen, 30, f"workers {names}", list(self.nodes.values()))

    def chat(self, client: RunningNode, route: str, max_tokens: int = 24,
             model: str = "tiny", **fields: Any) -> tuple[int, Any]:
        port = json.loads((client.data_dir / "api.json").read_text())["port"]
        key = (client.data_dir / "api-secret").read_text().strip()

        def go() -> tuple[int, Any]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/chat/completions", body=json.dumps({
                "model": model, "messages": CHAT, "max_tokens": max_tokens,
                "temperature": 0, "covey_route": route, "covey_deterministic": True,
                **fields}),
                headers={"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            conn.close()
            return resp.status, data

        return call_in(client.ns, go)

    def stream(self, client: RunningNode, max_tokens: int, on_chunk: Any) -> list[Any]:
        """A streamed sharded chat; `on_chunk(chunks)` runs after each chunk with text."""
        port = json.loads((client.data_dir / "api.json").read_text())["port"]
        key = (client.data_dir / "api-secret").read_text().strip()

        def go() -> list[Any]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/chat/completions", body=json.dumps({
                "model": "tiny", "messages": CHAT, "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "covey_route": "sharded",
                "covey_deterministic": True}),
                headers={"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            chunks: list[Any] = []
            for raw in resp:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    chunks.append({"done": True})
                    break
                if line.startswith("data: "):
                    chunks.append(json.loads(line[len("data: "):]))
                    if chunks[-1].get("choices") and chunks[-1]["choices"][0]["delta"].get(
                            "content"):
                        on_chunk(chunks)
            conn.close()
            return chunks

        return call_in(client.ns, go)


def text_of(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c.get("choices"))


def layer_counts(machines: list[str]) -> dict[str, int]:
    found = (re.fullmatch(r"(\S+) \((\d+) layers\)", m) for m in machines)
    return {m.group(1): int(m.group(2)) for m in found if m}


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """35 MiB with its KV cache: more than w1's share alone, less than both shares."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny8") / "tiny.gguf", n_layers=N_LAYERS,
                           n_embd=256, n_ff=512)


@pytest.fixture
def shards(tiny8: Path, tmp_path: Path) -> Iterator[ShardSwarm]:
    if netns_skip_reason() is not None:
        pytest.skip(str(netns_skip_reason()))
    with Netns() as netns:
        swarm = ShardSwarm(netns, netns.add("shard"), new_token().encode(), tmp_path, {})
        swarm.start("w1", "--worker", "--share-mib", "30")
        swarm.start("w2", "--worker", "--share-mib", "10")
        client = swarm.start("client", model=tiny8)
        swarm.wait_workers(client, {"w1", "w2"})
        yield swarm  # closing the namespaces kills the nodes


def test_sharded_greedy_reply_equals_local_and_follows_the_shares(shards: ShardSwarm) -> None:
    client = shards.nodes["client"]
    status, sharded = shards.chat(client, "sharded")
    assert status == 200, sharded
    status, local = shards.chat(client, "local")
    assert status == 200, local
    assert sharded["covey"]["route"] == "sharded"
    text = sharded["choices"][0]["message"]["content"]
    assert text and text == local["choices"][0]["message"]["content"]
    counts = layer_counts(sharded["covey"]["machines"])
    assert counts == dict(zip(("w1", "w2"), layers_per_device(N_LAYERS, (3, 1)), strict=True))
    assert counts["w1"] > counts["w2"] > 0
    # The same through `covey chat --route sharded`, as a user would run it.
    result = shards.netns.run(shards.ns, [
        sys.executable, "-m", "app.cli", "chat", "Tell me a story", "--route", "sharded",
        "--model", "tiny", "--deterministic", "--temperature", "0", "--max-tokens", "24",
        "--repeat-penalty", "1",  # as the API chats above: llama.cpp's default, off
        "--json", "--data-dir", str(client.data_dir)], cwd=REPO, timeout=120)
    cli = json.loads(result.stdout)
    assert cli["text"] == text and cli["covey"]["route"] == "sharded", cli
    assert layer_counts(cli["covey"]["machines"]) == counts
    # Two sharded replies on one plan: the engine loaded over the workers once, not per reply.
    assert client.log().count("sharded engine loaded") == 1, client.log()
    # The workers are reachable directly on this LAN, so the fast path carried the RPC bytes.
    links = client.api("/api/status")["sharded_links"]
    assert links == {"w1": "direct TLS", "w2": "direct TLS"}, links
    # Both workers show as leased by the client, in their own status.
    for name in ("w1", "w2"):
        worker = shards.nodes[name].api("/api/status")["worker"]
        assert worker["enabled"] and worker["leased_by"] == client.peer_id, worker
        # ... and its RPC bytes came over the direct path, which /api/status counts.
        direct = worker["rpc_traffic"]["direct"]
        assert direct["connections"] >= 1 and direct["bytes_up"] > 0, worker
    # ... and in the swarm's peer list, with what each donates.
    def donated() -> dict[str, Any]:
        return {p["name"]: p["worker"] for p in client.peers() if p["worker"]}
    wait_until(lambda: donated() == {
        "w1": {"donated_bytes": 30 << 20, "state": "leased", "leased_by": client.peer_id},
        "w2": {"donated_bytes": 10 << 20, "state": "leased", "leased_by": client.peer_id}},
        20, "the leases in the ledger", list(shards.nodes.values()))


_OUTSIDER = """
import os, socket, sys
from swarm.workers.direct_tls import DirectClient, DirectUnavailable
port, sha = int(sys.argv[1]), sys.argv[2]
try:
    DirectClient(("127.0.0.1", port), sha, os.urandom(32)).probe(5)
    print("admitted")
except DirectUnavailable as exc:
    print("refused:", exc)
with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
    s.sendall(b"\\x00" * 64 + b"GET / HTTP/1.1\\r\\n\\r\\n")
    try:
        print("plain:", len(s.recv(100)))
    except OSError as exc:
        print("plain: reset")
"""


def test_the_direct_path_admits_only_the_lease_holder(shards: ShardSwarm) -> None:
    """Someone who knows the port and the certificate but holds no lease gets nothing."""
    shards.chat(shards.nodes["client"], "sharded")
    worker = shards.nodes["w1"].api("/api/status")["worker"]
    sha = json.loads(shards.netns.run(shards.ns, [
        sys.executable, "-c", "import json,sys; from pathlib import Path; "
        "from swarm.workers.direct_tls import load_or_create_certificate as c; "
        "print(json.dumps(c(Path(sys.argv[1])).sha256))", str(shards.nodes["w1"].data_dir)],
        cwd=REPO, timeout=30).stdout)
    out = shards.netns.run(shards.ns, [sys.executable, "-c", _OUTSIDER,
                                       str(worker["direct_port"]), sha],
                           cwd=REPO, timeout=60).stdout
    assert "refused:" in out and "admitted" not in out, out
    assert "plain: 0" in out or "plain: reset" in out, out
    # The lease holder's own link still works afterwards.
    status, again = shards.chat(shards.nodes["client"], "sharded")
    assert status == 200 and again["covey"]["route"] == "sharded", again


def test_a_second_client_gets_a_clear_refusal(shards: ShardSwarm, tiny8: Path) -> None:
    client = shards.nodes["client"]
    assert shards.chat(client, "sharded")[0] == 200  # the client now holds both leases
    other = shards.start("other", model=tiny8)
    wait_until(lambda: len(other.others_online()) == 3, 30, "the other client joining",
               list(shards.nodes.values()))

    def leased_view() -> bool:
        status, reply = shards.chat(other, "sharded")
        return status != 200 and "leased by" in reply["error"]["message"]
    wait_until(leased_view, 20, "a refusal naming the lease", list(shards.nodes.values()))
    status, reply = shards.chat(other, "sharded")
    assert status == 400, reply
    for name in ("w1", "w2"):
        assert f"{name} (leased by client)" in reply["error"]["message"], reply
    assert shards.chat(other, "local")[0] == 200  # its own engine still answers


def test_a_worker_joining_does_not_reload_what_is_loaded(shards: ShardSwarm) -> None:
    """w3 donates as much as w1 (more than w2): ranked afresh, w1 and w3 would hold the model,
    but w1 and w2 hold it already, so the next chat runs on them without reloading."""
    client = shards.nodes["client"]
    status, first = shards.chat(client, "sharded")
    assert status == 200, first
    shards.start("w3", "--worker", "--share-mib", "30")
    wait_until(lambda: any(p["name"] == "w3" and p["worker"] for p in client.peers()), 30,
               "w3's worker entry", list(shards.nodes.values()))
    status, second = shards.chat(client, "sharded")
    assert status == 200, second
    assert second["covey"]["machines"] == first["covey"]["machines"], second
    assert sorted(layer_counts(second["covey"]["machines"])) == ["w1", "w2"]
    assert client.log().count("sharded engine loaded") == 1, client.log()
    assert shards.nodes["w3"].api("/api/status")["worker"]["state"] == "idle"


def test_a_worker_killed_mid_reply_the_reply_completes(shards: ShardSwarm) -> None:
    """With a third worker like w2, the reply goes on over w1 and the one left."""
    client = shards.nodes["client"]
    shards.start("w3", "--worker", "--share-mib", "10")
    shards.wait_workers(client, {"w1", "w2", "w3"})
    status, whole = shards.chat(client, "sharded", max_tokens=300)
    assert status == 200, whole
    first = sorted(layer_counts(whole["covey"]["machines"]))
    assert len(first) == 2 and "w1" in first, first
    victim = next(m for m in first if m != "w1")
    spare = ({"w2", "w3"} - {victim}).pop()
    killed: list[str] = []

    def kill_after_some(chunks: list[Any]) -> None:
        if not killed and len(text_of(chunks)) > 20:
            killed.append(victim)
            shards.nodes[victim].proc.send_signal(signal.SIGKILL)

    chunks = shards.stream(client, 300, kill_after_some)
    assert killed and chunks[-1] == {"done": True}, chunks[-3:]
    chunks = chunks[:-1]
    notices = {c["covey"].get("notice") for c in chunks} - {None}
    assert notices == {f"{victim} left mid-reply; continuing on w1, {spare}"}, notices
    assert sorted(layer_counts(chunks[-1]["covey"]["machines"])) == sorted({"w1", victim, spare})
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    switch = next(i for i, c in enumerate(chunks) if c["covey"].get("notice"))
    before = text_of(chunks[:switch])
    assert before and whole["choices"][0]["message"]["content"].startswith(before)
    assert len(text_of(chunks[switch:])) > 0


def test_a_killed_rpc_server_is_back_at_once_and_no_chat_waits_on_it(shards: ShardSwarm) -> None:
    """The RPC child of w2 dies (SIGKILL): w2 ends the client's lease, comes back with a new
    child within 5 s, idle in its ledger entry; a chat started right then does not wait 30 s
    for the dead server."""
    client, w2 = shards.nodes["client"], shards.nodes["w2"]
    status, first = shards.chat(client, "sharded")  # the client now holds w2's lease
    assert status == 200, first
    before = w2.api("/api/status")["worker"]
    old = before["rpc_server"]["pid"]
    assert before["leased_by"] == client.peer_id and old, before
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        chat = pool.submit(shards.chat, client, "sharded")

        def back() -> Any:
            worker = w2.api("/api/status")["worker"]
            mine = next(p["worker"] for p in w2.peers() if p["self"])
            fresh = worker["rpc_server"]["pid"] not in (None, old)
            return worker if fresh and worker["enabled"] and mine == {
                "donated_bytes": 10 << 20, "state": "idle", "leased_by": None} else None

        worker = wait_until(back, 5, "w2's RPC server back and its entry idle",
                            list(shards.nodes.values()), every=0.1)
        assert worker["rpc_server"]["restarts"] == 1, worker
        assert worker["rpc_server"]["last_exit"] == "signal SIGKILL", worker
        assert worker["rpc_server"]["error"] is None, worker
        status, reply = chat.result(timeout=60)
    took = time.monotonic() - killed
    assert took < 15, (took, reply)  # not the 30 s an engine waits on a dead worker
    # It completes, on the workers or (w2 lost under it) on the client; never hangs.
    assert status == 200 and reply["choices"][0]["message"]["content"], reply
    # The lease ended with the server, so the client knows which worker went: w2, not "a
    # worker" (and w1, which did nothing wrong, is not distrusted with it).
    assert reply["covey"].get("notice") in (None, "w2 failed; continuing on this machine"), reply
    # The restarted server serves: once the client has let the dead session go, a chat is
    # sharded over w1 and w2 again.
    def sharded_again() -> bool:
        status, reply = shards.chat(client, "sharded")
        return status == 200 and "w2" in layer_counts(reply["covey"]["machines"])
    wait_until(sharded_again, 90, "a sharded reply over the restarted w2",
               list(shards.nodes.values()), every=2)


def test_worker_mode_turned_off_mid_reply_the_reply_completes(shards: ShardSwarm) -> None:
    """w1 alone cannot hold the model: after w2 goes, the next reply runs on the client."""
    client = shards.nodes["client"]
    turned_off: list[bool] = []

    def off_after_some(chunks: list[Any]) -> None:
        if not turned_off and len(text_of(chunks)) > 20:
            turned_off.append(True)
            shards.nodes["w2"].api("/api/worker", "POST", {"enabled": False})

    chunks = shards.stream(client, 300, off_after_some)
    assert turned_off and chunks[-1] == {"done": True}, chunks[-3:]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    # The client gives the lease back once its reply is done, and w2 stops.
    wait_until(lambda: not shards.nodes["w2"].api("/api/status")["worker"]["enabled"], 30,
               "w2 to stop", list(shards.nodes.values()))
    # ... and the client's ledger learns it (until then a plan may still try w2 and be refused).
    wait_until(lambda: not any(p["name"] == "w2" and p["worker"] for p in client.peers()), 30,
               "w2's worker entry to go", list(shards.nodes.values()))
    status, reply = shards.chat(client, "sharded")
    assert status == 400 and "not used" not in reply["error"]["message"], reply
    assert "the swarm's usable workers donate 30.0 MiB" in reply["error"]["message"], reply
    status, reply = shards.chat(client, "auto")
    assert status == 200 and reply["covey"]["route"] == "local", reply


def test_a_model_too_big_for_the_swarm_says_what_is_missing(shards: ShardSwarm,
                                                             tmp_path: Path) -> None:
    big = write_tiny_gguf(tmp_path / "huge.gguf", n_layers=4, n_embd=512, n_ff=2048)
    client = shards.nodes["client"]
    ModelStore(client.data_dir / "models").import_file(big, "huge")
    models = {m["id"]: m["covey"]["routes"] for m in client.api("/v1/models")["data"]}
    assert models["huge"] == ["local"] and "sharded" in models["tiny"], models
    status, reply = shards.chat(client, "sharded", model="huge")
    assert status == 400, reply
    assert re.fullmatch(r"cannot shard 'huge': the model needs [\d.]+ MiB across workers, the "
                        r"swarm's usable workers donate 40.0 MiB: [\d.]+ MiB missing",
                        reply["error"]["message"]), reply


def test_logprobs_through_the_sharded_route_are_the_local_ones(shards: ShardSwarm) -> None:
    client = shards.nodes["client"]
    asked = {"logprobs": True, "top_logprobs": 2, "max_tokens": 8}
    status, sharded = shards.chat(client, "sharded", **asked)
    assert status == 200, sharded
    status, local = shards.chat(client, "local", **asked)
    assert status == 200, local
    assert sharded["covey"]["route"] == "sharded"
    got = sharded["choices"][0]["logprobs"]["content"]
    assert len(got) == sharded["usage"]["completion_tokens"] > 0
    assert all(len(entry["top_logprobs"]) == 2 for entry in got)
    want = local["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in got] == [e["token"] for e in want]


def test_a_json_schema_reply_over_the_workers_follows_the_schema(shards: ShardSwarm) -> None:
    schema = {"type": "object", "properties": {"size": {"enum": ["small", "big"]},
                                               "n": {"type": "integer"}},
              "required": ["size", "n"], "additionalProperties": False}
    status, reply = shards.chat(shards.nodes["client"], "sharded", max_tokens=64,
                                response_format={"type": "json_schema", "json_schema": {
                                    "name": "s", "schema": schema, "strict": True}})
    assert status == 200, reply
    assert reply["covey"]["route"] == "sharded"
    value = json.loads(reply["choices"][0]["message"]["content"])
    assert set(value) == {"size", "n"} and value["size"] in ("small", "big")
    assert isinstance(value["n"], int)
