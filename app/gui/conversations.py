"""Chat conversations, kept in SQLite (`conversations.db` in the data directory).

Qt-free so it is tested on its own. Every change commits at once: a crash loses at most the
part of a reply that was still streaming since its last save. Each conversation keeps its side
panel's choices (`ChatPanel`) in its own row; a database from an older Covey gains those
columns when it opens (`_MIGRATIONS`), keeping its conversations.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from builtins import list as List  # `ConversationStore.list` hides the builtin in its class body
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.common.chat_request import ChatPanel

DB_FILE = "conversations.db"
SCHEMA_VERSION = 2
DEFAULT_TITLE = "New chat"
TITLE_CHARS = 48
SNIPPET_CHARS = 30

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""
# What takes a database written with schema N-1 to N. NULL sampling values: Covey's defaults.
_MIGRATIONS = {
    2: """
ALTER TABLE conversations ADD COLUMN system_prompt TEXT NOT NULL DEFAULT '';
ALTER TABLE conversations ADD COLUMN temperature REAL;
ALTER TABLE conversations ADD COLUMN max_tokens INTEGER;
ALTER TABLE conversations ADD COLUMN route TEXT NOT NULL DEFAULT 'auto';
""",
}
_PANEL_COLUMNS = "system_prompt, temperature, max_tokens, route"


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    model: str | None
    updated: float


@dataclass(frozen=True)
class Message:
    id: int
    role: str
    content: str
    meta: dict[str, Any] = field(default_factory=dict)  # route, machines, tokens/s, notice


@dataclass(frozen=True)
class SearchHit:
    """A conversation that matched a search, with the text around the first match."""

    conversation: Conversation
    snippet: str
    message_id: int | None  # None: the title matched


def snippet(text: str, query: str, around: int = SNIPPET_CHARS) -> str:
    """One line of `text` around the first place `query` occurs (any case)."""
    line = " ".join(text.split())
    at = line.lower().find(query.lower())
    if at < 0:
        return line[:2 * around]
    start = max(at - around, 0)
    end = at + len(query) + around
    return ("…" if start else "") + line[start:end] + ("…" if end < len(line) else "")


def title_from(text: str) -> str:
    """A conversation's title from its first question: one line, cut at a word."""
    line = " ".join(text.split())
    if len(line) <= TITLE_CHARS:
        return line or DEFAULT_TITLE
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0] or line[:TITLE_CHARS]
    return cut + "…"


