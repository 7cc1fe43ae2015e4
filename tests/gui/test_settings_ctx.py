"""The context length on the Settings page: a number restarts the node with `--ctx N`, which
its chats then run with; blank goes back to automatic, and the node forgets the number."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.gui import app_settings, autostart
from app.gui.desktop import CoveyApp
from app.gui.pages.settings import SettingsPage
from tests.gui.conftest import app_data_dir, until
from tests.gui.test_app import desktop

APPLIED = "Saved and applied."


def node_command(app: CoveyApp) -> list[str]:
    process = app.controller.supervisor._process
    assert process is not None
    return [str(a) for a in process.args]


async def save_and_wait(page: SettingsPage) -> None:
    page.save()
    assert page.message.text() != APPLIED  # the node is restarting
    await until(lambda: page.message.text() == APPLIED, 60, "the node to restart")


def test_a_context_length_restarts_the_node_with_it(run_async, tmp_path: Path,
                                                    tiny_model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autostart, "set_enabled", lambda enabled: None)  # not this machine's
    data_dir = app_data_dir(tmp_path, "app", tiny_model)

    async def body() -> None:
        async with desktop(data_dir) as app:
            page, controller = app.window.settings, app.controller
            assert page.ctx.text() == "" and page.ctx.placeholderText() == "automatic"
            assert controller.last_status["ctx"] == {"setting": None, "loaded": None}
            assert "--ctx" not in node_command(app)

            page.ctx.setText("512")
            await save_and_wait(page)
            command = node_command(app)
            assert command[command.index("--ctx") + 1] == "512"
            assert controller.last_status["ctx"]["setting"] == 512
            assert app_settings.load(data_dir).ctx == 512
            assert controller.link is not None
            reply = await controller.link.post("/v1/chat/completions", {
                "model": "tiny", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hello"}]}, timeout=60)
            assert reply["usage"]["completion_tokens"] > 0
            await controller.refresh()
            assert controller.last_status["ctx"]["loaded"] == 512
            assert page.ctx_now.text() == "now 512 tokens"

            page.ctx.setText("")  # back to automatic: the node must forget 512
            await save_and_wait(page)
            command = node_command(app)
            assert command[command.index("--ctx") + 1] == "0"
            assert controller.last_status["ctx"] == {"setting": None, "loaded": None}
            assert app_settings.load(data_dir).ctx == 0
            assert page.ctx_now.text() == ""

    run_async(body())
