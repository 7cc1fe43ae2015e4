"""The chat page: conversations in a sidebar, the transcript as Markdown, a model picker.

Replies stream from the node's OpenAI API (`/v1/chat/completions`); the text is redrawn at most
every 50 ms so a fast model never floods the Qt thread, and the reply is saved every second so
a crash loses little. Under each reply: the route and machines that served it, its tokens/s,
and any failover notice.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QGuiApplication, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from app.common.chat_request import ChatReply
from app.gui.controller import Controller
from app.gui.conversations import Message
from app.gui.widgets import button
from backends.store.bundled import chat_model

REDRAW_EVERY_MS = 50
SAVE_EVERY_S = 1.0


def served_line(meta: dict[str, Any]) -> str:
    """'local route (fits this machine …) · vm · 19.8 tokens/s' under a reply."""
    parts = []
    if meta.get("route"):
        why = f" ({meta['route_reason']})" if meta.get("route_reason") else ""
        parts.append(f"{meta['route']} route{why}")
    if meta.get("machines"):
        parts.append(", ".join(meta["machines"]))
    if meta.get("tokens_per_s"):
        parts.append(f"{meta['tokens_per_s']:.1f} tokens/s")
    if meta.get("stopped"):
        parts.append("stopped")
    return " · ".join(parts)


def transcript_markdown(messages: list[Message], streaming: str | None = None) -> str:
    """The conversation as Markdown; `streaming` is the reply still arriving."""
    blocks = []
    for m in messages:
        if m.role == "system":
            continue
        who = "You" if m.role == "user" else "Covey"
        block = f"**{who}**\n\n{m.content}"
        if m.meta.get("notice"):
            block += f"\n\n> ⚠ {m.meta['notice']}"
        if m.meta.get("error"):
            block += f"\n\n> ✖ {m.meta['error']}"
        line = served_line(m.meta) if m.role == "assistant" else ""
        if line:
            block += f"\n\n*{line}*"
        blocks.append(block)
    if streaming is not None:
        blocks.append(f"**Covey**\n\n{streaming or '…'}")
    return "\n\n---\n\n".join(blocks)


def model_choices(runnable: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(model id, label) for the picker: where each model the swarm can run would run, as the
    node's own `auto` policy says (its reason), or guessed from its routes for an older node."""
    choices = []
    for model in runnable:
        where = model.get("covey", {})
        routes = where.get("routes", [])
        if where.get("auto"):
            how = where["auto"]["reason"]
        elif "local" in routes:
            how = "fits this machine"
        elif "sharded" in routes:
            how = "spread over " + ", ".join(where.get("machines", [])[:3])
        else:
            how = "served by " + ", ".join(where.get("machines", [])[:3])
        choices.append((model["id"], f"{model['id']} — {how}"))
    return choices


