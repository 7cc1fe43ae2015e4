"""Tool calling and structured output for the OpenAI API: reading `tools`, `tool_choice`,
`parallel_tool_calls`, `response_format` and tool turns; the grammar that forces a reply's
shape; and finding the tool calls in the text a model wrote.

All pure. A tool call is written in Covey's format (`backends.text.tool_prompt`):
`{"name": ..., "arguments": {...}}`, or a JSON array of them. `tool_choice` "required" or a
named function forces that shape with a grammar; "auto" leaves the model free and reads a
call out of its reply when there is one (also in `<tool_call>` tags or a ```json fence, the
way models trained for tools write them, or several objects one a line, as Qwen writes calls
without its tags). A field that cannot be honoured is a 400 naming it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from backends.generation.grammar import JSON_OBJECT_SCHEMA, GrammarError, schema_to_grammar
from swarm.api.sampling import BadRequest

MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*```\s*$", re.S)
# How a reply that is a tool call can begin; until a reply rules these out it is held back.
CALL_STARTS = ("{", "[", "<tool_call>", "```", "[TOOL_CALLS]")
DEPRECATED = {"functions": "tools", "function_call": "tool_choice"}
CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of tools and output shape, ready for the engine and the reply."""

    tools: tuple[dict[str, Any], ...] = ()
    choice: str = "none"  # "none" | "auto" | "required" | "function"
    parallel: bool = True
    grammar: str | None = None

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)

    @property
    def calls_possible(self) -> bool:
        return self.choice != "none" and bool(self.tools)

    @property
    def tools_json(self) -> str | None:
        """The tools the prompt shows the model: none when it may not call them."""
        return json.dumps(list(self.tools)) if self.calls_possible else None


# -- requests --------------------------------------------------------------------------------


def parse_tool_plan(body: dict[str, Any], chat: bool = True) -> ToolPlan:
    """`tools`, `tool_choice`, `parallel_tool_calls` and `response_format` of a chat body
    (a completions body, `chat` False, takes only `response_format`)."""
    for old, new in DEPRECATED.items():
        if body.get(old) is not None:
            raise BadRequest(f"{old} is not supported; use {new}", old)
    if not chat:
        for name in CHAT_ONLY:
            if body.get(name) is not None:
                raise BadRequest(f"{name} is only for /v1/chat/completions", name)
    tools = _tools(body.get("tools"))
    choice, named = _tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    output = response_schema(body.get("response_format"))
    if named is not None:
        tools_for_call = tuple(t for t in tools if t["function"]["name"] == named)
    else:
        tools_for_call = tools
    calls = calls_schema(tools_for_call, parallel and named is None) if tools_for_call else None
    if choice in ("required", "function"):
        schema = calls
    elif choice == "auto" and output is not None and calls is not None:
        schema = {"anyOf": [output, calls]}  # a reply in the asked shape, or a call
    else:
        schema = output
    try:
        grammar = schema_to_grammar(schema) if schema is not None else None
    except GrammarError as exc:
        param = "response_format" if output is not None and calls is None else "tools"
        raise BadRequest(str(exc), param) from None
    return ToolPlan(tools, choice, parallel, grammar)


