"""A conversation saved to a file, and read back: JSON (which imports again, with each reply's
route and speed and the side panel's choices) and Markdown (to read or share).

The JSON is a versioned `ConversationExport`; a file from a newer Covey is refused by name
rather than half-read, and one without a panel (or with a value this Covey cannot use) imports
with Covey's defaults there. Qt-free, so it is tested on its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from app.common.chat_request import ROUTE_PREFERENCES, ChatPanel
from app.gui.conversations import Conversation, ConversationStore
from app.gui.transcript.route_words import served_line

EXPORT_VERSION = 1
ROLES = ("system", "user", "assistant")
SPEAKERS = {"system": "System", "user": "You", "assistant": "Covey"}


@dataclass(frozen=True)
class ExportedMessage:
    role: str
    content: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConversationExport:
    title: str
    model: str | None
    messages: tuple[ExportedMessage, ...]
    panel: ChatPanel = ChatPanel()
    version: int = EXPORT_VERSION


def export_of(store: ConversationStore, conversation_id: int) -> ConversationExport:
    conv = store.get(conversation_id)
    if conv is None:
        raise KeyError(conversation_id)
    return ConversationExport(conv.title, conv.model, tuple(
        ExportedMessage(m.role, m.content, m.meta) for m in store.messages(conversation_id)),
        store.panel(conversation_id))


def to_json(export: ConversationExport) -> str:
    return json.dumps(asdict(export), indent=2, ensure_ascii=False) + "\n"


def from_json(text: str) -> ConversationExport:
    """The conversation in an exported JSON file; ValueError says what is wrong with it."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError("not a Covey conversation (no list of messages)")
    version = data.get("version")
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise ValueError(f"written by a newer Covey (version {version!r})")
    messages = []
    for m in data["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"a message is not a role and a text: {m!r:.80}")
        meta = m.get("meta")
        messages.append(ExportedMessage(m["role"], m["content"],
                                        meta if isinstance(meta, dict) else {}))
    model = data.get("model")
    return ConversationExport(str(data.get("title") or "Imported chat"),
                              model if isinstance(model, str) else None, tuple(messages),
                              panel_of(data.get("panel")))


def panel_of(data: Any) -> ChatPanel:
    """The side-panel choices in an export; each one missing or unusable is Covey's default
    (None), so a file from before panels, or a hand-edited one, still imports."""
    if not isinstance(data, dict):
        return ChatPanel()
    prompt: Any = data.get("system_prompt")
    temperature: Any = data.get("temperature")
    max_tokens: Any = data.get("max_tokens")
    route: Any = data.get("route")
    number = type(temperature) in (int, float) and temperature >= 0  # bool is no temperature
    return ChatPanel(
        system_prompt=prompt if isinstance(prompt, str) else "",
        temperature=float(temperature) if number else None,
        max_tokens=max_tokens if type(max_tokens) is int and max_tokens > 0 else None,
        route=route if route in ROUTE_PREFERENCES else "auto")


def to_markdown(export: ConversationExport) -> str:
    parts = [f"# {export.title}"]
    if export.model:
        parts.append(f"Model: `{export.model}`")
    prompt = export.panel.system_prompt.strip()
    if prompt:
        parts.append("System prompt:\n\n" + "\n".join(f"> {line}" for line in prompt.split("\n")))
    for m in export.messages:
        parts.append(f"## {SPEAKERS[m.role]}\n\n{m.content}")
        line = served_line(m.meta) if m.role == "assistant" else ""
        if line:
            parts.append(f"_{line}_")
    return "\n\n".join(parts) + "\n"


def import_into(store: ConversationStore, export: ConversationExport) -> Conversation:
    """A new conversation holding the export's messages and panel, under its title."""
    conv = store.create(export.model, export.title)
    store.set_panel(conv.id, export.panel)
    for m in export.messages:
        store.add(conv.id, m.role, m.content, m.meta)
    return store.get(conv.id) or conv
