"""The main window: a page list on the left (Chat, Swarm, Models, Settings), the page on the
right, a status line saying what this machine's node is doing, and the keyboard shortcuts
(Ctrl+1…4 pages, Ctrl+N new chat, Esc stops a reply, F2 renames the chat, Ctrl+F searches,
Ctrl+B shows or hides the chat's side panel)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QCloseEvent, QIcon, QKeySequence, QShortcut, QShowEvent
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QListWidget,
    QMainWindow,
    QStackedWidget,
    QWidget,
)

import resources
from app.gui.controller import Controller
from app.gui.node_supervisor import NodeState
from app.gui.pages.chat import ChatPage
from app.gui.pages.models import ModelsPage
from app.gui.pages.settings import SettingsPage
from app.gui.pages.swarm import SwarmPage

PAGES = ("Chat", "Swarm", "Models", "Settings")


class MainWindow(QMainWindow):
    close_requested = Signal()  # the app decides: hide to the tray, or quit

    def __init__(self, controller: Controller) -> None:
        super().__init__()
        self.controller = controller
        self.setWindowTitle("Covey")
        self.setWindowIcon(QIcon(str(resources.icon_path("covey"))))
        self.resize(1100, 720)

        self.chat = ChatPage(controller)
        self.swarm = SwarmPage(controller)
        self.models = ModelsPage(controller)
        self.settings = SettingsPage(controller)
        self.stack = QStackedWidget()
        for page in (self.chat, self.swarm, self.models, self.settings):
            self.stack.addWidget(page)
        self.nav = QListWidget()
        self.nav.setObjectName("nav")
        self.nav.addItems(PAGES)
        self.nav.setFixedWidth(150)
        self.nav.currentRowChanged.connect(self.stack.setCurrentIndex)
        self.nav.setCurrentRow(0)

        body = QWidget()
        layout = QHBoxLayout(body)
        layout.setContentsMargins(0, 0, 8, 0)
        layout.addWidget(self.nav)
        layout.addWidget(self.stack, 1)
        self.setCentralWidget(body)
        self.node_label = QLabel("Starting…")
        self.node_label.setObjectName("nodeState")
        self.statusBar().addPermanentWidget(self.node_label)
        controller.node_state.connect(self.show_node_state)
        controller.status.connect(self.show_status)
        controller.error.connect(lambda text: self.statusBar().showMessage(text, 15000))
        controller.roles_message.connect(lambda text: self.statusBar().showMessage(text, 15000))
        self.force_quit = False
        self._add_shortcuts()

    def _add_shortcuts(self) -> None:
        def on_chat(action: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                self.show_page("Chat")
                action()
            return run

        keys: list[tuple[str, Callable[[], None]]] = [
            (f"Ctrl+{i}", partial(self.show_page, name)) for i, name in enumerate(PAGES, 1)]
        keys += [
            ("Ctrl+N", on_chat(self.chat.new_conversation)),
            ("Esc", self.chat.escape),
            ("F2", on_chat(self.chat.rename_current)),
            ("Ctrl+F", on_chat(self.chat.search.setFocus)),
            ("Ctrl+B", on_chat(self.chat.toggle_panel)),
        ]
        self.shortcuts = {key: QShortcut(QKeySequence(key), self, action) for key, action in keys}

    def show_page(self, name: str) -> None:
        self.nav.setCurrentRow(PAGES.index(name))
        if name == "Chat":
            self.chat.focus_input()

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if self.stack.currentWidget() is self.chat:
            self.chat.focus_input()

    def show_node_state(self, state: NodeState) -> None:
        if state.phase == "running":
            return  # the next status poll fills the line in
        self.node_label.setText(state.message or state.phase)
        style = "color: #c0392b" if state.phase in ("failed", "restarting") else ""
        self.node_label.setStyleSheet(style)

    def show_status(self, status: dict[str, Any]) -> None:
        peers = len(status.get("connected_peers") or [])
        roles = [r for r in ("worker", "federated")
                 if (status.get(r) or {}).get("enabled")]
        text = f"{status.get('name', '?')} · {peers} peer{'s' if peers != 1 else ''} connected"
        if roles:
            text += " · " + " and ".join(roles) + " mode on"
        self.node_label.setText(text)
        self.node_label.setStyleSheet("")

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        if self.force_quit:
            event.accept()
            return
        event.ignore()
        self.close_requested.emit()

    def raise_window(self) -> None:
        self.show()
        self.setWindowState(self.windowState() & ~Qt.WindowState.WindowMinimized)
        self.raise_()
        self.activateWindow()
