"""The models page: this machine's models and the swarm's, with what each is (parameters,
quantization, context, size) and where it runs; import a GGUF, download a suggested model or any
URL (labelled progress, cancel, resume), rename, copy from a peer, delete.

The list comes from the node (`GET /api/models`), which reads the store in its own process:
reading GGUF headers here would hold the GIL and stall the window. Imports and downloads run in
a thread (their hashing and I/O release the GIL); copies from peers run in the node, and this
page shows their progress. What the page says is worked out in models_words.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.gui import app_settings
from app.gui.controller import Controller
from app.gui.pages.models_words import (
    EMPTY_WORDS,
    failure_words,
    model_rows,
    progress_words,
    rate,
    suggestion_rows,
)
from app.gui.widgets import button, read_only_table
from backends.sizes import human_bytes
from backends.store.model_facts import facts_words
from backends.store.model_store import ModelEntry, ModelStore, ModelStoreError
from backends.store.suggested import SUGGESTED, SuggestedModel

__all__ = ["ModelsPage", "model_rows"]

COLUMNS = ("Model", "Parameters", "Quantization", "Context", "Size", "On this machine",
           "Offered by", "Runs")
SUGGESTED_COLUMNS = ("Suggested model", "What it is", "Download size", "License", "")
PROGRESS_EVERY_S = 0.1
Job = Callable[[Callable[[int, int | None], None], threading.Event | None], ModelEntry]


class ModelsPage(QWidget):
    def __init__(self, controller: Controller) -> None:
        super().__init__()
        self.controller = controller
        self.store = ModelStore(controller.data_dir / "models")
        self._cancel: threading.Event | None = None
        self._busy = False
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._suggested: tuple[SuggestedModel, ...] = ()
        self._have: set[str] = set()
        self._get_buttons: list[tuple[QPushButton, bool]] = []  # (button, model is here)

        self.table = read_only_table("models", COLUMNS)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.empty = QLabel(EMPTY_WORDS)
        self.empty.setObjectName("modelsEmpty")
        self.empty.setWordWrap(True)
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)

        self.import_button = button("Import GGUF file…", self._import)
        self.rename_button = button("Rename…", self._rename)
        self.copy_button = button("Copy from peer", self._copy)
        self.delete_button = button("Delete", self._delete)
        self.suggested = read_only_table("suggestedModels", SUGGESTED_COLUMNS)
        self.suggested.setSelectionMode(QTableWidget.SelectionMode.NoSelection)
        self.url = QLineEdit()
        self.url.setObjectName("downloadUrl")
        self.url.setPlaceholderText("https://…/model.gguf")
        self.download_button = button("Download", self.download)
        self.cancel_button = button("Cancel", self.cancel)
        self.progress = QProgressBar()
        self.progress.setObjectName("modelsProgress")
        self.progress.setTextVisible(True)
        self.progress.setVisible(False)
        self.message = QLabel()
        self.message.setObjectName("modelsMessage")
        self.message.setWordWrap(True)

        actions = QHBoxLayout()
        for action in (self.import_button, self.rename_button, self.copy_button,
                       self.delete_button):
            actions.addWidget(action)
        actions.addStretch(1)
        download = QHBoxLayout()
        download.addWidget(QLabel("Download by URL:"))
        download.addWidget(self.url, 1)
        download.addWidget(self.download_button)
        download.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.empty, 1)
        layout.addLayout(actions)
        layout.addWidget(self.suggested)
        layout.addLayout(download)
        layout.addWidget(self.progress)
        layout.addWidget(self.message)
        controller.models.connect(self._models_changed)
        self.set_suggestions(SUGGESTED)
        self._show_empty()
        self._update_buttons()

    # -- the list --------------------------------------------------------------------------

    def _models_changed(self, models: dict[str, Any]) -> None:
        self._draw(models)

    def _draw(self, models: dict[str, Any]) -> None:
        rows = model_rows(models.get("local", []), models)
        selected = self.selected()
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            facts = facts_words(row["facts"])
            size = human_bytes(row["size"]) if row["size"] else facts["size"]
            cells = [row["name"], facts["parameters"], facts["quantization"], facts["context"],
                     size, "yes" if row["local"] else "no", ", ".join(row["peers"]) or "—",
                     row["runs"]]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setData(Qt.ItemDataRole.UserRole, row)
                self.table.setItem(r, c, item)
            if selected and row["name"] == selected["name"]:
                self.table.selectRow(r)
        have = {row["name"] for row in rows if row["local"]}
        if have != self._have:
            self._have = have
            self._draw_suggestions()
        self._show_empty()
        self._show_copies(models.get("copies", []))
        self._update_buttons()

    def _show_empty(self) -> None:
        empty = self.table.rowCount() == 0
        self.empty.setVisible(empty)
        self.table.setVisible(not empty)

    def set_suggestions(self, suggested: Iterable[SuggestedModel]) -> None:
        """The models offered for one-click download (SUGGESTED; tests give their own)."""
        self._suggested = tuple(suggested)
        self._draw_suggestions()

    def _draw_suggestions(self) -> None:
        rows = suggestion_rows(self._suggested, self._have)
        self._get_buttons = []
        self.suggested.setRowCount(len(rows))
        for r, (model, cells, have) in enumerate(rows):
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(model.url if c == 0 else text)
                self.suggested.setItem(r, c, item)
            get = button("On this machine" if have else "Download",
                         self._getter(model))
            self._get_buttons.append((get, have))
            self.suggested.setCellWidget(r, len(cells), get)
        self._fit_height(self.suggested)
        self._update_buttons()

    @staticmethod
    def _fit_height(table: QTableWidget) -> None:
        """As tall as its rows: a short list needs no scroll bar and leaves no blank space."""
        table.resizeRowsToContents()
        rows = sum(table.rowHeight(r) for r in range(table.rowCount()))
        table.setFixedHeight(table.horizontalHeader().sizeHint().height() + rows
                             + 2 * table.frameWidth())

    def _getter(self, model: SuggestedModel) -> Callable[[], None]:
        return lambda: self.download_suggested(model)

    def _show_copies(self, copies: list[dict[str, Any]]) -> None:
        if self._busy:  # an import or download owns the progress bar
            return
        running = [c for c in copies if c.get("state") in ("waiting", "running", "verifying")]
        if running:
            job = running[0]
            done, size = int(job.get("done") or 0), int(job.get("size") or 0)
            self._draw_bar(done, size, progress_words(done, size, job.get("bytes_per_s") or 0))
            self.message.setText((job.get("notice") or "") if job.get("state") == "waiting" else
                                 f"Copying {job.get('model')} from {job.get('source') or '…'}")
        elif self.progress.isVisible():
            self.progress.setVisible(False)

    def _draw_bar(self, done: int, total: int | None, label: str) -> None:
        """A bar with words on it, never an unlabelled busy bar (also while size is unknown)."""
        self.progress.setVisible(True)
        self.progress.setRange(0, max((total or 0) >> 10, 1))  # KiB: 2 TiB fit in an int
        self.progress.setValue(done >> 10 if total else 0)
        self.progress.setFormat(label.replace("%", "%%"))

    def selected(self) -> dict[str, Any] | None:
        items = self.table.selectedItems()
        return items[0].data(Qt.ItemDataRole.UserRole) if items else None

    def _update_buttons(self) -> None:
        row = self.selected()
        local = bool(row and row["local"]) and not self._busy
        self.copy_button.setEnabled(bool(row and not row["local"] and row["peers"]))
        self.delete_button.setEnabled(local)
        self.rename_button.setEnabled(local)
        self.import_button.setEnabled(not self._busy)
        self.download_button.setEnabled(not self._busy)
        self.cancel_button.setEnabled(self._busy and self._cancel is not None)
        for get, have in self._get_buttons:
            get.setEnabled(not have and not self._busy)

    # -- actions ---------------------------------------------------------------------------

    def _import(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import a GGUF model", str(Path.home()),
                                              "GGUF models (*.gguf)")
        if path:
            self._begin()
            self.controller.spawn(self.import_file(Path(path)))

    async def import_file(self, path: Path) -> None:
        await self._store_job("Import", f"Importing {path.name}",
                              lambda progress, _cancel: self.store.import_file(
                                  path, progress=progress, unique=True), cancellable=False)

    def download(self) -> None:
        url = self.url.text().strip()
        if url:
            self._begin()
            self.controller.spawn(self.download_url(url))

    async def download_url(self, url: str) -> None:
        await self._store_job("Download", "Downloading", lambda progress, cancel:
                              self.store.download(url, progress=progress, cancel=cancel,
                                                  unique=True),
                              cancellable=True)

    def download_suggested(self, model: SuggestedModel) -> None:
        self._begin()
        self.controller.spawn(self._download_suggested(model))

    async def _download_suggested(self, model: SuggestedModel) -> None:
        await self._store_job("Download", f"Downloading {model.name}", lambda progress, cancel:
                              self.store.download(model.url, name=model.name,
                                                  sha256=model.sha256, progress=progress,
                                                  cancel=cancel, unique=True),
                              cancellable=True)

    def _begin(self) -> None:
        """Busy from the click on, before the job's task first runs."""
        self._busy = True
        self._draw_bar(0, None, "Starting…")
        self._update_buttons()

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    async def _store_job(self, verb: str, what: str, job: Job, cancellable: bool) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0

        def progress(done: int, total: int | None) -> None:  # runs in the worker thread
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S or done == total:
                last = now
                loop.call_soon_threadsafe(self._show_progress, what, now, done, total)

        self._busy = True
        self._cancel = threading.Event() if cancellable else None
        self._samples.clear()
        self._draw_bar(0, None, f"{what}: starting…")
        self.message.setText(f"{what}…")
        self._update_buttons()
        try:
            entry = await asyncio.to_thread(job, progress, self._cancel)
            self.message.setText(f"{entry.name} is ready ({human_bytes(entry.manifest.size)}).")
            self.url.clear()
        except ModelStoreError as exc:
            self.message.setText(failure_words(verb, exc))
        finally:
            self._busy = False
            self._cancel = None
            self.progress.setVisible(False)
            self._update_buttons()
        await self.controller.refresh()

    def _show_progress(self, what: str, when: float, done: int, total: int | None) -> None:
        self._samples.append((when, done))
        label = progress_words(done, total, rate(self._samples))
        self._draw_bar(done, total, label)
        self.message.setText(f"{what}: {label}")

    def _rename(self) -> None:
        row = self.selected()
        if not row or not row["local"]:
            return
        new, ok = QInputDialog.getText(self, "Rename model", f"New name for {row['name']}:",
                                       text=row["name"])
        if ok and new.strip():
            self.controller.spawn(self.rename(row["name"], new.strip()))

    async def rename(self, old: str, new: str) -> None:
        try:
            entry = await asyncio.to_thread(self.store.rename, old, new)
            self.message.setText(f"{old} is now called {entry.name}.")
            settings = self.controller.settings
            if (renamed := app_settings.renamed_model(settings, old, entry.name)) != settings:
                self.controller.save_settings(renamed)
        except ModelStoreError as exc:
            self.message.setText(f"Cannot rename {old}: {exc}")
        await self.controller.refresh()

    def _copy(self) -> None:
        row = self.selected()
        if row and self.controller.link is not None:
            link = self.controller.link
            self.controller.spawn(link.post("/api/models/copy", {"model": row["name"]}),
                                  f"Copying {row['name']} failed")

    def _delete(self) -> None:
        row = self.selected()
        if not row or not row["local"]:
            return
        answer = QMessageBox.question(self, "Delete model",
                                      f"Delete {row['name']} from this machine?")
        if answer == QMessageBox.StandardButton.Yes:
            self.controller.spawn(self.delete(row["name"]))

    async def delete(self, name: str) -> None:
        try:
            await asyncio.to_thread(self.store.remove, name)
            self.message.setText(f"{name} was deleted.")
        except ModelStoreError as exc:
            self.message.setText(str(exc))
        await self.controller.refresh()
