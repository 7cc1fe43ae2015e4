"""Tool calling and structured output on a real node serving the bundled Gemma 3 270M, as
clients use them: the official `openai` client, LangChain's ChatOpenAI and LiteLLM.

Gemma 3 270M has no chat template, so the tools reach it in the system prompt; a forced
tool choice or a response_format holds its reply to the schema with a grammar, which is what
these tests check (a model this small is not asked to choose well, only to answer validly).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from backends.store.model_store import ModelStore
from swarm.trust.token import new_token
from tests.support.netns import Netns, call_in, netns_skip_reason
from tests.support.node_harness import RunningNode, start_node

pytestmark = [
    pytest.mark.gemma,
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city", "parameters": CITY}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}},
        "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30},
    "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"], "additionalProperties": False}


@dataclass
class Api:
    node: RunningNode
    port: int
    key: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.key, max_retries=0,
                             timeout=120)

    def run(self, fn: Any, *args: Any) -> Any:
        return call_in(self.node.ns, fn, *args, timeout=300)


@pytest.fixture(scope="module")
def api(gemma_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    workdir = tmp_path_factory.mktemp("tools")
    data_dir = workdir / "node"
    ModelStore(data_dir / "models").import_file(gemma_model, "gemma")
    with Netns() as netns:
        ns = netns.add("tools")
        node = start_node(netns, ns, new_token().encode(), "tools-node", workdir,
                          "--listen", "/ip4/127.0.0.1/tcp/0", "--lan-only", data_dir=data_dir)
        port = json.loads((data_dir / "api.json").read_text())["port"]
        yield Api(node, port, (data_dir / "api-secret").read_text().strip())


def test_a_forced_tool_call_has_arguments_that_follow_the_schema(api: Api) -> None:
    def go() -> Any:
        return api.client().chat.completions.create(
            model="gemma", messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})

    reply = api.run(go)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), CITY)


def test_a_required_tool_call_streams_as_tool_call_chunks(api: Api) -> None:
    def go() -> list[Any]:
        return list(api.client().chat.completions.create(
            model="gemma", messages=ASK, tools=[WEATHER], tool_choice="required",
            parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True))

    chunks = [c for c in api.run(go) if c.choices]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [(t.index, t.function.name) for t in calls] == [(0, "get_weather")]
    jsonschema.validate(json.loads(calls[0].function.arguments), CITY)


def test_a_tool_result_turn_is_answered(api: Api) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]

    def go() -> Any:
        return api.client().chat.completions.with_raw_response.create(
            model="gemma", messages=messages, tools=[WEATHER], tool_choice="none",
            max_tokens=24, temperature=0)

    raw = api.run(go)
    reply = raw.parse()
    assert raw.status_code == 200
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_json_schema_output_parses_and_validates(api: Api) -> None:
    def go() -> Any:
        return api.client().chat.completions.create(
            model="gemma", max_tokens=120, temperature=0,
            messages=[{"role": "user", "content": "Invent a person: a name and an age."}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "person", "schema": PERSON, "strict": True}})

    reply = api.run(go)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def test_a_schema_that_cannot_be_honoured_is_a_400_naming_it(api: Api) -> None:
    def go() -> Any:
        return api.client().chat.completions.create(
            model="gemma", messages=ASK, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {
                    "type": "array", "minItems": 5000}}})

    with pytest.raises(openai.BadRequestError) as caught:
        api.run(go)
    assert caught.value.body["param"] == "response_format"


def test_langchain_bind_tools_and_with_structured_output(api: Api) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=30)
        age: int = Field(ge=0, le=150)

    def go() -> tuple[Any, Any]:
        llm = ChatOpenAI(model="gemma", base_url=api.base_url, api_key=api.key,
                         temperature=0, max_tokens=120, max_retries=0, timeout=120)
        called = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke(
            "What is the weather in Paris?")
        person = llm.with_structured_output(Person).invoke("Invent a person.")
        return called, person

    called, person = api.run(go)
    [call] = called.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], CITY)
    assert isinstance(person, Person) and 0 <= person.age <= 150


def test_litellm_tools(api: Api) -> None:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no fetch from the internet
    import litellm

    litellm.telemetry = False

    def go() -> Any:
        return litellm.completion(
            model="openai/gemma", api_base=api.base_url, api_key=api.key, messages=ASK,
            tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0)

    reply = api.run(go)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY)
