"""The chat page's side panel: one conversation's system prompt, temperature, max tokens and
route preference, each route explained in one line.

A view only: it shows a `ChatPanel` and says when the user changed it (`changed`); the chat
page keeps the values in conversations.db and turns them into the request
(app/common/chat_request.py).
"""

from __future__ import annotations

from html import escape

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.common.chat_request import DEFAULTS, ROUTE_PREFERENCES, ChatPanel
from app.gui.transcript.route_words import PREFERENCE_LABELS, PREFERENCE_MEANING

MAX_TOKENS_RANGE = (16, 32768)
TEMPERATURE_MAX = 2.0


class ChatPanelView(QWidget):
    """The panel's widgets; `values()` reads them, `show_values()` sets them silently."""

    changed = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("chatPanel")
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setObjectName("systemPrompt")
        self.system_prompt.setTabChangesFocus(True)
        self.system_prompt.setPlaceholderText("e.g. You are a patient tutor. Answer briefly.")
        self.system_prompt.setFixedHeight(110)
        self.temperature = QDoubleSpinBox()
        self.temperature.setObjectName("temperature")
        self.temperature.setRange(0.0, TEMPERATURE_MAX)
        self.temperature.setSingleStep(0.1)
        self.temperature.setDecimals(2)
        self.temperature.setToolTip("Lower: more predictable replies. Higher: more varied ones.")
        self.max_tokens = QSpinBox()
        self.max_tokens.setObjectName("maxTokens")
        self.max_tokens.setRange(*MAX_TOKENS_RANGE)
        self.max_tokens.setSingleStep(128)
        self.max_tokens.setToolTip("The longest reply, in tokens (a token is about ¾ of a word).")
        self.route = QComboBox()
        self.route.setObjectName("routePreference")
        for preference in ROUTE_PREFERENCES:
            self.route.addItem(PREFERENCE_LABELS[preference], preference)
            self.route.setItemData(self.route.count() - 1, PREFERENCE_MEANING[preference],
                                   Qt.ItemDataRole.ToolTipRole)
        self.route_words = QLabel()
        self.route_words.setObjectName("routeWords")
        self.route_words.setWordWrap(True)
        reset = QPushButton("Reset to defaults")
        reset.clicked.connect(self._reset)

        form = QFormLayout()
        form.addRow("Temperature:", self.temperature)
        form.addRow("Max tokens:", self.max_tokens)
        form.addRow("Run on:", self.route)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<b>This chat</b>"))
        layout.addWidget(QLabel("System prompt:"))
        layout.addWidget(self.system_prompt)
        layout.addLayout(form)
        layout.addWidget(self.route_words)
        layout.addWidget(reset)
        layout.addStretch(1)

        self.show_values(ChatPanel())
        self.system_prompt.textChanged.connect(self.changed)
        self.temperature.valueChanged.connect(lambda _v: self.changed.emit())
        self.max_tokens.valueChanged.connect(lambda _v: self.changed.emit())
        self.route.currentIndexChanged.connect(lambda _i: self._route_changed())

    def values(self) -> ChatPanel:
        """What the widgets say; a value left at Covey's default is stored as "default", so a
        new default reaches it."""
        temperature = round(self.temperature.value(), 2)
        max_tokens = self.max_tokens.value()
        return ChatPanel(
            system_prompt=self.system_prompt.toPlainText(),
            temperature=None if temperature == DEFAULTS.temperature else temperature,
            max_tokens=None if max_tokens == DEFAULTS.max_tokens else max_tokens,
            route=self.route.currentData())

    def show_values(self, panel: ChatPanel) -> None:
        inputs = (self.system_prompt, self.temperature, self.max_tokens, self.route)
        for widget in inputs:
            widget.blockSignals(True)
        try:
            if self.system_prompt.toPlainText() != panel.system_prompt:
                self.system_prompt.setPlainText(panel.system_prompt)
            self.temperature.setValue(DEFAULTS.temperature if panel.temperature is None
                                      else panel.temperature)
            self.max_tokens.setValue(DEFAULTS.max_tokens if panel.max_tokens is None
                                     else panel.max_tokens)
            self.route.setCurrentIndex(max(self.route.findData(panel.route), 0))
        finally:
            for widget in inputs:
                widget.blockSignals(False)
        self._explain()

    def _route_changed(self) -> None:
        self._explain()
        self.changed.emit()

    def _explain(self) -> None:
        chosen = self.route.currentData()
        lines = []
        for preference in ROUTE_PREFERENCES:
            line = (f"{escape(PREFERENCE_LABELS[preference])}: "
                    f"{escape(PREFERENCE_MEANING[preference])}")
            lines.append(f"<b>{line}</b>" if preference == chosen else line)
        self.route_words.setText("<br>".join(lines))

    def _reset(self) -> None:
        self.show_values(ChatPanel())
        self.changed.emit()
