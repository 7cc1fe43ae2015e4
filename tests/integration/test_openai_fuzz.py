"""Property-based requests built from the served OpenAPI document: bodies that follow the
schemas, bodies that break them in one field, and arbitrary JSON. The parser must answer
each with a completion or a 400 (never anything else), and a real node must never answer 5xx.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.store.model_store import ModelStore
from swarm.api.openai_api import BadRequest, parse_completion
from swarm.api.openapi import openapi_document
from swarm.trust.token import new_token
from tests.support.netns import Netns, call_in, netns_skip_reason
from tests.support.node_harness import start_node

pytestmark = pytest.mark.netns

DOC = openapi_document()
SCHEMAS = DOC["components"]["schemas"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """A strategy for values the (OpenAPI 3.1 / JSON Schema) `schema` accepts; small subset."""
    if "$ref" in schema:
        return from_schema(SCHEMAS[schema["$ref"].rsplit("/", 1)[1]], depth)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, depth) for s in schema[key]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    types = schema.get("type", "object")
    if isinstance(types, list):
        return st.one_of([from_schema({**schema, "type": t}, depth) for t in types])
    if types == "null":
        return st.none()
    if types == "boolean":
        return st.booleans()
    if types == "integer":
        return st.integers(schema.get("minimum", -1000), schema.get("maximum", 1000))
    if types == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -10))
        return st.floats(low, schema.get("maximum", 10), exclude_min="exclusiveMinimum" in schema,
                         allow_nan=False)
    if types == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=12)
    if types == "array":
        return st.lists(from_schema(schema.get("items", {}), depth + 1),
                        min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 3), 3))
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    if not props and isinstance(extra, dict):  # a map, e.g. logit_bias: token id -> bias
        names = schema.get("propertyNames", {}).get("pattern")
        keys = st.from_regex(names, fullmatch=True) if names else st.text(max_size=8)
        return st.dictionaries(keys.filter(lambda k: len(k) < 12), from_schema(extra, depth + 1),
                               max_size=3)
    required = set(schema.get("required", []))
    optional = {k: from_schema(v, depth + 1) for k, v in props.items() if k not in required}
    return st.fixed_dictionaries({k: from_schema(props[k], depth + 1) for k in required},
                                 optional=optional)


def broken(schema_name: str) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with one field replaced by arbitrary JSON."""
    props = sorted(SCHEMAS[schema_name]["properties"])
    return st.tuples(from_schema(SCHEMAS[schema_name]), st.sampled_from(props),
                     json_values).map(lambda t: {**t[0], t[1]: t[2]})


def bodies(schema_name: str) -> st.SearchStrategy[Any]:
    return st.one_of(from_schema(SCHEMAS[schema_name]), broken(schema_name), json_values)


@settings(max_examples=400, deadline=None)
@given(body=bodies("ChatCompletionRequest"))
def test_chat_parser_accepts_or_says_400(body: Any) -> None:
    try:
        parsed = parse_completion(body, "chat")
    except BadRequest as exc:
        assert exc.status == 400 and exc.message
        return
    assert parsed.generate.messages and 1 <= parsed.generate.max_tokens <= 32768


@settings(max_examples=300, deadline=None)
@given(body=bodies("CompletionRequest"))
def test_text_parser_accepts_or_says_400(body: Any) -> None:
    try:
        parsed = parse_completion(body, "text")
    except BadRequest as exc:
        assert exc.status == 400
        return
    assert isinstance(parsed.generate.prompt, str)


def consistent_tools(body: dict[str, Any]) -> dict[str, Any]:
    """`body` kept to what the document says in words, not schemas: tool names are unique,
    and a required or named tool_choice needs that tool in `tools`."""
    tools = list({t["function"]["name"]: t for t in body.get("tools") or []}.values())
    choice = body.get("tool_choice")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if choice == "required" and not tools:
        choice = "auto"
    if isinstance(choice, dict) and name not in {t["function"]["name"] for t in tools}:
        choice = "none"
    return {**body, "tools": tools or None, "tool_choice": choice}


