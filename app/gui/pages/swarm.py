"""The swarm page: this machine's roles (worker, with the memory it lends, and federated),
invite (this swarm's token), join by pasting a token, leave; the live peer list and a topology
of who serves whom.

The paste box checks the token as the user types with the same parser the node uses, so a
bad paste shows that parser's specific message before anything changes.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QBrush, QColor, QPainter, QPen
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.common.elapsed import ago
from app.gui.app_settings import AppSettings
from app.gui.controller import Controller
from app.gui.roles import federated_words, roles_of, worker_words
from app.gui.widgets import CopyRow, button, read_only_table
from backends.memory import memory_bytes
from backends.sizes import human_bytes
from swarm.trust.token import TokenError, parse_token

PEER_COLUMNS = ("Name", "OS", "RAM", "Donated", "Role", "State", "Last seen")


def check_token(text: str, current: str) -> str | None:
    """None when `text` is a token this machine can join; else what is wrong with it."""
    if not text.strip():
        return ""
    try:
        token = parse_token(text)
    except TokenError as exc:
        return str(exc)
    if current and token.encode() == parse_token(current).encode():
        return "This machine is already in this swarm."
    return None


def headless_command(token: str, shown: bool) -> str:
    """How to join from a machine without a screen, with this swarm's token (masked until
    shown); stdin keeps the token out of the process list."""
    visible = token if shown else token[:6] + "•" * 12
    return ("On a machine without a screen: "
            f"<code>echo {visible} | covey node --token -</code> "
            "(or <code>covey node --token-file FILE</code>)")


def peer_row(peer: dict[str, Any], now: float) -> list[str]:
    worker = peer.get("worker") or {}
    roles = list(peer.get("roles") or [])
    if worker and "worker" not in roles:
        roles.append("worker")
    if not peer.get("online"):
        state = "offline"
    elif worker.get("state") == "leased":
        state = "serving " + (worker.get("leased_by_name") or "a peer")
    else:
        state = "online" + (" (this machine)" if peer.get("self") else "")
    if peer.get("online") and peer.get("link"):
        state += f" · {peer['link']}"  # "direct" or "relayed via NAME"
    ram, donated = peer.get("ram_total"), worker.get("donated_bytes")
    return [
        peer.get("name", "?"),
        str(peer.get("os", "")),
        human_bytes(ram) if ram else "—",
        human_bytes(donated) if donated else "—",
        ", ".join(roles) or "member",
        state,
        "now" if peer.get("self") else ago(now - float(peer.get("last_seen") or now)),
    ]


def serving_edges(peers: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(worker, client) pairs: which machine lends its memory to which."""
    names = {p["peer_id"]: p.get("name", "?") for p in peers}
    edges = []
    for p in peers:
        worker = p.get("worker") or {}
        holder = worker.get("leased_by")
        if p.get("online") and holder in names:
            edges.append((p.get("name", "?"), names[holder]))
    return edges


class Topology(QWidget):
    """Machines on a circle; an arrow from each leased worker to the machine it serves."""

    def __init__(self) -> None:
        super().__init__()
        self.setMinimumHeight(180)
        self.peers: list[dict[str, Any]] = []

    def show_peers(self, peers: list[dict[str, Any]]) -> None:
        self.peers = peers
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        online = [p for p in self.peers if p.get("online")]
        if not online:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "No machines yet")
            return
        w, h = self.width(), self.height()
        radius = min(w, h) / 2 - 40
        centre = QPointF(w / 2, h / 2)
        where: dict[str, QPointF] = {}
        for i, p in enumerate(online):
            angle = 2 * math.pi * i / len(online) - math.pi / 2
            where[p.get("name", "?")] = centre + QPointF(math.cos(angle), math.sin(angle)) * (
                radius if len(online) > 1 else 0)
        pen = QPen(QColor("#2a9d8f"), 2)
        painter.setPen(pen)
        for worker, client in serving_edges(online):
            if worker in where and client in where:
                painter.drawLine(where[worker], where[client])
        text = self.palette().text().color()
        for p in online:
            point = where[p.get("name", "?")]
            is_worker = bool(p.get("worker"))
            painter.setPen(QPen(text, 1))
            painter.setBrush(QBrush(QColor("#e9c46a" if is_worker else "#8ecae6")))
            painter.drawEllipse(point, 14, 14)
            label = p.get("name", "?") + (" (you)" if p.get("self") else "")
            painter.drawText(point + QPointF(-60, 30), label)


