"""The desktop app driven like a user would: create and join a swarm, chat, toggle worker mode
from the tray, bad tokens, a node that dies, a download that breaks, a slow API."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import pytest
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QMessageBox

from app.gui.desktop import CoveyApp
from swarm.client.async_client import NodeLink
from swarm.client.core import NodeClientError
from swarm.trust.token import new_token
from tests.gui.conftest import LOOPBACK, app_data_dir, until
from tests.support.fault_server import Faults, FaultServer

REPO = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def desktop(data_dir: Path) -> AsyncIterator[CoveyApp]:
    app = CoveyApp(data_dir)
    try:
        await app.start()
        yield app
    finally:
        await app.shutdown()


@contextlib.contextmanager
def second_node(data_dir: Path, token: str, name: str):  # -> Iterator[subprocess.Popen]
    log = (data_dir.parent / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "node", "--data-dir", str(data_dir), "--name", name,
         "--token", token, "--lan-only", "--listen", LOOPBACK[0]],
        cwd=REPO, stdout=log, stderr=log)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def peers_of(data_dir: Path) -> list[dict]:
    try:
        return (await NodeLink.find(data_dir).get("/api/peers"))["peers"]
    except NodeClientError:
        return []


def table_text(table) -> list[list[str]]:  # noqa: ANN001 (a QTableWidget)
    return [[table.item(r, c).text() if table.item(r, c) else ""
             for c in range(table.columnCount())] for r in range(table.rowCount())]


def test_create_join_and_worker_toggle_from_tray(run_async, tmp_path: Path,
                                                 tiny_model: Path) -> None:
    async def body() -> None:
        async with desktop(app_data_dir(tmp_path, "app", tiny_model)) as app:
            page = app.window.swarm
            first_token = page.token_field.text()
            assert first_token.startswith("covey1")  # a swarm of one from the start
            with mock.patch.object(QMessageBox, "question",
                                   return_value=QMessageBox.StandardButton.Yes):
                page.create_button.click()
                token = await until(lambda: page.token_field.text() != first_token
                                    and page.token_field.text(), 60, "a new swarm token")
            me = app.controller.last_status["name"]
            with second_node(tmp_path / "b", token, "second"):
                await until(lambda: any(row[0] == "second" and "online" in row[5]
                                        for row in table_text(page.table)),
                            60, "the second machine in the app's peer list")
                assert "2 machines online" in page.summary.text()

                app.tray.worker_action.trigger()  # the user ticks "Worker mode" in the tray
                await until(lambda: app.tray.worker_action.isChecked()
                            and app.controller.last_status["worker"]["enabled"], 60,
                            "worker mode on")

                async def second_sees_worker() -> bool:
                    rows = await peers_of(tmp_path / "b")
                    return any(p["name"] == me and p.get("worker") for p in rows)

                deadline = time.monotonic() + 40
                while not await second_sees_worker():
                    assert time.monotonic() < deadline, "the second node never saw the worker"
                    await asyncio.sleep(0.3)
                await until(lambda: any(row[0] == me and "worker" in row[4]
                                        for row in table_text(page.table)), 10,
                            "the app's own row to say worker")
                app.tray.worker_action.trigger()
                await until(lambda: not app.controller.last_status["worker"]["enabled"], 60,
                            "worker mode off")

            # Now join another swarm by pasting its token, as a user would.
            other = new_token().encode()
            with second_node(tmp_path / "c", other, "third"):
                page.paste.setText(other)
                assert page.join_button.isEnabled()
                page.join_button.click()
                await until(lambda: page.token_field.text() == other, 60, "the new token")
                await until(lambda: any(row[0] == "third" and "online" in row[5]
                                        for row in table_text(page.table)),
                            60, "the third machine in the new swarm")
                assert not any(row[0] == "second" for row in table_text(page.table))
                # The paste box empties once the join has finished (the page may show the new
                # swarm a moment before, from its periodic refresh).
                await until(lambda: page.paste.text() == "", 30, "the paste box emptied")

    run_async(body())


def test_bad_tokens_show_the_parsers_message(run_async, tmp_path: Path) -> None:
    async def body() -> None:
        async with desktop(app_data_dir(tmp_path, "app")) as app:
            page = app.window.swarm
            before = page.token_field.text()
            for pasted, expected in [
                ("hello there", "not a Covey swarm token"),
                ("covey9abcdef", "format version 9"),
                (new_token().encode()[:-6] + "aaaaaa", "damaged"),
                (before, "already in this swarm"),
            ]:
                page.paste.setText(pasted)
                assert expected in page.join_error.text(), (pasted, page.join_error.text())
                assert not page.join_button.isEnabled()
            page.paste.setText(new_token().encode())
            assert page.join_error.text() == "" and page.join_button.isEnabled()
            page.paste.setText("   ")
            assert not page.join_button.isEnabled()
            assert page.token_field.text() == before  # nothing changed

    run_async(body())


def test_chat_streams_and_survives_restart(run_async, tmp_path: Path,
                                           tiny_model: Path) -> None:
    data_dir = app_data_dir(tmp_path, "app", tiny_model)

    async def chat() -> str:
        async with desktop(data_dir) as app:
            chat = app.window.chat
            await until(lambda: chat.model_picker.findData("tiny") >= 0, 30, "the tiny model")
            chat.model_picker.setCurrentIndex(chat.model_picker.findData("tiny"))
            seen: list[str] = []
            timer = QTimer()
            timer.timeout.connect(lambda: seen.append(chat.transcript.toPlainText()))
            timer.start(5)
            chat.input.setPlainText("Tell me about the swarm")
            chat.send_button.click()
            assert chat.stop_button.isEnabled()
            await until(lambda: chat._reply is None, 60, "the reply to finish")
            timer.stop()
            messages = chat.store.messages(chat.conversation_id)
            reply = messages[-1]
            assert reply.role == "assistant" and reply.content
            assert reply.meta["route"] == "local" and reply.meta["machines"]
            # Streamed: the transcript showed parts of the reply before the whole of it.
            partial = [s for s in seen if "Covey" in s and reply.content[:40] not in s]
            assert partial, "no intermediate state of the reply was ever drawn"
            text = chat.transcript.toPlainText()
            assert "local route" in text and "tokens/s" in text and "Ran on this machine" in text
            assert chat.sidebar.item(0).text() == "Tell me about the swarm"
            return reply.content

    async def reopen(expected: str) -> None:
        async with desktop(data_dir) as app:
            chat = app.window.chat
            assert chat.sidebar.count() == 1
            assert chat.sidebar.item(0).text() == "Tell me about the swarm"
            assert expected.split()[0] in chat.transcript.toPlainText()
            assert chat.regenerate_button.isEnabled() and chat.copy_button.isEnabled()

    content = run_async(chat())
    run_async(reopen(content))


def test_chat_without_a_model_says_what_to_do(run_async, tmp_path: Path) -> None:
    async def body() -> None:
        app = CoveyApp(app_data_dir(tmp_path, "app"))  # the node is not started
        try:
            chat = app.window.chat
            chat.input.setPlainText("hello?")
            chat.send_button.click()
            assert "No model is available" in chat.notice.text()
            assert chat.store.list() == []  # nothing half-sent was saved
        finally:
            await app.shutdown()

    run_async(body())


def test_node_dying_is_shown_and_restarted(run_async, tmp_path: Path) -> None:
    async def body() -> None:
        async with desktop(app_data_dir(tmp_path, "app")) as app:
            states: list[str] = []
            app.controller.node_state.connect(lambda s: states.append(s.phase))
            first_pid = app.controller.supervisor._process.pid
            os.kill(first_pid, signal.SIGKILL)
            await until(lambda: "restarting" in states, 20, "the app to notice")
            assert "stopped" in app.window.node_label.text()
            await until(lambda: states[-1] == "running", 60, "the node to be back")
            assert app.controller.supervisor._process.pid != first_pid
            status = await app.controller.link.get("/api/status")
            assert status["name"]

    run_async(body())


def test_download_failing_midway_keeps_the_store_and_resumes(run_async, tmp_path: Path,
                                                             tiny_model: Path) -> None:
    data = tiny_model.read_bytes()

    async def body() -> None:
        with FaultServer() as server:
            faults = Faults(cut_after=len(data) // 3, cut_times=1)
            url = server.add("/m/broken.gguf", data, faults)
            async with desktop(app_data_dir(tmp_path, "app")) as app:
                page = app.window.models
                page.url.setText(url)
                page.download_button.click()
                await until(lambda: server.seen("/m/broken.gguf"), 10, "the first request")
                faults.fail_status, faults.fail_times = 500, 1000  # then the server breaks
                await until(lambda: not page._busy, 90, "the download to give up")
                assert "failed" in page.message.text(), page.message.text()
                assert "broken" not in [e.name for e in page.store.list()]
                assert page.download_button.isEnabled()

                faults.fail_times = 0  # the server is back: downloading again resumes
                page.url.setText(url)
                page.download_button.click()
                await until(lambda: not page._busy, 60, "the second download")
                assert "broken is ready" in page.message.text(), page.message.text()
                assert server.seen("/m/broken.gguf")[-1].range == f"bytes={len(data) // 3}-"
                names = [page.table.item(r, 0).text() for r in range(page.table.rowCount())]
                assert "broken" in names

    run_async(body())


def test_slow_api_keeps_the_window_responsive(run_async, tmp_path: Path) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3)
        writer.close()

    async def body() -> None:
        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        app = CoveyApp(app_data_dir(tmp_path, "app"))
        try:
            app.controller.supervisor.link = NodeLink(tmp_path, port, "secret")
            gaps: list[float] = []
            last = time.monotonic()

            def tick() -> None:
                nonlocal last
                now = time.monotonic()
                gaps.append(now - last)
                last = now

            timer = QTimer()
            timer.timeout.connect(tick)
            timer.start(10)
            task = app.controller.spawn(app.controller.refresh(), "Refreshing")
            errors: list[str] = []
            app.controller.error.connect(errors.append)
            await asyncio.wait_for(task, 20)
            timer.stop()
            assert len(gaps) > 100  # the loop kept ticking for the whole 3 s
            assert max(gaps) < 0.25, max(gaps)
            assert errors and "closed the connection" in errors[0]
        finally:
            server.close()
            await app.shutdown()

    run_async(body())


@pytest.mark.parametrize("env", [{"DISPLAY": "", "WAYLAND_DISPLAY": "", "QT_QPA_PLATFORM": ""}])
def test_no_display_points_to_the_terminal(env: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "app.cli", "--data-dir", str(tmp_path)],
                            cwd=REPO, env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "no display" in result.stderr and "covey chat" in result.stderr