@settings(max_examples=200, deadline=None)
@given(body=from_schema(SCHEMAS["ChatCompletionRequest"]).map(consistent_tools))
def test_every_body_the_document_allows_parses(body: dict[str, Any]) -> None:
    parse_completion(body, "chat")  # the document promises these are valid


@settings(max_examples=200, deadline=None)
@given(bias=st.dictionaries(st.integers(0, 10**6).map(str), st.floats(-100, 100), max_size=8),
       top=st.integers(0, 20), penalty=st.floats(-2, 2), top_k=st.integers(0, 500),
       min_p=st.floats(0, 1), stops=st.lists(st.text(min_size=1, max_size=5), max_size=16))
def test_sampling_fields_within_their_limits_reach_the_engine_request(
        bias: dict[str, float], top: int, penalty: float, top_k: int, min_p: float,
        stops: list[str]) -> None:
    parsed = parse_completion({"model": "m", "messages": [{"role": "user", "content": "x"}],
                               "logit_bias": bias, "logprobs": True, "top_logprobs": top,
                               "presence_penalty": penalty, "frequency_penalty": penalty,
                               "top_k": top_k, "min_p": min_p, "stop": stops}, "chat")
    request = parsed.generate
    assert dict(request.logit_bias) == {int(k): v for k, v in bias.items()}
    assert (request.top_logprobs, request.top_k, request.min_p) == (top, top_k, min_p)
    assert request.presence_penalty == request.frequency_penalty == penalty
    assert request.stop == tuple(stops) and request.logprobs


@given(tools=from_schema({"type": "array", "items": SCHEMAS["Tool"], "minItems": 1}),
       choice=st.sampled_from(["auto", "required", "named"]), parallel=st.booleans(),
       output=from_schema(SCHEMAS["ResponseFormat"]))
def test_every_tool_choice_the_document_allows_makes_a_grammar_or_none(
        tools: list[dict[str, Any]], choice: str, parallel: bool,
        output: dict[str, Any]) -> None:
    body = consistent_tools({"model": "m", "messages": [{"role": "user", "content": "x"}],
                             "tools": tools, "parallel_tool_calls": parallel,
                             "response_format": output, "tool_choice": choice if choice != "named"
                             else {"type": "function", "function": tools[0]["function"]}})
    parsed = parse_completion(body, "chat")
    forced = choice != "auto" or output["type"] != "text"
    assert (parsed.generate.grammar is not None) == forced, body


@pytest.fixture(scope="module")
def node_port(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if netns_skip_reason() is not None:
        pytest.skip(str(netns_skip_reason()))
    workdir = tmp_path_factory.mktemp("fuzz")
    data_dir = workdir / "node"
    ModelStore(data_dir / "models").import_file(tiny_model, "tiny")
    with Netns() as netns:
        ns = netns.add("fuzz")
        start_node(netns, ns, new_token().encode(), "fuzz", workdir, "--lan-only",
                   "--listen", "/ip4/127.0.0.1/tcp/0", data_dir=data_dir)
        port = json.loads((data_dir / "api.json").read_text())["port"]
        yield ns, port, (data_dir / "api-secret").read_text().strip()


def test_a_real_node_never_answers_5xx(node_port: Any) -> None:
    import http.client

    ns, port, key = node_port
    seen: dict[int, int] = {}

    def send(path: str, body: Any) -> tuple[int, bytes]:
        if isinstance(body, dict) and "model" in body and isinstance(body.get("model"), str):
            body = {**body, "model": "tiny", "max_tokens": 4}  # keep generations short
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        out = (resp.status, resp.read())
        conn.close()
        return out

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(which=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
           data=st.data())
    def check(which: str, data: st.DataObject) -> None:
        schema = "ChatCompletionRequest" if "chat" in which else "CompletionRequest"
        status, raw = send(which, data.draw(bodies(schema)))
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, raw
        if status >= 400:
            assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
        elif b"data: " not in raw[:10]:
            assert json.loads(raw)["usage"]["completion_tokens"] <= 4

    call_in(ns, check)
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both sides were exercised
