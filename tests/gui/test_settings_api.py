"""With the OpenAI API on, the Settings page shows its base URL and key, each with Copy."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QLineEdit

from app.gui import app_settings
from app.gui.desktop import CoveyApp
from swarm.api.files import SECRET_FILE
from swarm.client.async_client import NodeLink
from tests.gui.conftest import app_data_dir, until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_settings_shows_the_api_url_and_key_with_copy(run_async, tmp_path: Path) -> None:
    data_dir = app_data_dir(tmp_path, "app")
    port = free_port()
    app_settings.save(data_dir, replace(app_settings.load(data_dir), api_enabled=True,
                                        api_port=port))

    async def body() -> None:
        app = CoveyApp(data_dir)
        try:
            page = app.window.settings
            await app.start()
            await until(lambda: page.api_key.text(), 30, "the API key")
            assert not page.api_group.isHidden()
            assert page.api_url.text() == f"http://127.0.0.1:{port}/v1"
            key = (data_dir / SECRET_FILE).read_text().strip()
            assert page.api_key.text() == key
            assert page.api_key.echoMode() == QLineEdit.EchoMode.Password
            page.show_key.click()
            assert page.show_key.text() == "Hide"
            assert page.api_key.echoMode() == QLineEdit.EchoMode.Normal
            page.copy_key.click()
            assert QGuiApplication.clipboard().text() == key
            page.copy_url.click()
            assert QGuiApplication.clipboard().text() == page.api_url.text()
            # The URL and key shown are the ones that work.
            models = await NodeLink(data_dir, port, key).get("/v1/models")
            assert models["data"]
            page.api_enabled.setChecked(False)
            app.controller.save_settings(page.chosen())
            assert page.api_group.isHidden()
        finally:
            await app.shutdown()

    run_async(body())
