"""The models page as a user meets it: what each model is, an empty list that says what to do,
one-click suggested models with a labelled progress bar, failures named in plain words, rename
and duplicates. Downloads come from a loopback server; the node is not started."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PySide6.QtWidgets import QPushButton

from app.gui import app_settings
from app.gui.desktop import CoveyApp
from app.gui.pages.models import ModelsPage
from app.gui.pages.models_words import failure_words, progress_words, rate
from backends.store.download import sha256_file
from backends.store.model_store import DiskFull
from backends.store.suggested import SUGGESTED, SuggestedModel
from swarm.node.api_handlers import local_models
from tests.gui.conftest import until
from tests.support.fault_server import Faults, FaultServer


def cells(page: ModelsPage, row: int) -> list[str]:
    return [page.table.item(row, c).text() for c in range(page.table.columnCount())]


def redraw(page: ModelsPage) -> None:
    """What the node's GET /api/models would send now (the node is not running here)."""
    page._draw({"local": local_models(page.store), "swarm": [], "copies": []})


def suggestion(url: str, name: str = "tiny-chat", sha256: str | None = None) -> SuggestedModel:
    return SuggestedModel(name, "A tiny test model.", url, 771_104, "MIT", sha256)


def get_button(page: ModelsPage, name: str) -> QPushButton:
    (row,) = [r for r in range(page.suggested.rowCount())
              if page.suggested.item(r, 0).text() == name]
    found = page.suggested.cellWidget(row, page.suggested.columnCount() - 1)
    assert isinstance(found, QPushButton)
    return found


def test_rows_say_what_each_model_is_and_the_empty_list_what_to_do(
        run_async, tmp_path: Path, tiny_model: Path) -> None:  # noqa: ANN001
    async def body() -> None:
        app = CoveyApp(tmp_path)
        try:
            page = app.window.models
            assert page.table.isHidden() and not page.empty.isHidden()
            assert "suggested models" in page.empty.text() and "import" in page.empty.text()
            assert page.suggested.rowCount() == len(SUGGESTED) >= 3
            page.store.import_file(tiny_model)
            redraw(page)
            assert not page.table.isHidden() and page.empty.isHidden()
            header = [page.table.horizontalHeaderItem(c).text()
                      for c in range(page.table.columnCount())]
            row = dict(zip(header, cells(page, 0), strict=True))
            assert (row["Model"], row["Parameters"], row["Quantization"], row["Context"]) == (
                "tiny", "190K", "F32", "256 tokens")
            assert row["Size"] == "753.0 KiB"
        finally:
            await app.shutdown()

    run_async(body())


def test_one_click_download_with_a_labelled_progress_bar(
        run_async, tmp_path: Path, tiny_model: Path) -> None:  # noqa: ANN001
    data = tiny_model.read_bytes()

    async def body() -> None:
        with FaultServer() as server:
            url = server.add("/tiny-chat.gguf", data, Faults(chunk_delay_s=0.05))
            app = CoveyApp(tmp_path)
            try:
                page = app.window.models
                page.set_suggestions([suggestion(url, sha256=sha256_file(tiny_model))])
                assert page.suggested.item(0, 2).text() == "about 753.0 KiB"
                labels: list[tuple[int, str]] = []
                get_button(page, "tiny-chat").click()
                assert page._busy and not get_button(page, "tiny-chat").isEnabled()
                while page._busy:
                    assert not page.progress.isHidden()
                    labels.append((page.progress.maximum(), page.progress.text()))
                    await asyncio.sleep(0.02)
                assert "tiny-chat is ready" in page.message.text(), page.message.text()
                assert all(maximum > 0 for maximum, _ in labels)  # never a busy bar
                assert all(text for _, text in labels), labels  # never without words
                assert any(" of 753.0 KiB, " in text and text.endswith("/s")
                           for _, text in labels), labels
                redraw(page)
                assert get_button(page, "tiny-chat").text() == "On this machine"
                assert not get_button(page, "tiny-chat").isEnabled()
            finally:
                await app.shutdown()

    run_async(body())


@pytest.mark.parametrize("case", ["404", "not a gguf", "sha mismatch", "bad url",
                                  "unknown host", "duplicate"])