class ChatPage(QWidget):
    def __init__(self, controller: Controller) -> None:
        super().__init__()
        self.controller = controller
        self.store = controller.conversations
        self.conversation_id: int | None = None
        self._reply: asyncio.Task[None] | None = None
        self._partial = ""
        self._messages: list[Message] = []

        self.sidebar = QListWidget()
        self.sidebar.setObjectName("conversations")
        self.sidebar.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.sidebar.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.sidebar.currentItemChanged.connect(self._picked)
        new_button = button("New chat", self.new_conversation)
        self.rename_button = button("Rename", self._rename)
        self.delete_button = button("Delete", self._delete)
        side = QVBoxLayout()
        side.addWidget(new_button)
        side.addWidget(self.sidebar, 1)
        row = QHBoxLayout()
        row.addWidget(self.rename_button)
        row.addWidget(self.delete_button)
        side.addLayout(row)
        side_widget = QWidget()
        side_widget.setLayout(side)

        self.model_picker = QComboBox()
        self.model_picker.setMinimumContentsLength(28)
        self.transcript = QTextBrowser()
        self.transcript.setObjectName("transcript")
        self.transcript.setOpenExternalLinks(True)
        self.transcript.setPlaceholderText("Ask anything. Replies run on your own machines.")
        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Message Covey (Ctrl+Enter sends)")
        self.input.setFixedHeight(80)
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send)
        self.stop_button = button("Stop", self.stop)
        self.regenerate_button = button("Regenerate", self.regenerate)
        self.copy_button = button("Copy reply", self.copy_reply)
        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.notice.setObjectName("chatNotice")
        QShortcut(QKeySequence("Ctrl+Return"), self.input, self.send)

        top = QHBoxLayout()
        top.addWidget(QLabel("Model:"))
        top.addWidget(self.model_picker, 1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.regenerate_button)
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

        splitter = QSplitter()
        splitter.addWidget(side_widget)
        splitter.addWidget(main_widget)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([220, 700])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(splitter)

        self._redraw_timer = QTimer(self)
        self._redraw_timer.setInterval(REDRAW_EVERY_MS)
        self._redraw_timer.timeout.connect(self._redraw)
        controller.models.connect(self._models_changed)
        self._reload_sidebar()
        self._update_buttons()

    # -- conversations -------------------------------------------------------------------------

    def _reload_sidebar(self, select: int | None = None) -> None:
        select = select if select is not None else self.conversation_id
        self.sidebar.blockSignals(True)
        self.sidebar.clear()
        for conv in self.store.list():
            item = QListWidgetItem(conv.title)
            item.setData(Qt.ItemDataRole.UserRole, conv.id)
            self.sidebar.addItem(item)
            if conv.id == select:
                self.sidebar.setCurrentItem(item)
        self.sidebar.blockSignals(False)
        if self.sidebar.currentItem() is None and self.sidebar.count():
            self.sidebar.setCurrentRow(0)
        elif not self.sidebar.count():
            self._show(None)

    def _picked(self, item: QListWidgetItem | None, _old: QListWidgetItem | None = None) -> None:
        if self._reply is not None:
            self.stop()
        self._show(item.data(Qt.ItemDataRole.UserRole) if item else None)

    def _show(self, conversation_id: int | None) -> None:
        self.conversation_id = conversation_id
        self._messages = self.store.messages(conversation_id) if conversation_id else []
        conv = self.store.get(conversation_id) if conversation_id else None
        if conv and conv.model:
            index = self.model_picker.findData(conv.model)
            if index >= 0:
                self.model_picker.setCurrentIndex(index)
        self._redraw()
        self._update_buttons()

    def new_conversation(self) -> None:
        conv = self.store.create(self.model_picker.currentData())
        self._reload_sidebar(select=conv.id)
        self._show(conv.id)
        self.input.setFocus()

    def _rename(self) -> None:
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

    # -- models --------------------------------------------------------------------------------

    def _models_changed(self, models: dict[str, Any]) -> None:
        choices = model_choices(models.get("runnable", []))
        current = self.model_picker.currentData() or chat_model()
        if [(self.model_picker.itemData(i), self.model_picker.itemText(i))
                for i in range(self.model_picker.count())] == choices:
            return
        self.model_picker.clear()
        for model_id, label in choices:
            self.model_picker.addItem(label, model_id)
        index = self.model_picker.findData(current)
        self.model_picker.setCurrentIndex(max(index, 0))
        self._update_buttons()

    # -- replies -------------------------------------------------------------------------------

    def send(self) -> None:
        text = self.input.toPlainText().strip()
        if not text or self._reply is not None:
            return
        model = self.model_picker.currentData()
        if not model:
            self._say("No model is available yet. Import or download one on the Models page, "
                      "or join a swarm that has one.")
            return
        if self.conversation_id is None:
            self.new_conversation()
        assert self.conversation_id is not None
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
        self._say("")
        self._partial = ""
        self._reply = asyncio.get_event_loop().create_task(
            self._stream(self.conversation_id, model, history))
        self._redraw_timer.start()
        self._update_buttons()

    async def _stream(self, conversation_id: int, model: str,
                      history: list[dict[str, str]]) -> None:
        saved = self.store.add(conversation_id, "assistant", "")
        reply = ChatReply()
        meta: dict[str, Any] = {}
        saved_at = time.monotonic()
        try:
            events = self.controller.chat(model, history)
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
        self.transcript.setMarkdown(transcript_markdown(self._messages, streaming))
        if at_end:
            bar.setValue(bar.maximum())

    def _say(self, text: str) -> None:
        self.notice.setText(text)

    def _update_buttons(self) -> None:
        busy = self._reply is not None
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        has_reply = any(m.role == "assistant" for m in self._messages)
        self.regenerate_button.setEnabled(not busy and bool(self._messages))
        self.copy_button.setEnabled(not busy and has_reply)
        self.rename_button.setEnabled(self.conversation_id is not None)
        self.delete_button.setEnabled(self.conversation_id is not None)
