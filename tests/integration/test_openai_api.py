"""The OpenAI-compatible API of a real node serving the tiny model: the official `openai`
package, plain HTTP for SSE framing, every bad input, back-pressure and disconnects.

The node runs in a namespace the test creates; clients join it from a thread (`call_in`)."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from app.common.chat_request import DEFAULTS
from backends.store.model_store import ModelStore
from swarm.trust.token import new_token
from tests.support.netns import Netns, call_in, netns_skip_reason
from tests.support.node_harness import RunningNode, start_node

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]

CHAT = [{"role": "user", "content": "Say hello"}]


@dataclass
class Api:
    node: RunningNode
    port: int
    key: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.key, max_retries=0, **kw)

    def run(self, fn: Any, *args: Any, timeout: float = 120.0) -> Any:
        return call_in(self.node.ns, fn, *args, timeout=timeout)

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        def go() -> tuple[int, dict[str, str], bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            sent = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json",
                    **(headers or {})}
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            out = (resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
            conn.close()
            return out

        return self.run(go)

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, dict[str, str], Any]:
        status, headers, data = self.raw("POST", path, json.dumps(body).encode(), **kw)
        return status, headers, json.loads(data) if data.startswith(b"{") else data


@contextmanager
def serving(workdir: Path, name: str, stock: Callable[[ModelStore], Any]) -> Iterator[Api]:
    """A node called `name` alone in a namespace, its store filled by `stock` first."""
    data_dir = workdir / "node"
    stock(ModelStore(data_dir / "models"))
    with Netns() as netns:
        ns = netns.add(name.split("-")[0])
        node = start_node(netns, ns, new_token().encode(), name, workdir,
                          "--listen", "/ip4/127.0.0.1/tcp/0", "--lan-only", data_dir=data_dir)
        port = json.loads((data_dir / "api.json").read_text())["port"]
        yield Api(node, port, (data_dir / "api-secret").read_text().strip())


@pytest.fixture(scope="module")
def api(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with serving(tmp_path_factory.mktemp("openai"), "api-node",
                 lambda store: store.import_file(tiny_model, "tiny")) as running:
        yield running


def test_official_client_chat_not_streamed(api: Api) -> None:
    def go() -> Any:
        client = api.client()
        models = {m.id: m for m in client.models.list().data}
        reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8,
                                               temperature=0)
        return models, reply

    models, reply = api.run(go)
    assert "tiny" in models and models["tiny"].owned_by == "covey"
    assert models["tiny"].model_extra["covey"]["routes"] == ["local"]
    assert models["tiny"].model_extra["covey"]["embeddings"] is True
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    covey = dict(reply.model_extra["covey"])
    assert covey.pop("route_reason").startswith("fits this machine (needs "), covey
    assert covey == {"route": "local", "machines": ["api-node"]}


def test_official_client_streams_the_same_text(api: Api) -> None:
    def go() -> tuple[Any, list[Any]]:
        client = api.client()
        whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12,
                                               temperature=0)
        chunks = list(client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        return whole, chunks

    whole, chunks = api.run(go)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_official_client_text_completions_and_stop_and_seed(api: Api) -> None:
    def go() -> tuple[Any, ...]:
        client = api.client()
        plain = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6,
                                          temperature=0)
        streamed = list(client.completions.create(model="tiny", prompt="Once upon",
                                                  max_tokens=6, temperature=0, stream=True))
        a = client.completions.create(model="tiny", prompt="x", max_tokens=10, seed=7,
                                      temperature=1.0)
        b = client.completions.create(model="tiny", prompt="x", max_tokens=10, seed=7,
                                      temperature=1.0)
        return plain, streamed, a, b

    plain, streamed, a, b = api.run(go)
    assert plain.object == "text_completion" and plain.usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert a.choices[0].text == b.choices[0].text  # same seed, same sample

    first = plain.choices[0].text.strip()[:1]
    if first:  # stop at the first character the model produces: the text ends before it
        status, _, body = api.post("/v1/completions", {
            "model": "tiny", "prompt": "Once upon", "max_tokens": 6, "temperature": 0,
            "stop": first})
        assert status == 200 and first not in body["choices"][0]["text"]
        assert body["choices"][0]["finish_reason"] == "stop"


def test_sse_framing_over_plain_http(api: Api) -> None:
    status, headers, data = api.raw("POST", "/v1/chat/completions", json.dumps({
        "model": "tiny", "messages": CHAT, "max_tokens": 5, "stream": True}).encode())
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    events = data.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    parsed = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(p["object"] == "chat.completion.chunk" and p["id"] == parsed[0]["id"]
               for p in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny"}, 400, "messages"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": "hello"}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
         "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400,
         "messages[0].content"),
        ({"messages": CHAT}, 400, "model"),
        ({"model": 5, "messages": CHAT}, 400, "model"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": "8"}, 400, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "temperature": 5}, 400, "temperature"),
        ({"model": "tiny", "messages": CHAT, "stream": "yes"}, 400, "stream"),
        ({"model": "tiny", "messages": CHAT, "stop": [str(i) for i in range(17)]}, 400, "stop"),
        ({"model": "tiny", "messages": CHAT, "n": 2}, 400, "n"),
        ({"model": "tiny", "messages": CHAT, "covey_route": "moon"}, 400, "covey_route"),
        ({"model": "no-such-model", "messages": CHAT}, 404, "model"),
        ({"model": "tiny", "messages": CHAT, "covey_route": "sharded"}, 400, None),
    ],
)
def test_bad_requests_get_openai_errors(api: Api, body: dict, status: int, param: str) -> None:
    got, _, reply = api.post("/v1/chat/completions", body)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["param"] == param and reply["error"]["message"]
    if status == 404:
        assert reply["error"]["code"] == "model_not_found"


def test_a_request_longer_than_the_context_is_a_400_and_the_engine_stays(api: Api) -> None:
    # Asked for strictness: otherwise max_tokens is lowered to fit (next test).
    got, _, reply = api.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT,
                                                     "max_tokens": 5000},
                             headers={"x-covey-strict-max-tokens": "1"})
    assert got == 400, reply
    assert reply["error"]["code"] == "context_length_exceeded"
    assert reply["error"]["param"] == "max_tokens" and "context" in reply["error"]["message"]
    log_before = api.node.log().count("engine loaded")
    assert api.post("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})[0] == 200
    assert api.node.log().count("engine loaded") == log_before  # not reloaded


def test_a_max_tokens_over_the_context_is_lowered_and_says_so(api: Api) -> None:
    got, headers, reply = api.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT,
                                                           "max_tokens": 5000})
    assert got == 200, reply
    lowered = reply["usage"]["covey_max_tokens_lowered_to"]
    assert headers["x-covey-max-tokens-lowered"] == str(lowered)
    assert lowered + reply["usage"]["prompt_tokens"] == 256  # the tiny model's context
    assert reply["covey"]["max_tokens_lowered_to"] == lowered


def test_a_streamed_reply_says_the_lowering_in_its_headers(api: Api) -> None:
    def go() -> tuple[Any, list[Any]]:
        raw = api.client().chat.completions.with_raw_response.create(
            model="tiny", messages=CHAT, max_tokens=5000, stream=True,
            stream_options={"include_usage": True})
        return raw.headers, list(raw.parse())

    headers, chunks = api.run(go)
    lowered = chunks[-1].usage.model_extra["covey_max_tokens_lowered_to"]
    assert headers["x-covey-max-tokens-lowered"] == str(lowered)
    assert lowered + chunks[-1].usage.prompt_tokens == 256


def test_malformed_json_huge_body_key_and_host(api: Api) -> None:
    status, _, data = api.raw("POST", "/v1/chat/completions", b'{"model": "tiny", "mess')
    assert status == 400 and b"not valid JSON" in data
    big = json.dumps({"model": "tiny", "messages": [{"role": "user",
                                                     "content": "x" * 5_000_000}]}).encode()
    status, _, _ = api.raw("POST", "/v1/chat/completions", big)
    assert status == 413
    status, _, _ = api.raw("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, _, _ = api.raw("GET", "/v1/models", headers={"Host": "evil.example"})
    assert status == 403
    with pytest.raises(openai.AuthenticationError):
        api.run(lambda: openai.OpenAI(base_url=f"http://127.0.0.1:{api.port}/v1",
                                      api_key="wrong", max_retries=0).models.list())
    # No CORS: a web page in a browser gets no permission to read the API.
    status, headers, _ = api.raw("GET", "/v1/models",
                                 headers={"Origin": "http://evil.example"})
    assert status == 200 and not any(h.startswith("access-control-") for h in headers)
    status, headers, _ = api.raw("OPTIONS", "/v1/chat/completions",
                                 headers={"Origin": "http://evil.example",
                                          "Access-Control-Request-Method": "POST"})
    assert status == 405 and not any(h.startswith("access-control-") for h in headers)
    # The node still answers afterwards.
    assert api.post("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})[0] == 200


def test_a_client_that_disconnects_frees_the_engine(api: Api) -> None:
    def abandon() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({
            "model": "tiny", "prompt": "Go on", "max_tokens": 3000, "stream": True}),
            headers={"Authorization": f"Bearer {api.key}"})
        resp = conn.getresponse()
        got = resp.read1(200)
        conn.sock.close()  # hang up mid-stream
        return len(got)

    assert api.run(abandon) > 0
    started = time.monotonic()
    status, _, body = api.post("/v1/completions", {"model": "tiny", "prompt": "a",
                                                   "max_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    # Had the abandoned 3,000-token generation kept the engine, this would wait for it.
    assert time.monotonic() - started < 5


def test_beyond_the_queue_requests_get_429_with_retry_after(api: Api) -> None:
    def one(_: int) -> tuple[int, str | None, int]:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=120)
        conn.request("POST", "/v1/completions", body=json.dumps({
            "model": "tiny", "prompt": "Go on", "max_tokens": 400, "stream": True}),
            headers={"Authorization": f"Bearer {api.key}"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp.getheader("retry-after"), data.count(b"data: [DONE]")

    def burst() -> list[tuple[int, str | None, int]]:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            return list(pool.map(one, range(12)))

    results = api.run(burst)
    statuses = sorted(r[0] for r in results)
    assert set(statuses) <= {200, 429}
    assert 429 in statuses and 200 in statuses
    assert all(r[1] and int(r[1]) >= 1 for r in results if r[0] == 429)
    assert all(r[2] == 1 for r in results if r[0] == 200)  # every accepted one completes


def test_api_exposed_on_a_lan_only_with_an_api_key(tiny_model: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    ModelStore(data_dir / "models").import_file(tiny_model, "tiny")
    key_file = tmp_path / "key"
    key_file.write_text("k" * 8 + "-lan-api-key-0123\n")
    with Netns() as netns:
        server_ns, client_ns = netns.add("server"), netns.add("client")
        netns.veth_pair(server_ns, client_ns, "10.61.0.2", "10.61.0.3")
        token = new_token().encode()
        node = start_node(netns, server_ns, token, "server", tmp_path, "--lan-only",
                          "--api-listen", "10.61.0.2:8088", "--api-key-file", str(key_file),
                          data_dir=data_dir)
        key = key_file.read_text().strip()

        def from_the_lan() -> tuple[Any, int, int, int]:
            client = openai.OpenAI(base_url="http://10.61.0.2:8088/v1", api_key=key,
                                   max_retries=0)
            reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
            codes = []
            for headers in ({"Authorization": "Bearer wrong-key-wrong-key"},
                            {"Authorization": f"Bearer {key}", "Host": "evil.example:8088"},
                            {"Authorization": f"Bearer {key}"}):
                conn = http.client.HTTPConnection("10.61.0.2", 8088, timeout=30)
                path = "/api/peers" if len(codes) == 2 else "/v1/models"
                conn.request("GET", path, headers=headers)
                codes.append(conn.getresponse().status)
                conn.close()
            return reply, *codes

        reply, wrong_key, foreign_host, swarm_control = call_in(client_ns, from_the_lan)
        assert reply.usage.completion_tokens == 4
        assert (wrong_key, foreign_host) == (401, 403)
        assert swarm_control == 404  # only the OpenAI API is exposed, not /api/*
        assert node.proc.poll() is None


def test_api_listen_without_a_key_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    token = new_token().encode()
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "node", "--data-dir", str(tmp_path), "--token", token,
         "--api-listen", "0.0.0.0:8088"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2 and "needs an API key" in out.stderr
    assert not (tmp_path / "api.json").exists()


def test_covey_chat_route_goes_through_the_node(api: Api) -> None:
    import sys

    def chat(*extra: str, stdin: str | None = None) -> Any:
        return api.node.netns.run(api.node.ns, [
            sys.executable, "-m", "app.cli", "--data-dir", str(api.node.data_dir), "chat",
            "--route", "local", "--model", "tiny", "--max-tokens", "5", "--temperature", "0",
            *extra], input=stdin, check=False)

    one = chat("hello", "--json")
    assert one.returncode == 0, one.stderr
    reply = json.loads(one.stdout)
    assert reply["covey"] == {"route": "local", "route_reason": "asked for the local route",
                              "machines": ["api-node"]}
    assert reply["usage"]["completion_tokens"] == 5 and reply["finish_reason"] == "length"
    # The same sampling straight through the API: `covey chat` sends its repeat penalty too.
    status, _, direct = api.post("/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
        "temperature": 0, "repeat_penalty": DEFAULTS.repeat_penalty})
    assert reply["text"] == direct["choices"][0]["message"]["content"]

    talk = chat(stdin="hi\n/reset\nagain\n/exit\n")
    assert talk.returncode == 0 and talk.stdout.count("covey> ") == 2, talk.stderr

    missing = chat("hello", "--model", "nope")
    assert missing.returncode == 1 and "not served" in missing.stderr
    unavailable = chat("hello", "--route", "sharded")
    assert unavailable.returncode == 1 and "no worker in the swarm donates memory" in (
        unavailable.stderr)
