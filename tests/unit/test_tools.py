"""Tool calling and structured output, the pure parts: reading tools, tool_choice and
response_format; the grammar they make; tool turns in the prompt; finding tool calls in a
reply; and the request crossing to another node with all of it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backends.engine_protocol import Done, GenerateRequest
from backends.generation.grammar import MAX_REPEAT, GrammarError, schema_to_grammar
from backends.text.chat_template import render_chat
from backends.text.tool_prompt import TOOLS_HEADER
from swarm.api.openai_api import chunk, full_response, parse_completion
from swarm.api.server import HttpError
from swarm.api.tools import CallHold, extract_tool_calls, may_be_call, parse_tool_plan
from swarm.routes.federated import parse_request_frame, request_frame

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}}}}
USER = {"role": "user", "content": "Weather in Paris?"}
NAMES = frozenset({"get_weather", "get_time"})


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER], **fields}


def refused(body: dict[str, Any], kind: str = "chat") -> str | None:
    with pytest.raises(HttpError) as caught:
        parse_completion(body, kind)
    assert caught.value.status == 400
    return caught.value.param


# -- requests --------------------------------------------------------------------------------


def test_no_tools_no_grammar_and_nothing_changes() -> None:
    c = parse_completion(chat(), "chat")
    assert c.generate.tools is None and c.generate.grammar is None
    assert c.generate.messages == (USER,)


def test_tools_default_to_auto_without_grammar() -> None:
    c = parse_completion(chat(tools=[WEATHER]), "chat")
    assert c.tools.choice == "auto" and c.tools.calls_possible
    assert json.loads(c.generate.tools or "") == [WEATHER]
    assert c.generate.grammar is None  # the model is free to answer in text


def test_required_and_named_choices_force_a_call_with_a_grammar() -> None:
    required = parse_completion(chat(tools=[WEATHER, TIME], tool_choice="required"), "chat")
    assert required.generate.grammar and '"\\"get_weather\\""' in required.generate.grammar
    assert '"\\"get_time\\""' in required.generate.grammar
    named = parse_completion(chat(tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_time"}}), "chat")
    assert named.tools.choice == "function"
    assert named.generate.grammar and "get_weather" not in named.generate.grammar


def test_tool_choice_none_hides_the_tools_from_the_model() -> None:
    c = parse_completion(chat(tools=[WEATHER], tool_choice="none"), "chat")
    assert c.generate.tools is None and not c.tools.calls_possible


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": "x"}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"functions": [WEATHER["function"]]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "maxItems": MAX_REPEAT + 1}}}},
     "response_format"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(fields: dict[str, Any],
                                                           param: str) -> None:
    assert refused(chat(**fields)) == param


def test_tools_are_for_chat_only_but_completions_take_response_format() -> None:
    assert refused({"model": "m", "prompt": "x", "tools": [WEATHER]}, "text") == "tools"
    c = parse_completion({"model": "m", "prompt": "x",
                          "response_format": {"type": "json_object"}}, "text")
    assert c.generate.grammar and c.generate.tools is None


def test_json_schema_and_json_object_become_grammars() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    c = parse_completion(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "count", "schema": schema, "strict": True}}), "chat")
    assert c.generate.grammar == schema_to_grammar(schema)
    plain = parse_completion(chat(response_format={"type": "text"}), "chat")
    assert plain.generate.grammar is None
    assert parse_completion(chat(response_format={"type": "json_object"}),
                            "chat").generate.grammar


def test_auto_with_a_schema_allows_the_schema_or_a_call() -> None:
    plan = parse_tool_plan(chat(tools=[WEATHER], response_format={"type": "json_object"}))
    assert plan.grammar and "get_weather" in plan.grammar and plan.choice == "auto"


def test_tool_turns_are_accepted_and_carried_as_strings() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    c = parse_completion(chat(tools=[WEATHER], messages=[
        USER, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]), "chat")
    messages = c.generate.messages or ()
    assert messages[1]["content"] == "" and json.loads(messages[1]["tool_calls"]) == [call]
    assert messages[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}
    assert all(isinstance(v, str) for m in messages for v in m.values())


@pytest.mark.parametrize("message", [
    {"role": "tool", "content": "x"},
    {"role": "assistant", "content": None, "tool_calls": "x"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {
        "name": "f", "arguments": {"a": 1}}}]},
    {"role": "assistant", "content": None},
])
def test_malformed_tool_turns_are_refused(message: dict[str, Any]) -> None:
    assert refused(chat(messages=[USER, message])) is not None


def test_schema_bounds_refuse_before_building() -> None:
    with pytest.raises(GrammarError):
        schema_to_grammar({"type": "string", "maxLength": 10**9})
    with pytest.raises(GrammarError):
        schema_to_grammar({"$ref": "https://example.com/schema.json"})
    nested: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        nested = {"type": "array", "items": nested}
    with pytest.raises(GrammarError):
        schema_to_grammar(nested)


# -- the prompt ------------------------------------------------------------------------------


def test_a_template_without_tools_gets_them_in_the_system_prompt() -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "system", "content": "Be brief."}, USER,
                {"role": "assistant", "content": "", "tool_calls": json.dumps([call])},
                {"role": "tool", "content": "18 C", "tool_call_id": "c1"}]
    text = render_chat(messages, None, tools=[WEATHER]).text
    assert text.startswith("System: Be brief.\n\n" + TOOLS_HEADER)
    assert json.dumps(WEATHER["function"]) in text
    assert 'Assistant: {"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "User: Tool result (call c1): 18 C" in text
    assert text.endswith("Assistant:")


def test_a_template_with_tools_gets_the_tools_and_calls_as_objects() -> None:
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}<{{ c.function.arguments.city }}>"
                "{% endfor %}|{% endfor %}")
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    text = render_chat([USER, {"role": "assistant", "content": "",
                               "tool_calls": json.dumps([call])},
                        {"role": "tool", "content": "18 C", "tool_call_id": "c1"}],
                       template, tools=[WEATHER]).text
    assert text == "[get_weather]user:Weather in Paris?|assistant:<Paris>|tool:18 C|"


# -- replies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]\n',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '```json\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n```',
    '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
])
def test_tool_calls_are_found_as_models_write_them(text: str) -> None:
    calls = extract_tool_calls(text, NAMES)
    assert calls is not None and len(calls) == 1
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("call_")


def test_several_calls_one_a_line_are_each_a_call() -> None:
    # Qwen2.5 writes several calls this way when it leaves out its <tool_call> tags.
    calls = extract_tool_calls('{"name": "get_time", "arguments": {"zone": "utc"}}\n'
                               '{"name": "get_weather", "arguments": {"city": "Rome"}}\n', NAMES)
    assert calls is not None and [c.name for c in calls] == ["get_time", "get_weather"]
    assert extract_tool_calls('{"name": "get_time", "arguments": {}}\nThat is all.', NAMES) \
        is None


def test_several_calls_each_get_their_own_id() -> None:
    calls = extract_tool_calls('[{"name": "get_time", "arguments": {}}, '
                               '{"name": "get_weather", "arguments": {"city": "Rome"}}]', NAMES)
    assert calls is not None and [c.name for c in calls] == ["get_time", "get_weather"]
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.",
    '{"name": "launch_rockets", "arguments": {}}',
    '{"name": "get_weather", "arguments": [1]}',
    '{"name": "get_weather", "arguments": {"city": "Par',
    '{"city": "Paris"}',
    "[]",
    'Sure: {"name": "get_weather", "arguments": {}}',
])
def test_text_that_is_not_a_call_stays_text(text: str) -> None:
    assert extract_tool_calls(text, NAMES) is None


def test_a_streamed_reply_is_held_only_while_it_may_be_a_call() -> None:
    assert may_be_call("") and may_be_call("  {") and may_be_call("<tool") and may_be_call("`")
    assert not may_be_call("Hello") and not may_be_call(" The")
    hold = CallHold(forced=False)
    assert hold.feed(" ") == "" and hold.feed("Hi") == " Hi" and hold.feed(" there") == " there"
    held = CallHold(forced=False)
    assert held.feed('{"name"') == "" and not held.released and held.held == '{"name"'
    forced = CallHold(forced=True)
    assert forced.feed("Hello") == "" and forced.held == "Hello"


def test_a_reply_that_calls_a_tool_says_tool_calls() -> None:
    c = parse_completion(chat(tools=[WEATHER], tool_choice="required"), "chat")
    done = Done(c.generate.id, "stop", '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
                5, (1, 2, 3))
    body = full_response(c, done, 0, {})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    streamed = extract_tool_calls(done.text, NAMES) or []
    delta = chunk(c, 0, {}, calls=streamed)["choices"][0]["delta"]
    assert delta["tool_calls"][0]["index"] == 0
    assert chunk(c, 0, {}, done=done, calls=streamed)["choices"][0]["finish_reason"] == \
        "tool_calls"


def test_a_cut_off_call_is_returned_as_text_with_length() -> None:
    c = parse_completion(chat(tools=[WEATHER], tool_choice="required"), "chat")
    done = Done(c.generate.id, "length", '{"name": "get_weather", "argu', 5, (1, 2))
    choice = full_response(c, done, 0, {})["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == done.text


# -- across nodes ----------------------------------------------------------------------------


def test_tools_grammar_and_tool_turns_cross_to_another_node() -> None:
    c = parse_completion(chat(tools=[WEATHER], tool_choice="required", messages=[
        USER, {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "5"}]),
        "chat")
    model, request = parse_request_frame(request_frame("m", c.generate))
    assert model == "m" and request == c.generate


def test_a_plain_request_leaves_the_new_fields_off_the_wire() -> None:
    frame = json.loads(request_frame("m", GenerateRequest(id="a", prompt="x")))
    assert "tools" not in frame["request"] and "grammar" not in frame["request"]
    assert parse_request_frame(json.dumps(frame).encode())[1] == GenerateRequest(id="a",
                                                                                 prompt="x")


def test_a_frame_with_a_grammar_that_is_not_text_is_refused() -> None:
    frame = json.loads(request_frame("m", GenerateRequest(id="a", prompt="x")))
    frame["request"]["grammar"] = ["root"]
    with pytest.raises(ValueError):
        parse_request_frame(json.dumps(frame).encode())
