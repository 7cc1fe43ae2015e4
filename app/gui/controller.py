"""The app's one link to its node: the supervisor, a poll of the node's state, and Qt signals.

Pages never talk HTTP themselves; they call the controller's coroutines (through `spawn`, so
the Qt thread never waits) and redraw on its signals. Polling every two seconds keeps the peer
list and the models live without a push channel from the node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Coroutine
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from app.common.chat_request import CHAT_PATH, DEFAULTS, ChatSettings, chat_body
from app.gui import app_settings
from app.gui.conversations import ConversationStore
from app.gui.node_supervisor import NodeState, NodeSupervisor
from swarm.client.async_client import NodeLink
from swarm.client.core import NodeClientError
from swarm.node.settings import load_settings

log = logging.getLogger(__name__)

POLL_EVERY_S = 2.0


class Controller(QObject):
    node_state = Signal(object)  # NodeState
    status = Signal(dict)  # GET /api/status
    peers = Signal(list)  # GET /api/peers rows
    models = Signal(dict)  # GET /api/models, plus "runnable": GET /v1/models data
    error = Signal(str)  # something the user asked for failed; the text says why
    notify = Signal(str)  # "w2 joined the swarm", failovers: desktop notifications

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
        self.status.emit(self.last_status)
        peers = (await link.get("/api/peers"))["peers"]
        self._announce(peers)
        self.last_peers = peers
        self.peers.emit(peers)
        models = await link.get("/api/models")
        models["runnable"] = (await link.get("/v1/models"))["data"]
        self.last_models = models
        self.models.emit(models)

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

    def chat(self, model: str, history: list[dict[str, str]]
             ) -> AsyncGenerator[dict[str, Any], None]:
        """The node's streamed reply to `history`, sampled as `covey chat` samples."""
        link = self.link
        if link is None:
            raise ConnectionError("Covey's node is not running")
        return link.stream(CHAT_PATH, chat_body(self.chat_settings, model, history))

    async def join(self, token_text: str) -> None:
        self._online = None  # the peers of the old swarm are not "leaving"
        await self.supervisor.join(token_text)
        await self.refresh()

    async def create_swarm(self) -> str:
        from swarm.trust.token import new_token

        token = new_token().encode()
        await self.join(token)
        return token

    async def set_worker(self, enabled: bool) -> None:
        assert self.link is not None
        body: dict[str, Any] = {"enabled": enabled}
        if enabled and self.settings.share_mib:
            body["share_mib"] = self.settings.share_mib
        await self.link.post("/api/worker", body, timeout=60)
        await self.refresh()

    async def set_federated(self, enabled: bool, model: str | None = None) -> None:
        assert self.link is not None
        body: dict[str, Any] = {"enabled": enabled}
        if model:
            body["model"] = model
        await self.link.post("/api/federated", body)
        await self.refresh()

    def save_settings(self, settings: app_settings.AppSettings) -> bool:
        """Keep new settings; True when the node must restart to apply them."""
        restart = (app_settings.node_arguments(settings)
                   != app_settings.node_arguments(self.settings))
        self.settings = settings
        app_settings.save(self.data_dir, settings)
        return restart
