"""The settings page: donated memory, threads, the context length, LAN only, the API port,
start at login, tray.

Changes apply when saved; settings the node reads at start restart it, and the page says so.
With the API on, the page shows its base URL and key (each with Copy) for other programs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QIntValidator
from PySide6.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.gui import autostart
from app.gui.app_settings import AppSettings, ctx_from_field
from app.gui.controller import Controller
from app.gui.widgets import CopyRow
from backends.memory import memory_bytes
from swarm.api.files import SECRET_FILE, read_secret

MIN_SHARE_MIB = 256
MAX_CTX = 1 << 24  # beyond any model's trained context


def api_access(settings: AppSettings, data_dir: Path) -> tuple[str, str] | None:
    """(base URL, key) an OpenAI client needs, when the API is on; None when it is off."""
    if not settings.api_enabled:
        return None
    try:
        key = read_secret(data_dir / SECRET_FILE)
    except OSError:
        key = ""
    return f"http://127.0.0.1:{settings.api_port}/v1", key


def context_now(status: dict[str, Any]) -> str:
    """The context the node reports for the model loaded on its engine; empty when none is
    loaded (an automatic context depends on the model) or the node does not say."""
    loaded = (status.get("ctx") or {}).get("loaded")
    return f"now {loaded:,} tokens" if loaded else ""


class SettingsPage(QWidget):
    def __init__(self, controller: Controller) -> None:
        super().__init__()
        self.controller = controller
        total_mib = max(memory_bytes().total >> 20, MIN_SHARE_MIB * 2)

        self.share = QSlider(Qt.Orientation.Horizontal)
        self.share.setRange(MIN_SHARE_MIB, total_mib)
        self.share.setSingleStep(256)
        self.share.setPageStep(1024)
        self.share_label = QLabel()
        self.share.valueChanged.connect(
            lambda v: self.share_label.setText(f"{v / 1024:.1f} of {total_mib / 1024:.1f} GiB"))
        self.threads = QSpinBox()
        self.threads.setRange(0, 256)
        self.threads.setSpecialValueText("automatic")
        self.ctx = QLineEdit()
        self.ctx.setObjectName("contextLength")
        self.ctx.setValidator(QIntValidator(0, MAX_CTX))
        self.ctx.setPlaceholderText("automatic")
        self.ctx.setToolTip("Tokens a chat can hold. Blank: automatic, the model's trained "
                            "context capped by this machine's memory (4096 when sharded).")
        self.ctx_now = QLabel()
        self.lan_only = QCheckBox("Find machines on this network only (no DHT)")
        self.api_enabled = QCheckBox("OpenAI-compatible API for other programs on this machine")
        self.api_port = QSpinBox()
        self.api_port.setRange(1024, 65535)
        self.start_at_login = QCheckBox("Start Covey when I log in")
        self.keep_in_tray = QCheckBox("Keep running in the tray while a role is on")
        for box in (self.threads, self.ctx, self.api_port):
            box.setMaximumWidth(140)
        self.save_button = QPushButton("Save")
        self.save_button.setDefault(True)
        self.save_button.clicked.connect(self.save)
        self.message = QLabel()
        self.message.setWordWrap(True)

        share_row = QHBoxLayout()
        share_row.addWidget(self.share, 1)
        share_row.addWidget(self.share_label)
        form = QFormLayout()
        form.addRow("Memory donated in worker mode:", share_row)
        form.addRow("Engine threads:", self.threads)
        ctx_row = QHBoxLayout()
        ctx_row.addWidget(self.ctx)
        ctx_row.addWidget(self.ctx_now, 1)
        form.addRow("Context length (tokens):", ctx_row)
        form.addRow("", self.lan_only)
        form.addRow("", self.api_enabled)
        form.addRow("API port (127.0.0.1):", self.api_port)
        form.addRow("", self.start_at_login)
        form.addRow("", self.keep_in_tray)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(24, 16, 24, 16)
        heading = QLabel("<h2>Settings</h2>")
        layout.addWidget(heading)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.save_button)
        layout.addLayout(buttons)
        layout.addWidget(self.message)
        layout.addWidget(self._api_box())
        layout.addStretch(1)
        self.show_settings(controller.settings)
        self.show_api()
        controller.settings_changed.connect(lambda _s: self.show_api())
        controller.node_state.connect(lambda _s: self.show_api())
        controller.status.connect(lambda status: self.ctx_now.setText(context_now(status)))

    def _api_box(self) -> QGroupBox:
        url, key = CopyRow("apiUrl"), CopyRow("apiKey", secret=True)
        self.api_url, self.copy_url = url.field, url.copy_button
        self.api_key, self.copy_key = key.field, key.copy_button
        self.show_key = key.show_button
        self.api_group = QGroupBox("Connect other programs (OpenAI API)")
        form = QFormLayout(self.api_group)
        form.addRow("Base URL:", url)
        form.addRow("API key:", key)
        return self.api_group

    def show_api(self) -> None:
        access = api_access(self.controller.settings, self.controller.data_dir)
        self.api_group.setVisible(access is not None)
        if access is not None:
            self.api_url.setText(access[0])
            self.api_key.setText(access[1])

    def show_settings(self, s: AppSettings) -> None:
        self.share.setValue(s.share_mib or self.share.maximum() // 2)
        self.threads.setValue(s.threads or 0)
        self.ctx.setText(str(s.ctx) if s.ctx else "")
        self.lan_only.setChecked(s.lan_only)
        self.api_enabled.setChecked(s.api_enabled)
        self.api_port.setValue(s.api_port)
        self.start_at_login.setChecked(s.start_at_login)
        self.keep_in_tray.setChecked(s.keep_in_tray)

    def chosen(self) -> AppSettings:
        return replace(
            self.controller.settings, share_mib=self.share.value(),
            threads=self.threads.value() or None,
            ctx=ctx_from_field(self.ctx.text(), self.controller.settings.ctx),
            lan_only=self.lan_only.isChecked(),
            api_enabled=self.api_enabled.isChecked(), api_port=self.api_port.value(),
            start_at_login=self.start_at_login.isChecked(),
            keep_in_tray=self.keep_in_tray.isChecked())

    def save(self) -> None:
        settings = self.chosen()
        try:
            autostart.set_enabled(settings.start_at_login)
        except OSError as exc:
            self.message.setText(f"Could not change start at login: {exc}")
            return
        if self.controller.save_settings(settings):
            self.message.setText("Saved. Restarting this machine's node to apply them…")
            self.controller.spawn(self._restart(), "Restarting the node failed")
        else:
            self.message.setText("Saved.")

    async def _restart(self) -> None:
        await self.controller.supervisor.restart()
        await self.controller.refresh()
        self.message.setText("Saved and applied.")
