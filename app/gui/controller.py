"""The app's one link to its node: the supervisor, a poll of the node's state, and Qt signals.

Pages never talk HTTP themselves; they call the controller's coroutines (through `spawn`, so
the Qt thread never waits) and redraw on its signals. Polling every two seconds keeps the peer
list and the models live without a push channel from the node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from app.common.chat_request import CHAT_PATH, DEFAULTS, ChatSettings, chat_body
from app.gui import app_settings
from app.gui.conversations import ConversationStore
from app.gui.node_supervisor import NodeState, NodeSupervisor
from app.gui.roles import Role, Roles, change_message, missing, roles_of
from swarm.client.async_client import REQUEST_TIMEOUT_S, NodeLink
from swarm.client.core import NodeClientError
from swarm.node.settings import load_settings

log = logging.getLogger(__name__)

POLL_EVERY_S = 2.0
# Per role: the AppSettings field that keeps its choice, the field of the node's POST
# /api/<role> that takes it, and how long switching may take (a worker starts its RPC server).
ROLE_CHOICES: dict[Role, tuple[str, str, float]] = {
    "worker": ("share_mib", "share_mib", 60.0),
    "federated": ("federated_model", "model", REQUEST_TIMEOUT_S),
}


class Controller(QObject):
    node_state = Signal(object)  # NodeState
    status = Signal(dict)  # GET /api/status
    peers = Signal(list)  # GET /api/peers rows
    models = Signal(dict)  # GET /api/models, plus "runnable": GET /v1/models data
    error = Signal(str)  # something the user asked for failed; the text says why
    notify = Signal(str)  # "w2 joined the swarm", failovers: desktop notifications
    roles_message = Signal(str)  # a role (worker, federated) changed, or is being restored
    settings_changed = Signal(object)  # AppSettings, saved from any page

    def __init__(self, data_dir: Path, node_command: list[str] | None = None) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.settings = app_settings.load(data_dir)
        self.conversations = ConversationStore(data_dir)
        self.supervisor = NodeSupervisor(data_dir, self._on_node_state, node_command)
        self.chat_settings: ChatSettings = DEFAULTS
        self.last_status: dict[str, Any] = {}
        self.last_peers: list[dict[str, Any]] = []
        self.last_models: dict[str, Any] = {"local": [], "swarm": [], "copies": [],
                                            "runnable": []}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._online: dict[str, bool] | None = None
        self._roles_seen: Roles | None = None  # the roles the last status poll showed
        self._roles_asked: Roles | None = None  # what the user last asked for, until seen

    # -- running coroutines from Qt slots ------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str = "") -> asyncio.Task[Any]:
        """Run `coro` on the event loop; a NodeClientError becomes an `error` signal."""
        task = asyncio.get_event_loop().create_task(self._guard(coro, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: coro.close() if t.cancelled() else None)
        return task

    async def _guard(self, coro: Coroutine[Any, Any, Any], what: str) -> Any:
        try:
            return await coro
        except (NodeClientError, OSError, ValueError) as exc:
            self.error.emit(f"{what}: {exc}" if what else str(exc))
        except Exception as exc:  # a bug: say so in the window rather than lose it
            log.exception("%s failed", what or "a background task")
            self.error.emit(f"{what or 'Something'} failed unexpectedly: {exc!r}")
        return None

    # -- the node ------------------------------------------------------------------------------

    @property
    def link(self) -> NodeLink | None:
        return self.supervisor.link

    def _on_node_state(self, state: NodeState) -> None:
        self.node_state.emit(state)
        if state.phase == "running":  # a new node, or the app's first: it has no roles yet
            self.spawn(self.restore_roles(), "Switching the remembered roles back on failed")

    async def start(self) -> None:
        await self.supervisor.start()
        await self.refresh()
        if self._poller is None:
            self._poller = asyncio.get_event_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.supervisor.stop(keep_node=False)
        self.conversations.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_EVERY_S)
            try:
                await self.refresh()
            except NodeClientError as exc:
                log.debug("poll failed: %s", exc)

    async def refresh(self) -> None:
        link = self.link
        if link is None:
            return
        self.last_status = await link.get("/api/status")
        self._note_roles(roles_of(self.last_status))
        self.status.emit(self.last_status)
        peers = (await link.get("/api/peers"))["peers"]
        self._announce(peers)
        self.last_peers = peers
        self.peers.emit(peers)
        models = await link.get("/api/models")
        models["runnable"] = (await link.get("/v1/models"))["data"]
        self.last_models = models
        self.models.emit(models)

    def _note_roles(self, now: Roles) -> None:
        before, self._roles_seen = self._roles_seen, now
        if before is not None and before != now:
            self.roles_message.emit(change_message(before, now, self._roles_asked))
        if self._roles_asked == now:
            self._roles_asked = None

    @property
    def chosen_roles(self) -> Roles:
        return Roles(worker=self.settings.worker, federated=self.settings.federated)

    async def restore_roles(self) -> None:
        """Ask the node for the roles the user chose, after it (or the app) started."""
        link = self.link
        if link is None or not (self.settings.worker or self.settings.federated):
            return
        running = roles_of(await link.get("/api/status"))
        wanted = missing(self.chosen_roles, running)
        names = [role for role in ROLE_CHOICES if getattr(wanted, role)]
        if not names:
            return
        what = " and ".join(names) + " mode"
        self.roles_message.emit(f"Switching {what} back on, as you chose…")
        self._roles_asked = self.chosen_roles
        for role in names:
            await self._post_role(role, True, self._saved_choice(role))
        await self.refresh()
        self.roles_message.emit(f"{what[0].upper()}{what[1:]} on again, as you chose.")

    def _announce(self, peers: list[dict[str, Any]]) -> None:
        online = {p["peer_id"]: bool(p["online"]) for p in peers if not p.get("self")}
        names = {p["peer_id"]: p.get("name", "?") for p in peers}
        if self._online is not None:
            for peer, now in online.items():
                if now and not self._online.get(peer, False):
                    self.notify.emit(f"{names[peer]} joined the swarm")
                elif not now and self._online.get(peer, False):
                    self.notify.emit(f"{names[peer]} left the swarm")
        self._online = online

    def token(self) -> str:
        saved = load_settings(self.data_dir)
        return saved.token if saved else ""

    # -- what pages ask for --------------------------------------------------------------------

    def chat(self, model: str, history: list[dict[str, str]],
             settings: ChatSettings | None = None, route: str = "auto"
             ) -> AsyncGenerator[dict[str, Any], None]:
        """The node's streamed reply to `history` over `route`, sampled as `covey chat` samples
        unless a chat's own `settings` say otherwise."""
        link = self.link
        if link is None:
            raise ConnectionError("Covey's node is not running")
        return link.stream(CHAT_PATH, chat_body(settings or self.chat_settings, model, history,
                                                route))

    async def join(self, token_text: str) -> None:
        self._online = None  # the peers of the old swarm are not "leaving"
        await self.supervisor.join(token_text)
        await self.refresh()

    async def create_swarm(self) -> str:
        from swarm.trust.token import new_token

        token = new_token().encode()
        await self.join(token)
        return token

    async def set_role(self, role: Role, enabled: bool,
                       choice: int | str | None = None) -> None:
        """Worker or federated mode on or off, with `choice` (the MiB a worker donates, the
        model federated mode serves), else the saved one; remembered once the node agreed."""
        choice = choice or self._saved_choice(role)
        self._roles_asked = replace(self._roles_seen or self.chosen_roles, **{role: enabled})
        await self._post_role(role, enabled, choice)
        remembered: dict[str, Any] = {role: enabled, ROLE_CHOICES[role][0]: choice}
        self._remember(replace(self.settings, **remembered))
        await self.refresh()

    def _saved_choice(self, role: Role) -> int | str | None:
        value: int | str | None = getattr(self.settings, ROLE_CHOICES[role][0])
        return value

    async def _post_role(self, role: Role, enabled: bool, choice: int | str | None) -> None:
        assert self.link is not None
        _, key, timeout = ROLE_CHOICES[role]
        body: dict[str, Any] = {"enabled": enabled}
        if choice:
            body[key] = choice
        await self.link.post(f"/api/{role}", body, timeout=timeout)

    def _remember(self, settings: app_settings.AppSettings) -> None:
        self.settings = settings
        app_settings.save(self.data_dir, settings)
        self.settings_changed.emit(settings)

    def save_settings(self, settings: app_settings.AppSettings) -> bool:
        """Keep new settings; True when the node must restart to apply them."""
        before = self.settings
        restart = (app_settings.node_arguments(settings)
                   != app_settings.node_arguments(before))
        self._remember(settings)
        if (not restart and settings.worker and settings.share_mib != before.share_mib
                and self.link is not None):  # a new share for a running worker
            self.spawn(self.set_role("worker", True), "Changing the donated memory failed")
        return restart
