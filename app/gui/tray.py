"""The tray icon: its picture shows the role, its menu switches worker and federated mode (as
the Swarm page does; the controller remembers the choice).

Kept apart from the window (as vorta does) so it can outlive it: with a role on, closing the
window leaves Covey running here.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtGui import QAction, QGuiApplication, QIcon
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

import resources
from app.gui.controller import Controller
from app.gui.roles import roles_of


def dark_panel() -> bool:
    hints = QGuiApplication.styleHints()
    return hints.colorScheme().name == "Dark" if hasattr(hints, "colorScheme") else False


class Tray(QSystemTrayIcon):
    def __init__(self, controller: Controller, open_window: Any, quit_app: Any) -> None:
        super().__init__()
        self.controller = controller
        menu = QMenu()
        self.open_action = QAction("Open Covey", menu)
        self.open_action.triggered.connect(open_window)
        self.worker_action = QAction("Worker mode", menu, checkable=True)
        self.worker_action.setToolTip("Donate this machine's memory to the swarm")
        self.worker_action.triggered.connect(self._toggle_worker)
        self.federated_action = QAction("Federated mode", menu, checkable=True)
        self.federated_action.setToolTip("Serve whole requests for the swarm")
        self.federated_action.triggered.connect(self._toggle_federated)
        self.quit_action = QAction("Quit", menu)
        self.quit_action.triggered.connect(quit_app)
        for action in (self.open_action, None, self.worker_action, self.federated_action, None,
                       self.quit_action):
            if action is None:
                menu.addSeparator()
            else:
                menu.addAction(action)
        self._menu = menu
        self.setContextMenu(menu)
        self.activated.connect(lambda reason: open_window()
                               if reason == QSystemTrayIcon.ActivationReason.Trigger else None)
        self.online = False
        controller.status.connect(self.show_status)
        controller.node_state.connect(lambda s: self._set_online(s.phase == "running"))
        self._draw(False, False)

    @property
    def roles_on(self) -> bool:
        return self.worker_action.isChecked() or self.federated_action.isChecked()

    def show_status(self, status: dict[str, Any]) -> None:
        roles = roles_of(status)
        worker, federated = roles.worker, roles.federated
        self.worker_action.setChecked(worker)
        self.federated_action.setChecked(federated)
        self.online = True
        self._draw(worker, federated)

    def _set_online(self, online: bool) -> None:
        self.online = online
        self._draw(self.worker_action.isChecked(), self.federated_action.isChecked())

    def _draw(self, worker: bool, federated: bool) -> None:
        name = resources.tray_icon_name(worker, federated, self.online, dark_panel())
        self.setIcon(QIcon(str(resources.icon_path(name))))
        roles = [r for r, on in (("worker", worker), ("federated", federated)) if on]
        self.setToolTip("Covey — " + (", ".join(roles) + " mode" if roles else
                                      "in the swarm" if self.online else "not running"))

    def _toggle_worker(self, checked: bool) -> None:
        self.controller.spawn(self.controller.set_role("worker", checked),
                              "Switching worker mode failed")

    def _toggle_federated(self, checked: bool) -> None:
        self.controller.spawn(self.controller.set_role("federated", checked),
                              "Switching federated mode failed")