class RolesBox(QGroupBox):
    """The worker and federated switches, as in the tray; the controller remembers them."""

    def __init__(self, controller: Controller) -> None:
        super().__init__("This machine's part in the swarm")
        self.controller = controller
        self.worker = QCheckBox("Worker mode: lend memory to run the swarm's big models")
        self.worker.setObjectName("workerSwitch")
        self.worker.clicked.connect(self._switch_worker)
        self.share = QDoubleSpinBox()
        self.share.setObjectName("donatedMemory")
        total_gib = max(memory_bytes().total / 2**30, 0.5)
        self.share.setRange(0.25, round(total_gib, 2))
        self.share.setSingleStep(0.25)
        self.share.setDecimals(2)
        self.share.setSuffix(" GiB")
        self.share.setToolTip("Memory this machine lends in worker mode")
        self.share.editingFinished.connect(self._new_share)
        self.federated = QCheckBox("Federated mode: answer other machines' chats with")
        self.federated.setObjectName("federatedSwitch")
        self.federated.clicked.connect(self._switch_federated)
        self.model = QComboBox()
        self.model.setObjectName("federatedModel")
        self.model.setMinimumContentsLength(18)
        self.state = QLabel()
        self.state.setObjectName("rolesState")
        self.state.setWordWrap(True)
        self.message = QLabel()
        self.message.setObjectName("rolesMessage")
        self.message.setWordWrap(True)
        worker_row = QHBoxLayout()
        worker_row.addWidget(self.worker)
        worker_row.addWidget(QLabel("lending"))
        worker_row.addWidget(self.share)
        worker_row.addStretch(1)
        federated_row = QHBoxLayout()
        federated_row.addWidget(self.federated)
        federated_row.addWidget(self.model)
        federated_row.addStretch(1)
        box = QVBoxLayout(self)
        box.addLayout(worker_row)
        box.addLayout(federated_row)
        box.addWidget(self.state)
        box.addWidget(self.message)
        settings = controller.settings
        self.share.setValue((settings.share_mib or int(total_gib * 512)) / 1024)
        self._show_models({"local": []})
        controller.status.connect(self.show_status)
        controller.models.connect(self._show_models)
        controller.roles_message.connect(self.message.setText)
        controller.settings_changed.connect(self._show_share)
        self.show_status({})

    def _show_share(self, settings: AppSettings) -> None:
        if settings.share_mib:
            self.share.setValue(settings.share_mib / 1024)

    def share_mib(self) -> int:
        return round(self.share.value() * 1024)

    def show_status(self, status: dict[str, Any]) -> None:
        roles = roles_of(status)
        self.worker.setChecked(roles.worker)
        self.federated.setChecked(roles.federated)
        donated = (status.get("worker") or {}).get("share_bytes")
        served = ((status.get("federated") or {}).get("models") or [self.model.currentText()])
        self.state.setText(worker_words(roles.worker, donated >> 20 if donated else
                                        self.controller.settings.share_mib)
                           + " " + federated_words(roles.federated, served[0]))

    def _show_models(self, models: dict[str, Any]) -> None:
        names = [m["name"] for m in models.get("local") or []]
        chosen = self.controller.settings.federated_model
        for name in (chosen, *names):
            if name and self.model.findText(name) < 0:
                self.model.addItem(name)
        if chosen:
            self.model.setCurrentText(chosen)

    def _switch_worker(self, on: bool) -> None:
        self.message.setText("Switching worker mode on…" if on
                              else "Switching worker mode off…")
        self.controller.spawn(self.controller.set_role("worker", on, self.share_mib()),
                              "Switching worker mode failed")

    def _switch_federated(self, on: bool) -> None:
        self.message.setText("Switching federated mode on…" if on
                              else "Switching federated mode off…")
        self.controller.spawn(self.controller.set_role("federated", on, self.model.currentText()),
                              "Switching federated mode failed")

    def _new_share(self) -> None:
        settings = self.controller.settings
        if self.share_mib() != settings.share_mib:
            self.controller.save_settings(replace(settings, share_mib=self.share_mib()))


