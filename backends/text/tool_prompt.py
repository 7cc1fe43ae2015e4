"""Tools and tool turns in a chat prompt: handed to a chat template that knows tools, or
written into the messages in Covey's own format for one that does not.

In a `GenerateRequest` every message value is a string: an assistant turn's `tool_calls` is
the JSON text of OpenAI's list, and a tool result is role "tool" with `tool_call_id`. The
request's `tools` is the JSON text of OpenAI's `tools` array.

Covey's format, for templates without tool support (the bundled Gemma 3 270M has no template
at all): the system message gets `TOOLS_HEADER` and one JSON line per tool; a call is written
as `{"name": ..., "arguments": {...}}` (a JSON array of them for several); a tool result
becomes a user turn starting "Tool result". The node's grammar and parser use the same shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

TOOLS_HEADER = (
    "You can call the tools listed below. To call a tool, answer with only a JSON object "
    '{"name": <tool name>, "arguments": <object of arguments>}, or a JSON array of such '
    "objects to call several. Otherwise answer in plain text.\nTools:"
)
_TEMPLATE_USES_TOOLS = re.compile(r"\btools\b")


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and bool(_TEMPLATE_USES_TOOLS.search(template or ""))


def decode_tools(tools: str | None) -> list[dict[str, Any]]:
    """The request's tools as OpenAI's list of {"type": "function", "function": {...}}."""
    if not tools:
        return []
    value = json.loads(tools)
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError("tools must be a JSON array of objects")
    return value


def _arguments(raw: Any) -> Any:
    """Templates expect arguments as an object (Hugging Face's convention), not JSON text."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _calls(message: dict[str, str]) -> list[dict[str, Any]]:
    calls = json.loads(message.get("tool_calls") or "[]")
    if not isinstance(calls, list):
        raise ValueError("tool_calls must be a JSON array")
    return [c for c in calls if isinstance(c, dict)]


def for_template(messages: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """Messages for a template with tool support: tool calls as objects, as templates expect."""
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = dict(m)
        if "tool_calls" in m:
            message["tool_calls"] = [
                {**c, "function": {**c.get("function", {}),
                                   "arguments": _arguments(c.get("function", {}).get(
                                       "arguments"))}}
                for c in _calls(m)
            ]
        out.append(message)
    return out


def call_text(calls: list[dict[str, Any]]) -> str:
    """Tool calls written in Covey's format, as the model is asked to write them."""
    written = [{"name": c.get("function", {}).get("name", ""),
                "arguments": _arguments(c.get("function", {}).get("arguments")) or {}}
               for c in calls]
    return json.dumps(written[0] if len(written) == 1 else written)


def tools_text(tools: list[dict[str, Any]]) -> str:
    lines = [TOOLS_HEADER]
    for tool in tools:
        function = tool.get("function", {})
        lines.append(json.dumps({k: function[k] for k in ("name", "description", "parameters")
                                 if k in function}))
    return "\n".join(lines)


def inline_tools(messages: Sequence[dict[str, str]],
                 tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Plain role/content messages carrying the tools and tool turns in Covey's format."""
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content", "")
        if role == "assistant" and m.get("tool_calls"):
            calls = call_text(_calls(m))
            content = f"{content}\n{calls}" if content else calls
        elif role == "tool":
            role = "user"
            name = f" of {m['name']}" if m.get("name") else ""
            content = f"Tool result{name} (call {m.get('tool_call_id', '')}): {content}"
        out.append({"role": role, "content": content})
    if tools:
        listing = tools_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out