def _tools(value: Any) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest("tools must be an array", "tools")
    if len(value) > MAX_TOOLS:
        raise BadRequest(f"at most {MAX_TOOLS} tools", "tools")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise BadRequest(f'{where}.type must be "function"', f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise BadRequest(f"{where}.function must be an object", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BadRequest(f"{where}.function.name must be 1 to 64 letters, digits, _ or -",
                              f"{where}.function.name")
        description = _optional(function, "description", str, f"{where}.function")
        parameters = _optional(function, "parameters", dict, f"{where}.function") or {
            "type": "object", "properties": {}}
        _optional(function, "strict", bool, f"{where}.function")
        kept: dict[str, Any] = {"name": name, "parameters": parameters}
        if description:
            kept["description"] = description
        out.append({"type": "function", "function": kept})
    if len({t["function"]["name"] for t in out}) != len(out):
        raise BadRequest("tool names must be unique", "tools")
    return tuple(out)


def _optional(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """`obj[key]` if it is a `kind` or absent (None); a 400 naming it otherwise."""
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        what = {str: "a string", bool: "a boolean", dict: "a JSON schema object"}[kind]
        raise BadRequest(f"{where}.{key} must be {what}", f"{where}.{key}")
    return value


def _tool_choice(value: Any, tools: tuple[dict[str, Any], ...]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "function", the named function or None)."""
    if value is None:
        return ("auto" if tools else "none"), None
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise BadRequest(f'tool_choice "{value}" needs tools', "tool_choice")
        return value, None
    name = None
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise BadRequest('tool_choice must be "none", "auto", "required" or '
                          '{"type": "function", "function": {"name": ...}}', "tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise BadRequest(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return "function", name


def response_schema(value: Any) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks for; None for plain text."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest("response_format.json_schema needs a name and a schema",
                              "response_format.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be an object",
                              "response_format.json_schema.schema")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise BadRequest("response_format.json_schema.strict must be a boolean",
                              "response_format.json_schema.strict")
        return schema  # strict or not, the grammar holds the reply to the schema
    raise BadRequest('response_format.type must be "text", "json_object" or "json_schema"',
                      "response_format.type")


def calls_schema(tools: tuple[dict[str, Any], ...], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a reply that calls one of `tools` (or several, if `parallel`)."""
    one = [{"type": "object",
            "properties": {"name": {"const": t["function"]["name"]},
                           "arguments": t["function"]["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}
           for t in tools]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    if not parallel:
        return call
    return {"anyOf": [call, {"type": "array", "items": call, "minItems": 1}]}


def tool_message(message: dict[str, Any], where: str) -> dict[str, str]:
    """The tool fields of one chat message, as the engine request carries them (strings):
    an assistant's `tool_calls` (JSON text) or a tool result's `tool_call_id`."""
    role = message.get("role")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise BadRequest(f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
        name = message.get("name")
        return {"tool_call_id": call_id, **({"name": name} if isinstance(name, str) else {})}
    calls = message.get("tool_calls")
    if role != "assistant" or calls is None:
        return {}
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls must be an array", f"{where}.tool_calls")
    kept = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), str)
                or not isinstance(call.get("id"), str)):
            raise BadRequest(f"{at} needs an id and a function with a name and arguments "
                              "(a JSON string)", at)
        kept.append({"id": call["id"], "type": "function",
                     "function": {"name": function["name"], "arguments": function["arguments"]}})
    return {"tool_calls": json.dumps(kept)} if kept else {}


# -- replies ---------------------------------------------------------------------------------


def _call_objects(text: str) -> list[Any] | None:
    """The JSON values a reply consists of, if it is nothing but tool-call JSON."""
    stripped = text.strip()
    if stripped.startswith("[TOOL_CALLS]"):
        stripped = stripped[len("[TOOL_CALLS]"):].strip()
    tagged = _TAGGED.findall(stripped)
    if tagged and not _TAGGED.sub("", stripped).strip():
        pieces = tagged
    else:
        fenced = _FENCED.fullmatch(stripped)
        pieces = [fenced.group(1) if fenced else stripped]
    found: list[Any] = []
    for piece in pieces:
        values = _json_values(piece)
        if values is None:
            return None
        for value in values:
            found.extend(value if isinstance(value, list) else [value])
    return found


def _json_values(text: str) -> list[Any] | None:
    """The JSON values `text` (stripped) consists of, one after another; None if anything
    else is in it."""
    values: list[Any] = []
    at = 0
    while at < len(text):
        try:
            value, at = _DECODER.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)
        while at < len(text) and text[at].isspace():
            at += 1
    return values if values else None


def extract_tool_calls(text: str, names: frozenset[str]) -> list[ToolCall] | None:
    """The tool calls `text` makes, or None when it is not (only) calls of tools in `names`."""
    values = _call_objects(text)
    if not values:
        return None
    calls = []
    for value in values:
        if not isinstance(value, dict) or value.get("name") not in names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(f"call_{secrets.token_hex(12)}", value["name"],
                              json.dumps(arguments, ensure_ascii=False)))
    return calls


def may_be_call(text: str) -> bool:
    """Whether a reply beginning with `text` could still turn out to be a tool call."""
    head = text.lstrip()
    return any(head.startswith(s) or s.startswith(head) for s in CALL_STARTS)


def tool_calls_json(calls: list[ToolCall], streamed: bool = False) -> list[dict[str, Any]]:
    """The reply's `tool_calls` (each with its `index` when streamed, as OpenAI does)."""
    return [{**({"index": i} if streamed else {}), "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(calls)]


class CallHold:
    """Holds a streamed reply back while it may still be a tool call; once it cannot be,
    what was held and everything after goes out as text."""

    def __init__(self, forced: bool) -> None:
        self.forced = forced  # a grammar makes the reply a call: hold all of it
        self.held = ""
        self.released = False

    def feed(self, piece: str) -> str:
        """The text to stream now."""
        if self.released:
            return piece
        self.held += piece
        if self.forced or may_be_call(self.held):
            return ""
        self.released = True
        out, self.held = self.held, ""
        return out
