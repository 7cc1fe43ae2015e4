"""The chat page: conversations in a sidebar (with search, export and import), the transcript
as Markdown, a model picker, and a message box where Enter sends.

Replies stream from the node's OpenAI API (`/v1/chat/completions`); the text is redrawn at most
every 50 ms so a fast model never floods the Qt thread, and the reply is saved every second so
a crash loses little. Under each reply: where it ran and why in plain words, its tokens/s, and
any failover notice. Until the node and a model are ready, Send waits ("Starting Covey…") and a
message typed meanwhile is sent when they are. A side panel (chat_panel.py, Ctrl+B) holds each
conversation's system prompt, sampling and route preference; the picker's labels follow the
preference, in the footer's words.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QGuiApplication, QTextCursor
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.common.chat_request import ChatPanel, ChatReply, ChatSettings, panel_request
from app.gui.controller import Controller
from app.gui.conversations import Message
from app.gui.node_supervisor import NodeState
from app.gui.pages.chat_panel import ChatPanelView
from app.gui.transcript.export import (
    export_of,
    from_json,
    import_into,
    to_json,
    to_markdown,
)
from app.gui.transcript.markdown import render_transcript, transcript_markdown
from app.gui.transcript.route_words import model_choices, served_line
from app.gui.transcript.view import TranscriptView
from app.gui.widgets import MessageBox, button
from backends.store.bundled import chat_model

__all__ = ["ChatPage", "model_choices", "served_line", "transcript_markdown"]

REDRAW_EVERY_MS = 50
SAVE_EVERY_S = 1.0
STARTING_PHASES = ("starting", "restarting")
SEND = "Send"
STARTING = "Starting Covey…"
STARTING_NOTICE = "Covey is starting; your message will be sent as soon as it is ready."
NO_MODEL_NOTICE = ("No model is available yet. Import or download one on the Models page, or "
                   "join a swarm that has one; your message will be sent when one is.")
WAITING_NOTICES = (STARTING_NOTICE, NO_MODEL_NOTICE)
EDITING_NOTICE = ("Editing your last message: Enter sends it again in place of the old one; "
                  "Esc cancels.")


class ChatPage(QWidget):
    def __init__(self, controller: Controller) -> None:
        super().__init__()
        self.controller = controller
        self.store = controller.conversations
        self.conversation_id: int | None = None
        self._reply: asyncio.Task[None] | None = None
        self._partial = ""
        self._messages: list[Message] = []
        self._node_phase = ""  # as the supervisor last said; "" before it said anything
        self._models_seen = False  # the node has listed its models since it started
        self._queued = False  # a message waits in the box for the node or a model
        self._editing: int | None = None  # the user message being edited, to resend
        self._runnable: list[dict[str, Any]] = []  # GET /v1/models, as last listed

        self.search = QLineEdit()
        self.search.setObjectName("chatSearch")
        self.search.setPlaceholderText("Search chats")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(lambda _text: self._reload_sidebar())
        self.sidebar = QListWidget()
        self.sidebar.setObjectName("conversations")
        self.sidebar.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.sidebar.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.sidebar.currentItemChanged.connect(self._picked)
        new_button = button("New chat", self.new_conversation)
        self.rename_button = button("Rename", self.rename_current)
        self.delete_button = button("Delete", self._delete)
        self.export_button = button("Export…", self._export)
        self.import_button = button("Import…", self._import)
        side = QVBoxLayout()
        side.addWidget(new_button)
        side.addWidget(self.search)
        side.addWidget(self.sidebar, 1)
        for pair in ((self.rename_button, self.delete_button),
                     (self.export_button, self.import_button)):
            row = QHBoxLayout()
            row.addWidget(pair[0])
            row.addWidget(pair[1])
            side.addLayout(row)
        side_widget = QWidget()
        side_widget.setLayout(side)

        self.model_picker = QComboBox()
        self.model_picker.setMinimumContentsLength(28)
        self.transcript = TranscriptView()
        self.transcript.setPlaceholderText("Ask anything. Replies run on your own machines.")
        self.transcript.copied.connect(lambda _code: self._say("Code copied."))
        self.input = MessageBox()
        self.input.setObjectName("messageBox")
        self.input.setPlaceholderText("Message Covey (Enter sends, Shift+Enter adds a line)")
        self.input.setFixedHeight(80)
        self.input.submitted.connect(self.send)
        self.send_button = QPushButton(SEND)
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send)
        self.stop_button = button("Stop", self.stop)
        self.regenerate_button = button("Regenerate", self.regenerate)
        self.edit_button = button("Edit last", self.edit_last)
        self.copy_button = button("Copy reply", self.copy_reply)
        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.notice.setObjectName("chatNotice")

        self.panel = ChatPanelView()
        self.panel.changed.connect(self._panel_changed)
        self.panel_button = QPushButton("Chat settings")
        self.panel_button.setObjectName("panelButton")
        self.panel_button.setCheckable(True)
        self.panel_button.setToolTip("System prompt, temperature, max tokens and where replies "
                                     "run, for this chat (Ctrl+B)")
        self.panel_button.toggled.connect(self.show_panel)

        top = QHBoxLayout()
        top.addWidget(QLabel("Model:"))
        top.addWidget(self.model_picker, 1)
        top.addWidget(self.panel_button)
        buttons = QHBoxLayout()
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.regenerate_button)
        buttons.addWidget(self.edit_button)
        buttons.addWidget(self.copy_button)
        buttons.addStretch(1)
        buttons.addWidget(self.send_button)
        main = QVBoxLayout()
        main.addLayout(top)
        main.addWidget(self.transcript, 1)
        main.addWidget(self.notice)
        main.addWidget(self.input)
        main.addLayout(buttons)
        main_widget = QWidget()
        main_widget.setLayout(main)

        self.splitter = QSplitter()
        self.splitter.addWidget(side_widget)
        self.splitter.addWidget(main_widget)
        self.splitter.addWidget(self.panel)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([220, 700, 280])
        self.panel_button.setChecked(controller.settings.chat_panel_open)
        self.panel.setVisible(controller.settings.chat_panel_open)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.splitter)

        self._redraw_timer = QTimer(self)
        self._redraw_timer.setInterval(REDRAW_EVERY_MS)
        self._redraw_timer.timeout.connect(self._redraw)
        controller.models.connect(self._models_changed)
        controller.node_state.connect(self._node_changed)
        self._reload_sidebar()
        self._update_buttons()

    def focus_input(self) -> None:
        self.input.setFocus(Qt.FocusReason.OtherFocusReason)

    # -- the side panel ------------------------------------------------------------------------

    def toggle_panel(self) -> None:
        self.panel_button.toggle()

    def show_panel(self, shown: bool) -> None:
        """Show or hide the side panel, remembered across restarts."""
        self.panel_button.setChecked(shown)
        self.panel.setVisible(shown)
        if self.controller.settings.chat_panel_open != shown:
            self.controller.save_settings(replace(self.controller.settings,
                                                  chat_panel_open=shown))

    def _panel_changed(self) -> None:
        if self.conversation_id is not None:
            self.store.set_panel(self.conversation_id, self.panel.values())
        self._fill_picker()

    # -- conversations -------------------------------------------------------------------------

    def _reload_sidebar(self, select: int | None = None) -> None:
        select = select if select is not None else self.conversation_id
        query = self.search.text().strip()
        self.sidebar.blockSignals(True)
        self.sidebar.clear()
        rows = ([(hit.conversation, f"{hit.conversation.title}\n{hit.snippet}")
                 for hit in self.store.search(query)] if query
                else [(conv, conv.title) for conv in self.store.list()])
        for conv, text in rows:
            item = QListWidgetItem(text)
            item.setData(Qt.ItemDataRole.UserRole, conv.id)
            item.setToolTip(text)
            self.sidebar.addItem(item)
            if conv.id == select:
                self.sidebar.setCurrentItem(item)
        self.sidebar.blockSignals(False)
        if query:
            return  # a search only lists; picking a hit opens it
        if self.sidebar.currentItem() is None and self.sidebar.count():
            self.sidebar.setCurrentRow(0)
        elif not self.sidebar.count():
            self._show(None)

    def _picked(self, item: QListWidgetItem | None, _old: QListWidgetItem | None = None) -> None:
        if item is None and self.search.text().strip():
            return  # the search left the open chat out of the list; it stays open
        if self._reply is not None:
            self.stop()
        self._show(item.data(Qt.ItemDataRole.UserRole) if item else None)
        if item is not None and self.search.text().strip():
            self._find_in_transcript(self.search.text().strip())

    def _find_in_transcript(self, text: str) -> None:
        self.transcript.moveCursor(QTextCursor.MoveOperation.Start)
        self.transcript.find(text)

    def _show(self, conversation_id: int | None) -> None:
        if conversation_id != self.conversation_id:
            self.cancel_edit()
        self.conversation_id = conversation_id
        self._messages = self.store.messages(conversation_id) if conversation_id else []
        conv = self.store.get(conversation_id) if conversation_id else None
        self.panel.show_values(self.store.panel(conversation_id) if conversation_id
                               else ChatPanel())
        self._fill_picker()
        if conv and conv.model:
            index = self.model_picker.findData(conv.model)
            if index >= 0:
                self.model_picker.setCurrentIndex(index)
        self._redraw()
        self._update_buttons()

    def new_conversation(self) -> None:
        self.search.clear()
        conv = self.store.create(self.model_picker.currentData())
        if self.conversation_id is None:  # what was set before there was a chat is for this one
            self.store.set_panel(conv.id, self.panel.values())
        self._reload_sidebar(select=conv.id)
        self._show(conv.id)
        self.focus_input()

    def rename_current(self) -> None:
        if self.conversation_id is None:
            return
        conv = self.store.get(self.conversation_id)
        title, ok = QInputDialog.getText(self, "Rename chat", "Name:",
                                         text=conv.title if conv else "")
        if ok:
            self.store.rename(self.conversation_id, title)
            self._reload_sidebar()

    def _delete(self) -> None:
        if self.conversation_id is None:
            return
        answer = QMessageBox.question(self, "Delete chat", "Delete this conversation?")
        if answer == QMessageBox.StandardButton.Yes:
            self.delete_current()

    def delete_current(self) -> None:
        if self.conversation_id is not None:
            self.stop()
            self.store.delete(self.conversation_id)
            self.conversation_id = None
            self._reload_sidebar()

    def _export(self) -> None:
        conv = self.store.get(self.conversation_id) if self.conversation_id else None
        if conv is None:
            return
        name = "".join(c if c.isalnum() or c in " -_" else "_" for c in conv.title).strip()
        path, kind = QFileDialog.getSaveFileName(
            self, "Export chat", str(Path.home() / f"{name or 'chat'}.md"),
            "Markdown (*.md);;JSON, to import again (*.json)")
        if path:
            if not Path(path).suffix:
                path += ".json" if "json" in kind.lower() else ".md"
            self.export_to(Path(path))

    def export_to(self, path: Path) -> None:
        """Save the open conversation: JSON for a .json file, Markdown otherwise."""
        if self.conversation_id is None:
            return
        export = export_of(self.store, self.conversation_id)
        text = to_json(export) if path.suffix.lower() == ".json" else to_markdown(export)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            self._say(f"Could not save {path}: {exc.strerror or exc}")
            return
        self._say(f"Saved {path}.")

    def _import(self) -> None:
        path, _kind = QFileDialog.getOpenFileName(self, "Import chat", str(Path.home()),
                                                  "Covey chat (*.json)")
        if path:
            self.import_from(Path(path))

    def import_from(self, path: Path) -> None:
        """Open a conversation exported as JSON, as a new conversation."""
        try:
            export = from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self._say(f"Could not import {path.name}: {exc}")
            return
        conv = import_into(self.store, export)
        self.search.clear()
        self._reload_sidebar(select=conv.id)
        self._show(conv.id)
        self._say(f"Imported {conv.title!r}.")

    # -- the node and its models ---------------------------------------------------------------

    def starting(self) -> bool:
        """Whether the node is still coming up (or has not listed its models yet)."""
        return self._node_phase in STARTING_PHASES or (
            self._node_phase == "running" and not self._models_seen)

    def _node_changed(self, state: NodeState) -> None:
        self._node_phase = state.phase
        if state.phase in STARTING_PHASES:
            self._models_seen = False
        self._update_buttons()

    def _models_changed(self, models: dict[str, Any]) -> None:
        self._models_seen = True
        self._runnable = models.get("runnable", [])
        self._fill_picker()
        if self.model_picker.count() and self.notice.text() in WAITING_NOTICES:
            self._say("")
        self._update_buttons()
        if self._queued and not self.starting() and self.model_picker.count():
            self._queued = False
            self.send()

    def _fill_picker(self) -> None:
        """The models the swarm can run, labelled with where each would run for this chat's
        route preference."""
        choices = model_choices(self._runnable, self.panel.values().route)
        current = self.model_picker.currentData() or chat_model()
        if [(self.model_picker.itemData(i), self.model_picker.itemText(i))
                for i in range(self.model_picker.count())] != choices:
            self.model_picker.clear()
            for model_id, label in choices:
                self.model_picker.addItem(label, model_id)
            self.model_picker.setCurrentIndex(max(self.model_picker.findData(current), 0))

    def _routes_of(self, model: str) -> list[str]:
        return next((m.get("covey", {}).get("routes", []) for m in self._runnable
                     if m.get("id") == model), [])

    # -- replies -------------------------------------------------------------------------------

    def send(self) -> None:
        text = self.input.toPlainText().strip()
        if not text or self._reply is not None:
            return
        model = self.model_picker.currentData()
        if self.starting() or not model:
            self._queued = True
            self._say(STARTING_NOTICE if self.starting() else NO_MODEL_NOTICE)
            return
        if self.conversation_id is None:
            self.new_conversation()
        assert self.conversation_id is not None
        if self._editing is not None:
            self.store.delete_from(self.conversation_id, self._editing)
            self._editing = None
        self.store.set_model(self.conversation_id, model)
        self.store.add(self.conversation_id, "user", text)
        self.input.clear()
        self._start_reply(model)
        self._reload_sidebar()

    def regenerate(self) -> None:
        if self._reply is not None or not self._messages:
            return
        if self._messages[-1].role == "assistant":
            self.store.delete_message(self._messages[-1].id)
        model = self.model_picker.currentData()
        if model and self.conversation_id is not None:
            self._start_reply(model)

    def edit_last(self) -> None:
        """Put the last question back in the box; sending replaces it and its reply."""
        asked = [m for m in self._messages if m.role == "user"]
        if self._reply is not None or not asked:
            return
        self._editing = asked[-1].id
        self.input.setPlainText(asked[-1].content)
        self.input.moveCursor(QTextCursor.MoveOperation.End)
        self.focus_input()
        self._say(EDITING_NOTICE)

    def cancel_edit(self) -> None:
        if self._editing is not None:
            self._editing = None
            self.input.clear()
            self._say("")

    def escape(self) -> None:
        """Esc: stop the reply, or else stop editing."""
        if self._reply is not None:
            self.stop()
        else:
            self.cancel_edit()

    def stop(self) -> None:
        if self._reply is not None:
            self._reply.cancel()

    def copy_reply(self) -> None:
        replies = [m for m in self._messages if m.role == "assistant"]
        if replies:
            QGuiApplication.clipboard().setText(replies[-1].content)
            self._say("Reply copied.")

    def _start_reply(self, model: str) -> None:
        assert self.conversation_id is not None
        self._messages = self.store.messages(self.conversation_id)
        history = [{"role": m.role, "content": m.content} for m in self._messages]
        asked = panel_request(self.store.panel(self.conversation_id), history,
                              self._routes_of(model))
        self._say("")
        self._partial = ""
        self._reply = asyncio.get_event_loop().create_task(
            self._stream(self.conversation_id, model, *asked))
        self._redraw_timer.start()
        self._update_buttons()
    async def _stream(self, conversation_id: int, model: str, settings: ChatSettings,
                      messages: list[dict[str, str]], route: str) -> None:
        saved = self.store.add(conversation_id, "assistant", "")
        reply = ChatReply()
        meta: dict[str, Any] = {}
        saved_at = time.monotonic()
        try:
            events = self.controller.chat(model, messages, settings, route)
            try:
                async for event in events:
                    reply.add(event, time.monotonic())
                    meta.update(reply.served())
                    self._partial = reply.text
                    if meta.get("notice") and self.notice.text() != meta["notice"]:
                        self._say(meta["notice"])
                        self.controller.notify.emit(meta["notice"])
                    if time.monotonic() - saved_at > SAVE_EVERY_S:
                        self.store.update(saved.id, self._partial, meta)
                        saved_at = time.monotonic()
            finally:
                await events.aclose()
        except asyncio.CancelledError:
            meta["stopped"] = True
        except Exception as exc:  # the node's own message, shown under the reply
            meta["error"] = str(exc)
        finally:
            speed = reply.tokens_per_s(time.monotonic())
            if speed:
                meta["tokens_per_s"] = speed
            self.store.update(saved.id, reply.text, meta)
            self._reply = None
            self._redraw_timer.stop()
            if self.conversation_id == conversation_id:
                self._messages = self.store.messages(conversation_id)
            self._partial = ""
            self._redraw()
            self._update_buttons()

    def _redraw(self) -> None:
        streaming = self._partial if self._reply is not None else None
        bar = self.transcript.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 4
        self.transcript.show_transcript(render_transcript(self._messages, streaming))
        if at_end:
            bar.setValue(bar.maximum())

    def _say(self, text: str) -> None:
        self.notice.setText(text)

    def _update_buttons(self) -> None:
        busy = self._reply is not None
        starting = self.starting()
        self.send_button.setText(STARTING if starting else SEND)
        self.send_button.setEnabled(not busy and not starting)
        self.stop_button.setEnabled(busy)
        has_reply = any(m.role == "assistant" for m in self._messages)
        self.regenerate_button.setEnabled(not busy and bool(self._messages))
        self.edit_button.setEnabled(not busy and any(m.role == "user" for m in self._messages))
        self.copy_button.setEnabled(not busy and has_reply)
        for action in (self.rename_button, self.delete_button, self.export_button):
            action.setEnabled(self.conversation_id is not None)
