"""Real Qt widgets offscreen, on a qasync loop, against real `covey node` processes.

Every node here listens on 127.0.0.1 only (`--lan-only`, so no DHT, and mDNS stays on the
loopback interface), which keeps all traffic on this machine.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
import qasync  # noqa: E402
from PySide6.QtCore import QEvent  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from app.gui import app_settings  # noqa: E402
from backends.store.model_store import ModelStore  # noqa: E402

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
TEST_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def qt_loop(qapp: QApplication) -> Iterator[qasync.QEventLoop]:
    """One qasync loop over pytest-qt's QApplication for the whole run (qasync loops do not
    take turns well on one application)."""
    loop = qasync.QEventLoop(qapp)
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()  # now, while its Qt objects still exist
    # Free the tests' widgets while Qt is whole: left to the interpreter's exit, PySide6 6.12
    # can crash freeing them in an arbitrary order ("bool_dealloc").
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    gc.collect()


@pytest.fixture
def run_async(qt_loop: qasync.QEventLoop) -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    """Run a test's coroutine on the qasync loop."""
    loop = qt_loop

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(TEST_TIMEOUT_S):
                return await coro
        return loop.run_until_complete(bounded())

    yield run


def app_data_dir(root: Path, name: str, tiny_model: Path | None = None) -> Path:
    """A data directory whose node listens on loopback only, with the tiny model in it."""
    data_dir = root / name
    data_dir.mkdir(parents=True, exist_ok=True)
    app_settings.save(data_dir, app_settings.AppSettings(lan_only=True, listen=LOOPBACK))
    if tiny_model is not None:
        ModelStore(data_dir / "models").import_file(tiny_model, "tiny")
    return data_dir


async def until(check: Callable[[], Any], timeout: float, what: str,
                every: float = 0.1) -> Any:
    """Poll `check` while the Qt loop keeps running; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
