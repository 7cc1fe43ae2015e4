"""Federated mode with real nodes: two federated nodes serve a client node's requests, spread
by load; killing one mid-reply, the reply goes on from the other; nobody serving a model;
embeddings of a model only the federated nodes hold, equal to their own."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import random
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backends.store.model_store import ModelStore
from swarm.routes.federated import Candidate, pick
from swarm.trust.token import new_token
from tests.support.netns import Netns, call_in, netns_skip_reason
from tests.support.node_harness import RunningNode, start_node, wait_until

pytestmark = pytest.mark.netns

CHAT = [{"role": "user", "content": "Tell me a story"}]

FEDERATED_CTX = 1024  # the tiny model's own context (256) is too small for a tool list


def test_pick_prefers_fewest_in_flight_and_skips_failed() -> None:
    rng = random.Random(1)
    found = [Candidate("a", "a", 2), Candidate("b", "b", 0), Candidate("c", "c", 0)]
    picks = {pick(found, {}, set(), rng).peer_id for _ in range(50)}
    assert picks == {"b", "c"}  # ties broken at random, the busy one never chosen
    assert pick(found, {"b": 3}, set(), rng).peer_id == "c"  # our own dispatches count
    assert pick(found, {}, {"b", "c"}, rng).peer_id == "a"
    assert pick(found, {}, {"a", "b", "c"}, rng) is None


@dataclass
class Swarm:
    client: RunningNode
    servers: list[RunningNode]
    port: int
    key: str

    def ask(self, max_tokens: int = 16, stream: bool = False) -> tuple[int, Any]:
        def go() -> tuple[int, Any]:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn.request("POST", "/v1/chat/completions", body=json.dumps({
                "model": "tiny", "messages": CHAT, "max_tokens": max_tokens,
                "temperature": 0, "stream": stream}),
                headers={"Authorization": f"Bearer {self.key}"})
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            return resp.status, data if stream else json.loads(data)

        return call_in(self.client.ns, go)

    def embed(self, node: RunningNode, inputs: list[str]) -> tuple[int, Any]:
        """POST /v1/embeddings to `node`'s own API."""
        port = json.loads((node.data_dir / "api.json").read_text())["port"]
        key = (node.data_dir / "api-secret").read_text().strip()

        def go() -> tuple[int, Any]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/embeddings", body=json.dumps(
                {"model": "tiny", "input": inputs}), headers={"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            conn.close()
            return resp.status, data

        return call_in(node.ns, go)


@pytest.fixture
def swarm(tiny_model: Path, tmp_path: Path) -> Iterator[Swarm]:
    if netns_skip_reason() is not None:
        pytest.skip(str(netns_skip_reason()))
    token = new_token().encode()
    with Netns() as netns:
        ns = netns.add("fed")
        servers = []
        for name in ("f1", "f2"):
            data_dir = tmp_path / name
            ModelStore(data_dir / "models").import_file(tiny_model, "tiny")
            servers.append(start_node(netns, ns, token, name, tmp_path, "--lan-only",
                                      "--listen", "/ip4/127.0.0.1/tcp/0", "--federated",
                                      # room for the tool list the tools test puts in the prompt
                                      "--model", "tiny", "--ctx", str(FEDERATED_CTX),
                                      data_dir=data_dir))
        client = start_node(netns, ns, token, "client", tmp_path, "--lan-only",
                            "--listen", "/ip4/127.0.0.1/tcp/0")
        wait_until(lambda: sum("federated" in m["covey"]["routes"]
                               for m in client.api("/v1/models")["data"]) == 1
                   and len(client.others_online()) == 2, 20, "the federated nodes",
                   [client, *servers])
        port = json.loads((client.data_dir / "api.json").read_text())["port"]
        key = (client.data_dir / "api-secret").read_text().strip()
        yield Swarm(client, servers, port, key)


def test_requests_are_spread_across_two_federated_nodes(swarm: Swarm) -> None:
    models = {m["id"]: m for m in swarm.client.api("/v1/models")["data"]}
    assert models["tiny"]["covey"]["routes"] == ["federated"]
    assert sorted(models["tiny"]["covey"]["machines"]) == ["f1", "f2"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: swarm.ask(max_tokens=60), range(4)))
    assert all(status == 200 for status, _ in replies), replies
    served = [r["covey"]["machines"] for _, r in replies]
    assert all(r["covey"]["route"] == "federated" for _, r in replies)
    assert {m for ms in served for m in ms} == {"f1", "f2"}, served
    assert all(r["usage"]["completion_tokens"] == 60 for _, r in replies)


def test_a_federated_node_killed_mid_reply_the_reply_goes_on(swarm: Swarm) -> None:
    status, whole = swarm.ask(max_tokens=400)
    assert status == 200
    expected = whole["choices"][0]["message"]["content"]
    by_name = {s.name: s for s in swarm.servers}

    def read_and_kill() -> tuple[list[dict[str, Any]], str]:
        conn = http.client.HTTPConnection("127.0.0.1", swarm.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": "tiny", "messages": CHAT, "max_tokens": 400, "temperature": 0,
            "stream": True}), headers={"Authorization": f"Bearer {swarm.key}"})
        resp = conn.getresponse()
        chunks, killed = [], ""
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                chunks.append({"done": True})
                break
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[len("data: "):])
            chunks.append(chunk)
            has_text = chunk["choices"] and chunk["choices"][0]["delta"].get("content")
            if has_text and not killed and len(chunks) > 3:
                killed = chunk["covey"]["machines"][-1]  # the node serving right now
                by_name[killed].proc.send_signal(signal.SIGKILL)
        conn.close()
        return chunks, killed

    chunks, killed = call_in(swarm.client.ns, read_and_kill)
    assert killed and chunks[-1] == {"done": True}, chunks[-3:]
    chunks = chunks[:-1]
    notices = {c["covey"].get("notice") for c in chunks} - {None}
    machines = chunks[-1]["covey"]["machines"]
    assert machines[0] == killed and len(machines) == 2, machines
    assert notices == {f"{killed} failed mid-reply; continuing on another machine"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")

    def text(part: list[dict[str, Any]]) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in part
                       if c["choices"])

    switch = next(i for i, c in enumerate(chunks) if c["covey"].get("notice"))
    before, after = text(chunks[:switch]), text(chunks[switch:])
    # What the first node sent is the uninterrupted reply's beginning, and the reply went on.
    # (The text is re-tokenised for the continuation, so the very next tokens may differ.)
    assert before and expected.startswith(before)
    assert after.strip()


