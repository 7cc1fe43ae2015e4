"""Small widget builders the pages share."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtWidgets import QHeaderView, QPushButton, QTableWidget


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
