"""The OpenAPI document: well formed, every $ref resolves, and it agrees with the handlers.

Neither openapi-spec-validator nor jsonschema is a dependency, so the checks are structural.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from swarm.api import openai_api, openapi, sampling
from swarm.api.openapi import openapi_document
from swarm.ledger import entries
from swarm.node import api_handlers
from swarm.node import daemon as node
from swarm.routes import preparing
from swarm.routes import route as routes
from swarm.workers.direct_tls import DirectStats
from swarm.workers.tunnel import LinkStats

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return openapi_document()


def refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        if isinstance(value.get("$ref"), str):
            yield value["$ref"]
        for item in value.values():
            yield from refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from refs(item)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """The target of a local $ref (a JSON pointer into the document); KeyError if none."""
    assert ref.startswith("#/"), f"{ref} is not a local reference"
    target: Any = doc
    for part in ref[2:].split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return target


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert method in METHODS, f"{path}: {method}"
            yield path, method, op


def test_document_is_plain_json_for_openapi_3_1(doc: dict[str, Any]) -> None:
    assert json.loads(json.dumps(doc)) == doc
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["servers"] == [{"url": "/"}]
    assert openapi_document("http://127.0.0.1:8123")["servers"] == [
        {"url": "http://127.0.0.1:8123"}]
    assert openapi_document() is not openapi_document()  # callers may change their copy


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    found = set(refs(doc))
    assert "#/components/schemas/ChatCompletionRequest" in found
    for ref in found:
        target = resolve(doc, ref)
        assert isinstance(target, dict) and target, ref
    with pytest.raises(KeyError):
        resolve(doc, "#/components/schemas/NoSuchThing")


class RouteRecorder:
    """Enough of a Node and a LocalApi for Node's `_add_*routes`: it records the routes."""

    def __init__(self) -> None:
        self.routes: set[tuple[str, str]] = set()

    def add_route(self, method: str, path: str, handler: object, **options: bool) -> None:
        self.routes.add((method.lower(), path))

    def __getattr__(self, name: str) -> Any:
        method = getattr(node.Node, name, None)
        if name.startswith("_add") and callable(method):
            return method.__get__(self)  # Node's own route table, run against the recorder
        return self  # self.api, self.openai and every handler


def test_paths_are_the_routes_the_node_serves(doc: dict[str, Any]) -> None:
    loopback = RouteRecorder()
    node.Node._add_routes(loopback)  # type: ignore[arg-type]
    assert {(method, path) for path, method, _ in operations(doc)} == loopback.routes

    network, fake = RouteRecorder(), RouteRecorder()
    node.Node._add_openai_routes(fake, network)  # type: ignore[arg-type]
    network_doc = openapi_document(node_api=False)
    assert {(method, path) for path, method, _ in operations(network_doc)} == network.routes