def test_a_model_nobody_serves(swarm: Swarm) -> None:
    def go() -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", swarm.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": "nope", "messages": CHAT, "covey_route": "federated"}),
            headers={"Authorization": f"Bearer {swarm.key}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    status, reply = call_in(swarm.client.ns, go)
    assert status == 404 and reply["error"]["code"] == "model_not_found"


def test_every_federated_node_busy_is_queued_then_a_clear_429(swarm: Swarm) -> None:
    def one(_: int) -> tuple[int, str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", swarm.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": "tiny", "messages": CHAT, "max_tokens": 100, "temperature": 0}),
            headers={"Authorization": f"Bearer {swarm.key}"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        ok = resp.status != 200 or body["usage"]["completion_tokens"] == 100
        assert ok, body
        return resp.status, resp.getheader("retry-after")

    def burst() -> list[tuple[int, str | None]]:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return list(pool.map(one, range(16)))

    results = call_in(swarm.client.ns, burst)
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, results
    assert statuses.count(200) >= 10  # 2 nodes x (1 running + 4 queued) were all served
    assert all(retry and int(retry) >= 1 for status, retry in results if status == 429)


def test_federated_mode_is_switched_at_runtime(swarm: Swarm) -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        swarm.client.api("/api/federated", "POST", {"enabled": True, "model": "tiny"})
    assert "404" in refused.value.stderr and "not in this node's store" in refused.value.stderr
    f1 = swarm.servers[0]
    status = f1.api("/api/federated", "POST", {"enabled": False})
    assert status["federated"]["enabled"] is False
    wait_until(lambda: {m["id"]: m for m in swarm.client.api("/v1/models")["data"]}["tiny"][
        "covey"]["machines"] == ["f2"], 10, "f1 to stop serving", [swarm.client, f1])
    code, reply = swarm.ask(max_tokens=4)
    assert code == 200 and reply["covey"]["machines"] == ["f2"]


def test_logprobs_and_a_lowered_max_tokens_cross_the_federated_route(swarm: Swarm) -> None:
    def go(stream: bool = False) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", swarm.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": "tiny", "messages": CHAT, "max_tokens": 5000, "temperature": 0,
            "logprobs": True, "top_logprobs": 3, "presence_penalty": 0.5, "stream": stream}),
            headers={"Authorization": f"Bearer {swarm.key}"})
        resp = conn.getresponse()
        body = resp.read()
        out = (resp.status, {k.lower(): v for k, v in resp.getheaders()},
               body if stream else json.loads(body))
        conn.close()
        return out

    status, headers, reply = call_in(swarm.client.ns, go)
    assert status == 200, reply
    assert reply["covey"]["route"] == "federated"
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] > 0
    assert all(len(entry["top_logprobs"]) == 3 for entry in content)
    lowered = reply["usage"]["covey_max_tokens_lowered_to"]
    assert headers["x-covey-max-tokens-lowered"] == str(lowered) and lowered < FEDERATED_CTX
    # A stream's headers say it too: the peer sends the lowering with the first token.
    status, headers, events = call_in(swarm.client.ns, go, True)
    assert status == 200 and events.rstrip().endswith(b"data: [DONE]")
    assert headers["x-covey-max-tokens-lowered"] == str(lowered)


def test_a_forced_tool_call_crosses_to_a_federated_node(swarm: Swarm) -> None:
    unit = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}},
            "required": ["unit"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "set_unit", "parameters": unit}}

    def go() -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", swarm.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": "tiny", "messages": CHAT, "max_tokens": 64, "temperature": 0,
            "tools": [tool], "tool_choice": "required", "parallel_tool_calls": False}),
            headers={"Authorization": f"Bearer {swarm.key}"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        return resp.status, data

    status, reply = call_in(swarm.client.ns, go)
    assert status == 200, reply
    assert reply["covey"]["route"] == "federated"
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "set_unit"
    assert json.loads(call["function"]["arguments"])["unit"] in ("c", "f")


def test_embeddings_of_a_model_only_federated_nodes_hold(swarm: Swarm) -> None:
    models = {m["id"]: m for m in swarm.client.api("/v1/models")["data"]}
    assert models["tiny"]["covey"]["embeddings"] is True
    inputs = ["The cat sat on the mat.", "A kitten sat on the rug."]
    status, reply = swarm.embed(swarm.client, inputs)
    assert status == 200, reply
    assert reply["covey"]["route"] == "federated"
    [machine] = reply["covey"]["machines"]
    by_name = {s.name: s for s in swarm.servers}
    status, own = swarm.embed(by_name[machine], inputs)
    assert status == 200 and own["covey"]["route"] == "local", own
    assert reply["usage"] == own["usage"]
    for got, expected in zip(reply["data"], own["data"], strict=True):
        assert got["embedding"] == pytest.approx(expected["embedding"], rel=1e-5, abs=1e-6)
    status, refused = swarm.embed(swarm.client, ["x"] * 129)
    assert status == 400 and "at most 128" in refused["error"]["message"], refused
