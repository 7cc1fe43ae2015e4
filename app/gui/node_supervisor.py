"""The node behind the desktop app: attach to this user's running node, or start one and keep it.

The app is a client of the node's local API (DESIGN.md). If a node already runs for the data
directory (say, `covey node` in a terminal), the app attaches to it; otherwise it starts
`covey node` as a child process. A node that dies while the app runs is started again (after
a short pause, a few times) and the app says so. Joining another swarm saves the new token and
restarts the node; the token never goes on a command line, where other users could read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from app.gui import app_settings
from swarm.client.async_client import NodeLink
from swarm.client.core import NodeClientError, NodeNotRunning, read_api_info
from swarm.node.settings import Settings, load_settings, save_settings
from swarm.trust.token import parse_token

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
WATCH_EVERY_S = 1.0
RESTART_PAUSES_S = (1.0, 3.0, 10.0)  # then the app stops trying and shows the error
STDERR_FILE = "node-app.log"


@dataclass(frozen=True)
class NodeState:
    """What the window shows about the node: `phase` is starting, running, restarting or
    failed; `message` says why in words for the user."""

    phase: str
    message: str = ""
    owned: bool = False  # the app started this node (and stops it on quit)


class NodeStartFailed(Exception):
    """The node did not start; the message is the node's own explanation where it gave one."""


def ensure_token(data_dir: Path) -> Settings:
    """The saved swarm, or a new swarm of one: a first start needs no token from anyone."""
    saved = load_settings(data_dir)
    if saved is not None:
        return saved
    from swarm.trust.token import new_token

    settings = Settings(token=new_token().encode())
    save_settings(data_dir, settings)
    return settings


def save_token(data_dir: Path, token_text: str) -> None:
    """Remember the swarm to join (keeping this machine's name); TokenError if it is bad."""
    token = parse_token(token_text)
    saved = load_settings(data_dir)
    # Keep this machine's name and every other choice; only the swarm changes.
    save_settings(data_dir, replace(saved, token=token.encode()) if saved
                  else Settings(token=token.encode()))


class NodeSupervisor:
    def __init__(self, data_dir: Path, on_state: Callable[[NodeState], None] = lambda s: None,
                 node_command: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.link: NodeLink | None = None
        self.state = NodeState("starting")
        self._on_state = on_state
        self._command = node_command or [sys.executable, "-m", "app.cli"]
        self._process: subprocess.Popen[bytes] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._log_start = 0
        # One start or restart at a time: the watcher must not "rescue" a node that a
        # restart (joining a swarm, new settings) stopped on purpose.
        self._changing = asyncio.Lock()

    @property
    def owned(self) -> bool:
        return self._process is not None

    def _set(self, phase: str, message: str = "") -> None:
        self.state = NodeState(phase, message, self.owned)
        self._on_state(self.state)

    async def start(self) -> NodeLink:
        """Attach to a running node or start one; then watch it until `stop`."""
        link = await self._attach_or_start()
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._keep_alive())
        return link

    async def _attach_or_start(self) -> NodeLink:
        self._set("starting", "Starting this machine's node…")
        try:
            self.link = NodeLink.find(self.data_dir)
            await self.link.get("/api/status", timeout=5)
        except NodeClientError:
            self.link = await self._spawn()
        self._set("running")
        return self.link

    async def _spawn(self) -> NodeLink:
        ensure_token(self.data_dir)
        settings = app_settings.load(self.data_dir)
        command = [*self._command, "node", "--data-dir", str(self.data_dir),
                   *app_settings.node_arguments(settings)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir / STDERR_FILE
        self._log_start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as stderr:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True)  # Ctrl-C in the app's terminal is the app's to handle
        started = time.monotonic()
        while time.monotonic() - started < START_TIMEOUT_S:
            if self._process.poll() is not None:
                message = _last_error(log_path, self._log_start)
                self._process = None
                raise NodeStartFailed(message or "the node exited at once")
            try:
                _, pid = read_api_info(self.data_dir)
                if pid == self._process.pid:
                    link = NodeLink.find(self.data_dir)
                    await link.get("/api/status", timeout=5)
                    return link
            except NodeClientError:
                pass
            await asyncio.sleep(0.2)
        await self._terminate()
        raise NodeStartFailed(f"the node did not start within {START_TIMEOUT_S:g} s")

    async def _keep_alive(self) -> None:
        """Notice a node that died and start it again, a few times."""
        failures = 0
        while not self._stopping:
            await asyncio.sleep(WATCH_EVERY_S)
            if self._stopping or self._changing.locked():
                continue
            if await self._alive():
                failures = 0
                continue
            async with self._changing:
                if self._stopping or await self._alive():
                    continue
                failures = await self._revive(failures)
                if failures < 0:
                    return

    async def _revive(self, failures: int) -> int:
        """Start a node that died; the new failure count, or -1 when the app gives up."""
        if failures >= len(RESTART_PAUSES_S):
            self._set("failed", "Covey's node keeps stopping; see "
                      f"{self.data_dir / STDERR_FILE}")
            return -1
        why = (_last_error(self.data_dir / STDERR_FILE, self._log_start)
               if self._process else "")
        self._process = None
        self._set("restarting", "Covey's node stopped" + (f" ({why})" if why else "")
                  + "; starting it again…")
        await asyncio.sleep(RESTART_PAUSES_S[failures])
        with contextlib.suppress(NodeStartFailed, NodeClientError, OSError):
            await self._attach_or_start()
        return failures + 1

    async def _alive(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            return False
        if self.link is None:
            return False
        try:
            await self.link.get("/api/status", timeout=10)
            return True
        except NodeNotRunning:
            return False
        except NodeClientError:  # a busy node that answers slowly is still alive
            return self._process is not None

    async def restart(self) -> NodeLink:
        """Stop the node (ours or not) and start our own: after a new token or settings."""
        async with self._changing:
            await self._stop_node()
            return await self._attach_or_start()

    async def join(self, token_text: str) -> NodeLink:
        save_token(self.data_dir, token_text)
        return await self.restart()

    async def stop(self, *, keep_node: bool = False) -> None:
        """The app quits: stop watching, and stop the node if the app started it."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if not keep_node:
            await self._terminate()

    async def _stop_node(self) -> None:
        if self._process is not None:
            await self._terminate()
            return
        try:
            _, pid = read_api_info(self.data_dir)
        except NodeNotRunning:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                read_api_info(self.data_dir)
            except NodeNotRunning:
                return
            await asyncio.sleep(0.1)

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # the node says goodbye to its peers and removes api.json
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait()


def _last_error(log_path: Path, start: int = 0) -> str:
    """The node's last `covey: ...` line since `start`, which is written for users."""
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()[-50:]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("covey: "):
            return line[len("covey: "):]
    return ""
