"""The desktop app stopped by a signal (logout, `kill`, Ctrl+C) quits cleanly: it stops the
node it started instead of leaving it running with nobody to stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm.client.core import NodeNotRunning, pid_alive, read_api_info
from tests.gui.conftest import app_data_dir

REPO = Path(__file__).resolve().parents[2]


def _wait(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _node_pid(data_dir: Path) -> int | None:
    try:
        return read_api_info(data_dir)[1]
    except NodeNotRunning:
        return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_quits_the_app_and_stops_its_node(sig: signal.Signals, tmp_path: Path,
                                                   tiny_model: Path) -> None:
    data_dir = app_data_dir(tmp_path, "app", tiny_model)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "COVEY_DATA_DIR": str(data_dir)}
    app = subprocess.Popen([sys.executable, "-m", "app.cli"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    node_pid = None
    try:
        node_pid = _wait(lambda: _node_pid(data_dir), 60, "the app's node to start")
        assert app.poll() is None
        app.send_signal(sig)
        out, _ = app.communicate(timeout=30)
        assert app.returncode == 0, out
        _wait(lambda: not pid_alive(node_pid), 15, "the node to stop")
        assert _node_pid(data_dir) is None  # the node removed its api.json on the way out
    finally:
        if app.poll() is None:
            os.killpg(app.pid, signal.SIGKILL)
            app.wait()
        if node_pid is not None and pid_alive(node_pid):
            os.kill(node_pid, signal.SIGKILL)