def test_download_failures_in_plain_words(run_async, tmp_path: Path, tiny_model: Path,  # noqa: ANN001
                                          case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = {"404": "Download failed — Not found on the server.",
                "not a gguf": "Download failed — Not a GGUF model.",
                "sha mismatch": "Download failed — Checksum mismatch",
                "bad url": "Download failed — Bad URL.",
                "unknown host": "Download failed — Bad URL. Cannot find the server",
                "duplicate": "Already there: The file at "}[case]

    async def body() -> None:
        with FaultServer() as server:
            good = server.add("/tiny-chat.gguf", tiny_model.read_bytes())
            url = {"404": server.base_url + "/missing.gguf",
                   "not a gguf": server.add("/page.gguf", b"<html>Sign in</html>" * 100),
                   "bad url": "htps://models.example/x.gguf",
                   "unknown host": "https://models.example/x.gguf"}.get(case, good)
            if case == "unknown host":
                def no_such_host(*args: object, **kwargs: object) -> None:
                    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
                monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
            app = CoveyApp(tmp_path)
            try:
                page = app.window.models
                if case == "duplicate":
                    page.store.import_file(tiny_model, "mine")
                page.set_suggestions([suggestion(url, sha256="0" * 64 if case == "sha mismatch"
                                                 else None)])
                started = time.monotonic()
                get_button(page, "tiny-chat").click()
                await until(lambda: not page._busy, 20, "the download to end")
                assert time.monotonic() - started < 5  # none of these is worth retrying
                assert page.message.text().startswith(expected), page.message.text()
                if case == "duplicate":
                    assert "as 'mine'" in page.message.text()
                assert [e.name for e in page.store.list()] == (
                    ["mine"] if case == "duplicate" else [])
                assert page.progress.isHidden() and page.download_button.isEnabled()
            finally:
                await app.shutdown()

    run_async(body())


def test_rename_and_duplicate_import_from_the_page(run_async, tmp_path: Path,  # noqa: ANN001
                                                   tiny_model: Path) -> None:
    async def body() -> None:
        app = CoveyApp(tmp_path)
        try:
            page = app.window.models
            await page.import_file(tiny_model)
            assert "tiny is ready" in page.message.text()
            same = tmp_path / "Another Name.gguf"
            shutil.copyfile(tiny_model, same)
            await page.import_file(same)
            assert page.message.text().startswith(
                "Already there: The file Another Name.gguf is already in the store as 'tiny'")
            assert [e.name for e in page.store.list()] == ["tiny"]
            app.controller.save_settings(replace(app.controller.settings,
                                                 federated_model="tiny"))

            await page.rename("tiny", "my-model")
            assert page.message.text() == "tiny is now called my-model."
            # Federated mode serves the model under its new name, after a restart too.
            assert app.controller.settings.federated_model == "my-model"
            assert app_settings.load(tmp_path).federated_model == "my-model"
            redraw(page)
            assert cells(page, 0)[0] == "my-model"
            page.table.selectRow(0)
            assert page.rename_button.isEnabled()

            page.store.import_file(same, "other")
            await page.rename("my-model", "other")
            assert page.message.text() == ("Cannot rename my-model: There is already a model "
                                           "named 'other'; pick another name.")
            await page.rename("my-model", "Not OK!")
            assert "not a valid model name" in page.message.text()
            assert [e.name for e in page.store.list()] == ["my-model", "other"]
            assert app_settings.load(tmp_path).federated_model == "my-model"
        finally:
            await app.shutdown()

    run_async(body())


def test_words_for_progress_and_failures() -> None:
    assert progress_words(123 << 20, 491 << 20, 12 << 20) == "123.0 MiB of 491.0 MiB, 12.0 MiB/s"
    assert progress_words(5 << 20, None, 0) == "5.0 MiB so far"
    assert rate([(0.0, 0), (1.0, 10 << 20), (2.0, 30 << 20)]) == 15 << 20
    assert rate([(0.0, 0), (10.0, 100), (11.0, 200)], window_s=3) == 100  # recent only
    assert rate([(1.0, 5)]) == 0
    assert failure_words("Download", DiskFull("The disk is full.")) == (
        "Download failed — Disk full. The disk is full.")
