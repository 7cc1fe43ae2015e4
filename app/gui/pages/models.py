"""The models page: this machine's models and the swarm's, with sizes and where each runs;
import a GGUF, download by URL (progress, cancel, resume), copy from a peer, delete.

The list comes from the node (`GET /api/models`), which reads the store in its own process:
reading GGUF headers here would hold the GIL and stall the window. Imports and downloads run in
a thread (their hashing and I/O release the GIL); copies from peers run in the node, and this
page shows their progress.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.gui.controller import Controller
from app.gui.widgets import button, read_only_table
from backends.sizes import human_bytes
from backends.store.model_store import ModelStore, ModelStoreError

COLUMNS = ("Model", "Size", "On this machine", "Offered by", "Runs")
PROGRESS_EVERY_S = 0.1
ROUTE_WORDS = {"local": "this machine", "sharded": "spread over workers",
               "federated": "served by a peer"}


def model_rows(local: list[dict[str, Any]], models: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model name: local store entries merged with what peers offer and what the
    swarm can run now."""
    rows: dict[str, dict[str, Any]] = {}
    for m in local:
        rows[m["name"]] = {"name": m["name"], "size": m["size"], "local": True, "peers": []}
    for m in models.get("swarm", []):
        row = rows.setdefault(m["name"], {"name": m["name"], "size": m["size"],
                                          "local": False, "peers": []})
        row["peers"] += [p for p in m.get("machines", []) if p not in row["peers"]]
    runnable = {m["id"]: m.get("covey", {}) for m in models.get("runnable", [])}
    for model_id, where in runnable.items():  # the bundled model, before its first use
        if model_id not in rows and "local" in where.get("routes", []):
            rows[model_id] = {"name": model_id, "size": 0, "local": True, "peers": []}
    for row in rows.values():
        where = runnable.get(row["name"])
        row["runs"] = ", ".join(ROUTE_WORDS.get(r, r) for r in where.get("routes", [])
                                ) if where else (
            "copy it here first" if not row["local"] else "does not fit")
    return sorted(rows.values(), key=lambda r: (not r["local"], r["name"]))


class ModelsPage(QWidget):
    def __init__(self, controller: Controller) -> None:
        super().__init__()
        self.controller = controller
        self.store = ModelStore(controller.data_dir / "models")
        self._cancel: threading.Event | None = None
        self._busy = False

        self.table = read_only_table("models", COLUMNS)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.itemSelectionChanged.connect(self._update_buttons)

        self.import_button = button("Import GGUF file…", self._import)
        self.copy_button = button("Copy from peer", self._copy)
        self.delete_button = button("Delete", self._delete)
        self.url = QLineEdit()
        self.url.setObjectName("downloadUrl")
        self.url.setPlaceholderText("https://…/model.gguf")
        self.download_button = button("Download", self.download)
        self.cancel_button = button("Cancel", self.cancel)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.message = QLabel()
        self.message.setObjectName("modelsMessage")
        self.message.setWordWrap(True)

        actions = QHBoxLayout()
        actions.addWidget(self.import_button)
        actions.addWidget(self.copy_button)
        actions.addWidget(self.delete_button)
        actions.addStretch(1)
        download = QHBoxLayout()
        download.addWidget(QLabel("Download by URL:"))
        download.addWidget(self.url, 1)
        download.addWidget(self.download_button)
        download.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table, 1)
        layout.addLayout(actions)
        layout.addLayout(download)
        layout.addWidget(self.progress)
        layout.addWidget(self.message)
        controller.models.connect(self._models_changed)
        self._update_buttons()

    # -- the list --------------------------------------------------------------------------

    def _models_changed(self, models: dict[str, Any]) -> None:
        self._draw(models)

    def _draw(self, models: dict[str, Any]) -> None:
        rows = model_rows(models.get("local", []), models)
        selected = self.selected()
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            size = human_bytes(row["size"]) if row["size"] else "—"
            cells = [row["name"], size, "yes" if row["local"] else "no",
                     ", ".join(row["peers"]) or "—", row["runs"]]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setData(Qt.ItemDataRole.UserRole, row)
                self.table.setItem(r, c, item)
            if selected and row["name"] == selected["name"]:
                self.table.selectRow(r)
        self._show_copies(models.get("copies", []))
        self._update_buttons()

    def _show_copies(self, copies: list[dict[str, Any]]) -> None:
        if self._busy:  # an import or download owns the progress bar
            return
        running = [c for c in copies if c.get("state") in ("waiting", "running", "verifying")]
        if running:
            job = running[0]
            self.progress.setVisible(True)
            self.progress.setMaximum(max(int(job.get("size") or 0) >> 20, 1))
            self.progress.setValue(int(job.get("done") or 0) >> 20)
            self.message.setText((job.get("notice") or "") if job.get("state") == "waiting" else
                                 f"Copying {job.get('model')} from {job.get('source') or '…'}")
        elif self.progress.isVisible():
            self.progress.setVisible(False)

    def selected(self) -> dict[str, Any] | None:
        items = self.table.selectedItems()
        return items[0].data(Qt.ItemDataRole.UserRole) if items else None

    def _update_buttons(self) -> None:
        row = self.selected()
        self.copy_button.setEnabled(bool(row and not row["local"] and row["peers"]))
        self.delete_button.setEnabled(bool(row and row["local"]) and not self._busy)
        self.import_button.setEnabled(not self._busy)
        self.download_button.setEnabled(not self._busy)
        self.cancel_button.setEnabled(self._busy and self._cancel is not None)

    # -- actions ---------------------------------------------------------------------------

    def _import(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import a GGUF model", str(Path.home()),
                                              "GGUF models (*.gguf)")
        if path:
            self._begin()
            self.controller.spawn(self.import_file(Path(path)))

    async def import_file(self, path: Path) -> None:
        await self._store_job(f"Importing {path.name}",
                              lambda progress, _cancel: self.store.import_file(
                                  path, progress=progress), cancellable=False)

    def download(self) -> None:
        url = self.url.text().strip()
        if url:
            self._begin()
            self.controller.spawn(self.download_url(url))

    async def download_url(self, url: str) -> None:
        await self._store_job("Downloading", lambda progress, cancel: self.store.download(
            url, progress=progress, cancel=cancel), cancellable=True)

    def _begin(self) -> None:
        """Busy from the click on, before the job's task first runs."""
        self._busy = True
        self._update_buttons()

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    async def _store_job(self, what: str, job: Any, cancellable: bool) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0

        def progress(done: int, total: int | None) -> None:  # runs in the worker thread
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S or done == total:
                last = now
                loop.call_soon_threadsafe(self._show_progress, what, done, total)

        self._busy = True
        self._cancel = threading.Event() if cancellable else None
        self.progress.setVisible(True)
        self.progress.setMaximum(0)
        self.message.setText(f"{what}…")
        self._update_buttons()
        try:
            entry = await asyncio.to_thread(job, progress, self._cancel)
            self.message.setText(f"{entry.name} is ready ({human_bytes(entry.manifest.size)}).")
            self.url.clear()
        except ModelStoreError as exc:
            self.message.setText(str(exc))
        finally:
            self._busy = False
            self._cancel = None
            self.progress.setVisible(False)
            self._update_buttons()
        await self.controller.refresh()

    def _show_progress(self, what: str, done: int, total: int | None) -> None:
        if total:
            self.progress.setMaximum(max(total >> 20, 1))
            self.progress.setValue(done >> 20)
            self.message.setText(f"{what}: {human_bytes(done)} of {human_bytes(total)}")
        else:
            self.message.setText(f"{what}: {human_bytes(done)}")

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
