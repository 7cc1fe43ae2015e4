"""Tool calling and structured output on a real node, as clients use them: the official
`openai` client, LangChain's ChatOpenAI and LiteLLM.

The bundled Gemma 3 270M has no chat template, so the tools reach it in the system prompt; a
forced tool choice or a response_format holds its reply to the schema with a grammar, which is
what its tests check (a model this small is not asked to choose well, only to answer validly).
The users' default, Qwen2.5 Coder 0.5B Instruct, has a chat template with tools: with
`tool_choice` "auto" it must choose the tool itself for an obvious request (written in its own
`<tool_call>` tags), then answer the tool's result in text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from backends.store.bundled import GEMMA, QWEN

# The same node as the completions tests (Gemma is one of its bundled models), and another
# like it that has Qwen.
from tests.integration import test_openai_api
from tests.integration.test_openai_api import Api, serving
from tests.support.netns import netns_skip_reason

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]

api = test_openai_api.api  # its module-scoped node, started again for this module
TIMEOUT = 300.0
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


@pytest.fixture(scope="module")
def qwen_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with serving(tmp_path_factory.mktemp("qwen"), "qwen-node",
                 lambda store: store.ensure_bundled(QWEN.name)) as running:
        yield running


@pytest.mark.gemma
def test_a_forced_tool_call_has_arguments_that_follow_the_schema(api: Api) -> None:
    def go() -> Any:
        return api.client(timeout=120).chat.completions.create(
            model=GEMMA.name, messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})

    reply = api.run(go, timeout=TIMEOUT)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), CITY)


@pytest.mark.gemma
def test_a_required_tool_call_streams_as_tool_call_chunks(api: Api) -> None:
    def go() -> list[Any]:
        return list(api.client(timeout=120).chat.completions.create(
            model=GEMMA.name, messages=ASK, tools=[WEATHER], tool_choice="required",
            parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True))

    chunks = [c for c in api.run(go, timeout=TIMEOUT) if c.choices]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [(t.index, t.function.name) for t in calls] == [(0, "get_weather")]
    jsonschema.validate(json.loads(calls[0].function.arguments), CITY)


@pytest.mark.gemma
def test_a_tool_result_turn_is_answered(api: Api) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]

    def go() -> Any:
        return api.client(timeout=120).chat.completions.with_raw_response.create(
            model=GEMMA.name, messages=messages, tools=[WEATHER], tool_choice="none",
            max_tokens=24, temperature=0)

    raw = api.run(go, timeout=TIMEOUT)
    reply = raw.parse()
    assert raw.status_code == 200
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


@pytest.mark.gemma
def test_json_schema_output_parses_and_validates(api: Api) -> None:
    def go() -> Any:
        return api.client(timeout=120).chat.completions.create(
            model=GEMMA.name, max_tokens=120, temperature=0,
            messages=[{"role": "user", "content": "Invent a person: a name and an age."}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "person", "schema": PERSON, "strict": True}})

    reply = api.run(go, timeout=TIMEOUT)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


@pytest.mark.gemma
def test_a_schema_that_cannot_be_honoured_is_a_400_naming_it(api: Api) -> None:
    def go() -> Any:
        return api.client(timeout=120).chat.completions.create(
            model=GEMMA.name, messages=ASK, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {
                    "type": "array", "minItems": 5000}}})

    with pytest.raises(openai.BadRequestError) as caught:
        api.run(go, timeout=TIMEOUT)
    assert caught.value.body["param"] == "response_format"


@pytest.mark.gemma
def test_langchain_bind_tools_and_with_structured_output(api: Api) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=30)
        age: int = Field(ge=0, le=150)

    def go() -> tuple[Any, Any]:
        llm = ChatOpenAI(model=GEMMA.name, base_url=api.base_url, api_key=api.key,
                         temperature=0, max_tokens=120, max_retries=0, timeout=120)
        called = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke(
            "What is the weather in Paris?")
        person = llm.with_structured_output(Person).invoke("Invent a person.")
        return called, person

    called, person = api.run(go, timeout=TIMEOUT)
    [call] = called.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], CITY)
    assert isinstance(person, Person) and 0 <= person.age <= 150


@pytest.mark.gemma
def test_litellm_tools(api: Api) -> None:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no fetch from the internet
    import litellm

    litellm.telemetry = False

    def go() -> Any:
        return litellm.completion(
            model=f"openai/{GEMMA.name}", api_base=api.base_url, api_key=api.key, messages=ASK,
            tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0)

    reply = api.run(go, timeout=TIMEOUT)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY)


def qwen_weather(api: Api, messages: list[dict[str, Any]], choice: str = "auto",
                 **kw: Any) -> Any:
    def go() -> Any:
        return api.client(timeout=120).chat.completions.create(
            model=QWEN.name, messages=messages, tools=[WEATHER, TIME], tool_choice=choice,
            max_tokens=120, temperature=0, **kw)

    return api.run(go, timeout=TIMEOUT)


@pytest.mark.qwen
def test_auto_tool_choice_calls_the_tool_then_answers_its_result(qwen_api: Api) -> None:
    asked = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    reply = qwen_weather(qwen_api, asked)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, CITY)
    assert "paris" in arguments["city"].lower()

    # Qwen 0.5B calls the tool again after its result when it may (greedy or sampled), so
    # the result turn says "none", as a client does that wants the answer now.
    answered = qwen_weather(qwen_api, [
        *asked, {"role": "assistant", "content": None,
                 "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}], "none")
    choice = answered.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls, choice.message
    assert "21" in choice.message.content or "sunny" in choice.message.content.lower()


@pytest.mark.qwen
def test_auto_tool_choice_streams_the_call_as_tool_call_chunks(qwen_api: Api) -> None:
    asked = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    chunks = [c for c in qwen_weather(qwen_api, asked, stream=True) if c.choices]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)  # no <tool_call> text leaks
    [call] = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert call.index == 0 and call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
