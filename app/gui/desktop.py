"""The desktop app's parts wired together: window, tray and controller.

It also decides what closing the window means: with a role on, Covey stays in the tray and
says so once; otherwise it quits and stops the node it started.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from PySide6.QtWidgets import QApplication, QSystemTrayIcon

from app.gui.controller import Controller
from app.gui.main_window import MainWindow
from app.gui.style import STYLE_SHEET
from app.gui.tray import Tray

INFO = QSystemTrayIcon.MessageIcon.Information


class CoveyApp:
    def __init__(self, data_dir: Path, node_command: list[str] | None = None) -> None:
        QApplication.setQuitOnLastWindowClosed(False)  # the tray decides when Covey quits
        qt = QApplication.instance()
        if isinstance(qt, QApplication):
            qt.setStyleSheet(STYLE_SHEET)
        self.controller = Controller(data_dir, node_command)
        self.window = MainWindow(self.controller)
        self.tray = Tray(self.controller, self.window.raise_window, self.quit)
        self.tray_available = QSystemTrayIcon.isSystemTrayAvailable()
        if self.tray_available:
            self.tray.show()
        self.window.close_requested.connect(self.close_window)
        self.controller.notify.connect(self.notify)
        self.quitting: asyncio.Future[None] = asyncio.get_event_loop().create_future()

    async def start(self) -> None:
        self.window.show()
        await self.controller.start()

    def notify(self, text: str) -> None:
        if self.tray_available:
            self.tray.showMessage("Covey", text, INFO, 5000)

    def close_window(self) -> None:
        settings = self.controller.settings
        if settings.keep_in_tray and self.tray.roles_on and self.tray_available:
            self.window.hide()
            if not settings.tray_notice_shown:
                self.tray.showMessage(
                    "Covey is still running",
                    "This machine keeps serving the swarm. Quit from the tray icon's menu.",
                    INFO, 8000)
                self.controller.save_settings(replace(settings, tray_notice_shown=True))
            return
        self.quit()

    def quit(self) -> None:
        if not self.quitting.done():
            self.quitting.set_result(None)

    async def shutdown(self) -> None:
        self.tray.hide()
        await self.controller.stop()
        self.window.force_quit = True
        self.window.close()