class SwarmPage(QWidget):
    def __init__(self, controller: Controller) -> None:
        super().__init__()
        self.controller = controller
        self.roles = RolesBox(controller)

        token = CopyRow("swarmToken", secret=True, copy_label="Copy token")
        self.token_field = token.field
        self.show_button = token.show_button
        token.revealed.connect(lambda _shown: self._refresh_token())
        self.create_button = button("Create new swarm", self._create)
        self.leave_button = button("Leave swarm", self._leave)
        self.headless = headless = QLabel()
        headless.setObjectName("headlessCommand")
        headless.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        invite = QGroupBox("Invite machines to this swarm")
        actions = QHBoxLayout()
        actions.addWidget(self.create_button)
        actions.addWidget(self.leave_button)
        actions.addStretch(1)
        box = QVBoxLayout(invite)
        box.addWidget(QLabel("Paste this token into Covey on your other machines:"))
        box.addWidget(token)
        box.addWidget(headless)
        box.addLayout(actions)

        self.paste = QLineEdit()
        self.paste.setObjectName("joinToken")
        self.paste.setPlaceholderText("Paste a swarm token (covey1…)")
        self.paste.textChanged.connect(self._validate)
        self.join_button = QPushButton("Join swarm")
        self.join_button.setEnabled(False)
        self.join_button.clicked.connect(self._join)
        self.join_error = QLabel()
        self.join_error.setObjectName("joinError")
        self.join_error.setWordWrap(True)
        self.join_error.setStyleSheet("color: #c0392b")
        join = QGroupBox("Join another swarm")
        jrow = QHBoxLayout()
        jrow.addWidget(self.paste, 1)
        jrow.addWidget(self.join_button)
        jbox = QVBoxLayout(join)
        jbox.addLayout(jrow)
        jbox.addWidget(self.join_error)
        self.join_error.setVisible(False)

        self.table = read_only_table("peers", PEER_COLUMNS)
        self.table.setSelectionMode(QTableWidget.SelectionMode.NoSelection)
        self.topology = Topology()
        self.summary = QLabel()
        self.empty = QLabel("No machines yet. Copy the token above into Covey on another "
                            "machine to add it to this swarm.")
        self.empty.setObjectName("peersEmpty")
        self.empty.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addWidget(self.roles)
        layout.addWidget(invite)
        layout.addWidget(join)
        layout.addWidget(self.summary)
        layout.addWidget(self.empty)
        layout.addWidget(self.table, 2)
        layout.addWidget(self.topology, 1)
        controller.peers.connect(self.show_peers)
        self.show_peers([])
        controller.status.connect(lambda _s: self._refresh_token())
        self._refresh_token()

    def _refresh_token(self) -> None:
        token = self.controller.token()
        if self.token_field.text() != token:
            self.token_field.setText(token)
        self.headless.setText(headless_command(token, self.show_button.isChecked()))

    def _validate(self, text: str) -> None:
        problem = check_token(text, self.controller.token())
        self.join_error.setText(problem or "")
        self.join_error.setVisible(bool(problem))
        self.join_button.setEnabled(problem is None)

    def _join(self) -> None:
        text = self.paste.text()
        if check_token(text, self.controller.token()) is not None:
            return
        self.join_button.setEnabled(False)
        self.join_error.setText("Joining…")
        self.join_error.setVisible(True)

        async def join() -> None:
            await self.controller.join(text)
            self.paste.clear()
            self.join_error.setText("")
            self._refresh_token()

        self.controller.spawn(join(), "Joining the swarm failed")

    def _create(self) -> None:
        self._new_swarm("Create a new swarm",
                        "This machine leaves its current swarm and starts a new one. Continue?")

    def _leave(self) -> None:
        # Leaving is a new swarm of one: the node always belongs to some swarm.
        self._new_swarm("Leave swarm", "This machine leaves the swarm and carries on alone, "
                                       "in a new swarm of its own.")

    def _new_swarm(self, title: str, question: str) -> None:
        if QMessageBox.question(self, title, question) == QMessageBox.StandardButton.Yes:
            self.controller.spawn(self.controller.create_swarm(), f"{title} failed")

    def show_peers(self, peers: list[dict[str, Any]]) -> None:
        now = time.time()
        names = {p["peer_id"]: p.get("name", "?") for p in peers}
        for p in peers:
            worker = p.get("worker") or {}
            if worker.get("leased_by"):
                worker["leased_by_name"] = names.get(worker["leased_by"])
        self.table.setRowCount(len(peers))
        self.table.setVisible(bool(peers))
        self.empty.setVisible(not peers)
        grey = self.palette().placeholderText()
        for r, peer in enumerate(peers):
            for c, text in enumerate(peer_row(peer, now)):
                item = QTableWidgetItem(text)
                if not peer.get("online"):
                    item.setForeground(grey)
                self.table.setItem(r, c, item)
        online = sum(1 for p in peers if p.get("online"))
        self.summary.setText(f"{online} machine{'s' if online != 1 else ''} online"
                             + (f", {len(peers) - online} offline" if len(peers) > online
                                else ""))
        self.topology.show_peers(peers)
