"""Small widget builders the pages share (a button, a read-only table, a value with Copy), and
the chat's message box."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QGuiApplication, QKeyEvent
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QWidget,
)

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


class CopyRow(QWidget):
    """A value the user copies into another program (an API URL or key, a swarm token): a
    read-only field and a Copy button; a secret stays masked until its Show button is on."""

    revealed = Signal(bool)  # Show toggled: the secret is now shown (True) or masked

    def __init__(self, name: str, secret: bool = False, copy_label: str = "Copy") -> None:
        super().__init__()
        self.field = QLineEdit()
        self.field.setObjectName(name)
        self.field.setReadOnly(True)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.field, 1)
        self.show_button = QPushButton("Show")  # only a secret has one to press
        self.show_button.setCheckable(True)
        self.show_button.toggled.connect(self._reveal)
        self.show_button.setVisible(secret)
        layout.addWidget(self.show_button)
        if secret:
            self.field.setEchoMode(QLineEdit.EchoMode.Password)
        self.copy_button = button(
            copy_label, lambda: QGuiApplication.clipboard().setText(self.field.text()))
        layout.addWidget(self.copy_button)

    def _reveal(self, shown: bool) -> None:
        self.field.setEchoMode(QLineEdit.EchoMode.Normal if shown
                               else QLineEdit.EchoMode.Password)
        self.show_button.setText("Hide" if shown else "Show")
        self.revealed.emit(shown)


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