def test_every_operation_is_complete_and_guarded(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert doc["security"] == [{"bearer": []}]
    ids = []
    for path, method, op in operations(doc):
        ids.append(op["operationId"])
        assert "security" not in op, f"{method} {path} must not override the bearer gate"
        responses = op["responses"]
        assert "200" in responses and {"401", "403", "500"} <= set(responses), path
        for status, response in responses.items():
            response = resolve(doc, response["$ref"]) if "$ref" in response else response
            assert response["description"] and response["content"], (path, status)
            if status != "200":
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"}
        if method == "post":
            body = op["requestBody"]["content"]["application/json"]["schema"]
            assert resolve(doc, body["$ref"])["type"] == "object"
    assert len(ids) == len(set(ids))


def test_generation_endpoints(doc: dict[str, Any]) -> None:
    busy = doc["components"]["responses"]["TooManyRequests"]
    assert "Retry-After" in busy["headers"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"400", "404", "429", "503"} <= set(responses)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert "[DONE]" in responses["200"]["description"]


def test_request_schemas_and_examples_agree_with_the_handlers(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["required"] == ["model", "messages"]
    assert schemas["CompletionRequest"]["required"] == ["model", "prompt"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "ChatMessage"):
        assert schemas[name].get("additionalProperties", True) is True, name
    assert schemas["NodeUpdateRequest"]["additionalProperties"] is False
    paths = doc["paths"]
    for path, kind in (("/v1/chat/completions", "chat"), ("/v1/completions", "text")):
        example = paths[path]["post"]["requestBody"]["content"]["application/json"]["example"]
        openai_api.parse_completion(example, kind)  # raises if the handler would refuse it
    example = paths["/api/node"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert set(example) <= set(schemas["NodeUpdateRequest"]["properties"])


def test_link_counters_are_the_links_counters(doc: dict[str, Any]) -> None:
    counters = doc["components"]["schemas"]["LinkCounters"]
    for stats in (LinkStats(), DirectStats()):
        assert set(counters["properties"]) == set(counters["required"]) == set(stats.counters())


def test_limits_are_the_handlers_limits() -> None:
    assert openapi.ROUTE_NAMES == routes.ROUTE_NAMES
    assert openapi.MAX_TOKENS_LIMIT == openai_api.MAX_TOKENS_LIMIT
    assert openapi.DEFAULT_MAX_TOKENS == openai_api.DEFAULT_MAX_TOKENS
    assert openapi.MAX_STOPS == openai_api.MAX_STOPS
    assert openapi.MAX_MESSAGES == openai_api.MAX_MESSAGES
    assert openapi.ROLES == entries.ROLES
    assert openapi.MAX_NAME_CHARS == entries.MAX_NAME_CHARS
    assert openapi.STATUS_VERSION == api_handlers.STATUS_VERSION
    assert openapi.NODE_INFO_VERSION == entries.INFO_VERSION
    assert openapi.REGISTRATION_VERSION == preparing.REGISTRATION_VERSION
    assert openapi.BUNDLED_WAIT_S == preparing.WAIT_S
    assert openapi.MAX_STOPS == sampling.MAX_STOPS == 16
    for name in ("MAX_TOP_LOGPROBS", "MAX_TEXT_LOGPROBS", "MAX_LOGIT_BIAS",
                 "STRICT_MAX_TOKENS_HEADER"):
        assert getattr(openapi, name) == getattr(sampling, name), name
    for name in ("LOWERED_HEADER", "LOWERED_USAGE_KEY"):
        assert getattr(openapi, name) == getattr(openai_api, name), name


def test_sampling_fields_are_described(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for name in ("top_k", "min_p", "presence_penalty", "frequency_penalty", "logit_bias",
                 "logprobs"):
        for request in ("ChatCompletionRequest", "CompletionRequest"):
            assert name in schemas[request]["properties"], (request, name)
    assert "top_logprobs" in schemas["ChatCompletionRequest"]["properties"]
    assert {"echo", "suffix"} <= set(schemas["CompletionRequest"]["properties"])


def test_tool_limits_are_the_handlers_limits(doc: dict[str, Any]) -> None:
    from swarm.api import tools

    assert openapi.MAX_TOOLS == tools.MAX_TOOLS
    assert f"^{tools._NAME.pattern}$" == openapi.TOOL_NAME_PATTERN
    schemas = doc["components"]["schemas"]
    assert "tool_calls" in schemas["ChatCompletionChoice"]["properties"]["message"]["properties"]
    assert "tool_calls" in schemas["ChatCompletionChoice"]["properties"]["finish_reason"]["enum"]
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        assert "response_format" in schemas[request]["properties"]
    assert "tools" not in schemas["CompletionRequest"]["properties"]


class _Route:
    def __init__(self, name: str, models: dict[str, list[str]]) -> None:
        self.name, self._models = name, models

    def model_ids(self) -> list[str]:
        return list(self._models)

    def machines(self, model: str) -> list[str]:
        return self._models[model]


class _Router:
    def routes(self) -> list[_Route]:
        return [_Route("local", {"mine": ["here"]}),
                _Route("federated", {"mine": ["peer"], "theirs": ["peer"]}),
                _Route("sharded", {"split": ["a", "b"]})]

    def preview(self, model: str) -> None:
        return None


def test_models_say_which_take_embeddings_as_the_document_does(doc: dict[str, Any]) -> None:
    models = {m["id"]: m for m in openai_api.OpenAiApi(_Router())._models()}  # type: ignore[arg-type]
    # Embeddings run on this machine's models and on those a federated node serves, not on
    # a model that only a sharded route splits over workers.
    assert models["mine"]["covey"]["embeddings"] is True
    assert models["theirs"]["covey"]["embeddings"] is True
    assert models["split"]["covey"]["embeddings"] is False
    schema = doc["components"]["schemas"]["Model"]
    covey = schema["properties"]["covey"]
    for entry in models.values():
        assert set(entry) == set(schema["properties"]) == set(schema["required"])
        assert set(covey["required"]) <= set(entry["covey"]) <= set(covey["properties"])