class ConversationStore:
    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(data_dir / DB_FILE)
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA journal_mode = WAL")
        # With WAL, NORMAL survives an app crash (not a power cut) without an fsync per save,
        # which would stall the window while a reply streams.
        self._db.execute("PRAGMA synchronous = NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{data_dir / DB_FILE} was written by a newer Covey (schema {version})")
        # executescript commits on its own, so the whole upgrade is one explicit transaction.
        script = _SCHEMA + "".join(_MIGRATIONS[n] for n in range(max(version, 1) + 1,
                                                                 SCHEMA_VERSION + 1))
        self._db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {SCHEMA_VERSION};\n"
                               "COMMIT;")

    def close(self) -> None:
        self._db.close()

    def create(self, model: str | None = None, title: str = DEFAULT_TITLE) -> Conversation:
        now = time.time()
        with self._db:
            cur = self._db.execute(
                "INSERT INTO conversations (title, model, created, updated) VALUES (?,?,?,?)",
                (title, model, now, now))
        return Conversation(int(cur.lastrowid or 0), title, model, now)

    def list(self) -> list[Conversation]:
        """Newest activity first."""
        rows = self._db.execute(
            "SELECT id, title, model, updated FROM conversations ORDER BY updated DESC, id DESC")
        return [Conversation(*row) for row in rows]

    def get(self, conversation_id: int) -> Conversation | None:
        row = self._db.execute("SELECT id, title, model, updated FROM conversations WHERE id=?",
                               (conversation_id,)).fetchone()
        return Conversation(*row) if row else None

    def rename(self, conversation_id: int, title: str) -> None:
        title = " ".join(title.split()) or DEFAULT_TITLE
        with self._db:
            self._db.execute("UPDATE conversations SET title=? WHERE id=?",
                             (title, conversation_id))

    def set_model(self, conversation_id: int, model: str) -> None:
        with self._db:
            self._db.execute("UPDATE conversations SET model=? WHERE id=?",
                             (model, conversation_id))

    def panel(self, conversation_id: int) -> ChatPanel:
        """The conversation's side-panel choices (the defaults for one that is gone)."""
        row = self._db.execute(f"SELECT {_PANEL_COLUMNS} FROM conversations WHERE id=?",
                               (conversation_id,)).fetchone()
        return ChatPanel(*row) if row else ChatPanel()

    def set_panel(self, conversation_id: int, panel: ChatPanel) -> None:
        with self._db:
            self._db.execute(
                "UPDATE conversations SET system_prompt=?, temperature=?, max_tokens=?, route=? "
                "WHERE id=?", (panel.system_prompt, panel.temperature, panel.max_tokens,
                               panel.route, conversation_id))

    def delete(self, conversation_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM conversations WHERE id=?", (conversation_id,))

    def messages(self, conversation_id: int) -> List[Message]:
        rows = self._db.execute(
            "SELECT id, role, content, meta FROM messages WHERE conversation_id=? ORDER BY id",
            (conversation_id,))
        return [Message(i, role, content, _meta(meta)) for i, role, content, meta in rows]

    def add(self, conversation_id: int, role: str, content: str,
            meta: dict[str, Any] | None = None) -> Message:
        """Append a message; the first question also names a conversation still untitled."""
        now = time.time()
        with self._db:
            cur = self._db.execute(
                "INSERT INTO messages (conversation_id, role, content, meta, created) "
                "VALUES (?,?,?,?,?)",
                (conversation_id, role, content, json.dumps(meta or {}), now))
            self._db.execute("UPDATE conversations SET updated=? WHERE id=?",
                             (now, conversation_id))
            if role == "user":
                self._db.execute(
                    "UPDATE conversations SET title=? WHERE id=? AND title=?",
                    (title_from(content), conversation_id, DEFAULT_TITLE))
        return Message(int(cur.lastrowid or 0), role, content, meta or {})

    def update(self, message_id: int, content: str, meta: dict[str, Any] | None = None) -> None:
        with self._db:
            if meta is None:
                self._db.execute("UPDATE messages SET content=? WHERE id=?",
                                 (content, message_id))
            else:
                self._db.execute("UPDATE messages SET content=?, meta=? WHERE id=?",
                                 (content, json.dumps(meta), message_id))

    def delete_message(self, message_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM messages WHERE id=?", (message_id,))

    def delete_from(self, conversation_id: int, message_id: int) -> None:
        """Drop `message_id` and every later message of the conversation (edit and resend)."""
        with self._db:
            self._db.execute("DELETE FROM messages WHERE conversation_id=? AND id>=?",
                             (conversation_id, message_id))

    def search(self, query: str) -> List[SearchHit]:
        """Conversations whose title or any message contains `query` (ASCII letters in any
        case), newest activity first."""
        pattern = "%" + re.sub(r"([\\%_])", r"\\\1", query) + "%"
        hits = []
        for conv in self.list():
            row = self._db.execute(
                "SELECT id, content FROM messages WHERE conversation_id=? AND role!='system' "
                "AND content LIKE ? ESCAPE '\\' ORDER BY id LIMIT 1", (conv.id, pattern),
            ).fetchone()
            if row:
                hits.append(SearchHit(conv, snippet(row[1], query), row[0]))
            elif query.lower() in conv.title.lower():
                hits.append(SearchHit(conv, conv.title, None))
        return hits


def _meta(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
