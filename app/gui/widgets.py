"""Small widget builders the pages share, and the chat's message box."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QHeaderView, QPlainTextEdit, QPushButton, QTableWidget

ENTER_KEYS = (Qt.Key.Key_Return, Qt.Key.Key_Enter)


def button(label: str, on_click: Callable[[], object]) -> QPushButton:
    """A push button that calls `on_click` when clicked."""
    pushed = QPushButton(label)
    pushed.clicked.connect(on_click)
    return pushed


def read_only_table(name: str, columns: tuple[str, ...]) -> QTableWidget:
    """A list of rows the user reads: first column stretched, the others fitted, no editing."""
    table = QTableWidget(0, len(columns))
    table.setObjectName(name)
    table.setHorizontalHeaderLabels(columns)
    header = table.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
    table.verticalHeader().setVisible(False)
    table.setAlternatingRowColors(True)
    table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
    return table


class MessageBox(QPlainTextEdit):
    """Where a chat message is typed, as in every chat app: Enter sends, Shift+Enter starts a
    new line, Tab moves on to the next control (a message has no use for tab characters)."""

    submitted = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.setTabChangesFocus(True)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 (Qt's name)
        if event.key() in ENTER_KEYS:
            if event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
                self.insertPlainText("\n")
            else:
                self.submitted.emit()
            event.accept()
            return
        super().keyPressEvent(event)
