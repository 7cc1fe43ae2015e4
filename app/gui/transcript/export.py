"""A conversation saved to a file, and read back: JSON (which imports again, with each reply's
route and speed) and Markdown (to read or share).

The JSON is a versioned `ConversationExport`; a file from a newer Covey is refused by name
rather than half-read. Qt-free, so it is tested on its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

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
    version: int = EXPORT_VERSION


def export_of(store: ConversationStore, conversation_id: int) -> ConversationExport:
    conv = store.get(conversation_id)
    if conv is None:
        raise KeyError(conversation_id)
    return ConversationExport(conv.title, conv.model, tuple(
        ExportedMessage(m.role, m.content, m.meta) for m in store.messages(conversation_id)))


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
                              model if isinstance(model, str) else None, tuple(messages))


def to_markdown(export: ConversationExport) -> str:
    parts = [f"# {export.title}"]
    if export.model:
        parts.append(f"Model: `{export.model}`")
    for m in export.messages:
        parts.append(f"## {SPEAKERS[m.role]}\n\n{m.content}")
        line = served_line(m.meta) if m.role == "assistant" else ""
        if line:
            parts.append(f"_{line}_")
    return "\n\n".join(parts) + "\n"


def import_into(store: ConversationStore, export: ConversationExport) -> Conversation:
    """A new conversation holding the export's messages, under its title."""
    conv = store.create(export.model, export.title)
    for m in export.messages:
        store.add(conv.id, m.role, m.content, m.meta)
    return store.get(conv.id) or conv
