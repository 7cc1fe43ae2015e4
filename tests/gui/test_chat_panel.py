"""The chat page's side panel with real widgets: its values are the conversation's own (they
survive switching chats and an app restart, and an old conversations.db keeps working), they
change what is asked of the node, and the picker and footer agree with the route preference.
The last test asks a real node with the bundled model, typed and sent as a user would."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from app.common.chat_request import ChatPanel, ChatSettings
from app.gui import app_settings
from app.gui.conversations import DB_FILE, ConversationStore
from app.gui.desktop import CoveyApp
from app.gui.transcript.route_words import NOT_IN_SWARM, PREFERENCE_MEANING, served_line
from tests.gui.conftest import app_data_dir, until
from tests.gui.test_chat import FakeNode, main_window, pick, replied, shown

LOCAL_ONLY = {"id": "tiny", "covey": {"routes": ["local"], "machines": ["desk"], "auto": {
    "route": "local", "reason": "fits this machine (needs 35.0 MiB, 3.0 GiB free here)"}}}
BIG = {"id": "big", "covey": {"routes": ["sharded", "federated"], "machines": ["w1", "fed1"],
                              "auto": {"route": "federated", "reason": "not on this machine; "
                                       "served by fed1"}}}

# conversations.db as Covey wrote it before the side panel (schema 1).
SCHEMA_1 = """
CREATE TABLE conversations (id INTEGER PRIMARY KEY, title TEXT NOT NULL, model TEXT,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
INSERT INTO conversations VALUES (1, 'Old chat', 'tiny', 1.0, 2.0);
INSERT INTO messages VALUES (1, 1, 'user', 'Hello from before', '{}', 1.0);
INSERT INTO messages VALUES (2, 1, 'assistant', 'Hi there', '{"route": "local"}', 2.0);
PRAGMA user_version = 1;
"""


class AskingNode(FakeNode):
    """Keeps the sampling and route each reply was asked with, besides its messages."""

    def __init__(self) -> None:
        super().__init__()
        self.how: list[tuple[ChatSettings, str]] = []

    def chat(self, model: str, history: list[dict[str, str]], *args: Any,
             **kwargs: Any) -> Any:
        settings, route = args
        self.how.append((settings, route))
        return super().chat(model, history)


def test_an_old_database_opens_and_keeps_its_conversations(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.executescript(SCHEMA_1)
    store = ConversationStore(tmp_path)
    [old] = store.list()
    assert (old.title, old.model) == ("Old chat", "tiny")
    assert [(m.role, m.content, m.meta) for m in store.messages(old.id)] == [
        ("user", "Hello from before", {}), ("assistant", "Hi there", {"route": "local"})]
    assert store.panel(old.id) == ChatPanel()  # Covey's defaults until changed
    store.set_panel(old.id, ChatPanel("Be brief.", 0.2, 64, "here"))
    store.close()
    again = ConversationStore(tmp_path)  # a second open migrates nothing twice
    assert again.panel(old.id) == ChatPanel("Be brief.", 0.2, 64, "here")
    assert len(again.messages(old.id)) == 2
    again.close()


def test_panel_values_are_each_chats_own_and_reach_the_request(
        run_async, qtbot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = AskingNode()

    async def body() -> None:
        with main_window(tmp_path, monkeypatch, node) as window:
            shown(window, qtbot)
            chat = window.chat
            assert not chat.panel.isVisible()
            qtbot.keyClick(chat.input, Qt.Key.Key_B, Qt.KeyboardModifier.ControlModifier)
            assert chat.panel.isVisible() and chat.panel_button.isChecked()
            panel = chat.panel
            panel.system_prompt.setPlainText("Answer like a pirate.")
            panel.temperature.setValue(0.0)
            panel.max_tokens.setValue(64)
            panel.route.setCurrentIndex(panel.route.findData("here"))
            assert PREFERENCE_MEANING["here"] in panel.route_words.text()
            qtbot.keyClicks(chat.input, "Where is the treasure?")
            qtbot.keyClick(chat.input, Qt.Key.Key_Return)
            await replied(chat)
            pirate = chat.conversation_id
            assert node.asked[-1] == [
                {"role": "system", "content": "Answer like a pirate."},
                {"role": "user", "content": "Where is the treasure?"}]
            settings, route = node.how[-1]
            assert (settings.temperature, settings.max_tokens, route) == (0.0, 64, "local")

            chat.new_conversation()  # a new chat starts from Covey's defaults
            assert panel.values() == ChatPanel()
            qtbot.keyClicks(chat.input, "And now?")
            qtbot.keyClick(chat.input, Qt.Key.Key_Return)
            await replied(chat)
            assert node.asked[-1] == [{"role": "user", "content": "And now?"}]
            assert node.how[-1] == (ChatSettings(), "auto")

            pick(chat, pirate)
            assert panel.values() == ChatPanel("Answer like a pirate.", 0.0, 64, "here")
            chat.regenerate()
            await replied(chat)
            assert node.asked[-1][0]["content"] == "Answer like a pirate."
            assert node.how[-1][1] == "local"

        # An app restart: the panel is still open and the chat still has its values.
        with main_window(tmp_path, monkeypatch, node) as window:
            shown(window, qtbot)
            chat = window.chat
            assert chat.panel.isVisible()
            pick(chat, pirate)
            assert chat.panel.values() == ChatPanel("Answer like a pirate.", 0.0, 64, "here")
            chat.panel_button.click()
            assert not chat.panel.isVisible()
        assert not app_settings.load(tmp_path).chat_panel_open

    run_async(body())


def test_the_picker_and_footer_follow_the_route_preference(
        run_async, qtbot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        with main_window(tmp_path, monkeypatch, AskingNode()) as window:
            chat = window.chat
            window.controller.models.emit({"runnable": [LOCAL_ONLY, BIG]})
            labels = {chat.model_picker.itemData(i): chat.model_picker.itemText(i)
                      for i in range(chat.model_picker.count())}
            assert "runs on this machine, because it fits" in labels["tiny"]
            assert "runs on fed1" in labels["big"]

            route = chat.panel.route
            route.setCurrentIndex(route.findData("here"))
            labels = {chat.model_picker.itemData(i): chat.model_picker.itemText(i)
                      for i in range(chat.model_picker.count())}
            assert labels["tiny"] == "tiny — runs on this machine, as this chat asks"
            assert "swarm" not in labels["tiny"] and "runs" not in labels["big"]
            # What the node says when asked for that route, under the reply: the same words.
            footer = served_line({"route": "local", "route_reason": "asked for the local route",
                                  "machines": ["desk"]})
            assert "because this chat asks for this machine" in footer

            route.setCurrentIndex(route.findData("swarm"))
            labels = {chat.model_picker.itemData(i): chat.model_picker.itemText(i)
                      for i in range(chat.model_picker.count())}
            assert labels["tiny"] == f"tiny — {NOT_IN_SWARM}"  # never "runs on this machine"
            assert labels["big"] == ("big — runs on another machine in the swarm, as this chat "
                                     "asks")
            assert chat.model_picker.currentData() == "tiny"  # relabelled, not repicked

    run_async(body())


@pytest.mark.gemma
@pytest.mark.processes
def test_typing_a_question_and_pressing_enter_saves_a_sensible_answer(
        run_async, qtbot, tmp_path: Path) -> None:
    """The real app and node with the bundled model: click the message box, type, Enter; the
    answer is in conversations.db, run where the side panel asked, and the footer says so."""
    data_dir = app_data_dir(tmp_path, "app")

    async def body() -> None:
        app = CoveyApp(data_dir)
        try:
            await app.start()
            window, chat = app.window, app.window.chat
            shown(window, qtbot)
            await until(lambda: chat.model_picker.count() and not chat.starting(), 60,
                        "the bundled model in the picker")
            chat.panel_button.click()
            chat.panel.temperature.setValue(0.0)
            chat.panel.max_tokens.setValue(32)
            chat.panel.route.setCurrentIndex(chat.panel.route.findData("here"))
            assert "runs on this machine, as this chat asks" in chat.model_picker.currentText()
            qtbot.mouseClick(chat.input.viewport(), Qt.MouseButton.LeftButton)
            assert QApplication.focusWidget() is chat.input
            qtbot.keyClicks(chat.input, "What is the capital of France?")
            qtbot.keyClick(chat.input, Qt.Key.Key_Return)
            await until(lambda: chat.conversation_id and chat._reply is None, 120,
                        "the reply to finish")
            footer = chat.transcript.toPlainText()
        finally:
            await app.shutdown()
        with sqlite3.connect(data_dir / DB_FILE) as db:
            rows = db.execute("SELECT role, content, meta FROM messages ORDER BY id").fetchall()
        assert [r[0] for r in rows] == ["user", "assistant"]
        assert rows[0][1] == "What is the capital of France?"
        assert "Paris" in rows[1][1]
        assert '"route_reason": "asked for the local route"' in rows[1][2]
        assert "Ran on this machine" in footer
        assert "because this chat asks for this machine" in footer

    run_async(body())
