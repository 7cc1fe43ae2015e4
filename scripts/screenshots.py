"""Screenshots of the desktop app's chat, swarm and models pages, for the README.

Starts Xvfb (unless a display is set), runs the real app with its own node on loopback and the
bundled Gemma 3 270M, asks one question, and saves each page to docs/screenshots/.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTION = "In two sentences: what is a covey, and why is it a good name for a swarm of computers?"


@contextlib.contextmanager
def virtual_display() -> Iterator[None]:
    if os.environ.get("DISPLAY"):
        yield
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        sys.exit("screenshots: Xvfb is missing (apt-get install xvfb)")
    display = ":97"
    proc = subprocess.Popen([xvfb, display, "-screen", "0", "1280x860x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["DISPLAY"] = display
    time.sleep(1.0)
    try:
        yield
    finally:
        proc.terminate()
        proc.wait()


async def shoot(out: Path) -> None:
    from app.gui import app_settings
    from app.gui.desktop import CoveyApp
    from backends.store.bundled import chat_model

    data_dir = Path(tempfile.mkdtemp(prefix="covey-shots-"))
    app_settings.save(data_dir, app_settings.AppSettings(
        lan_only=True, listen=("/ip4/127.0.0.1/tcp/0",)))
    app = CoveyApp(data_dir)
    peer = None
    try:
        await app.start()
        # A second machine in the swarm, donating memory, so the swarm page has someone on it.
        peer_dir = data_dir / "peer"
        peer = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "node", "--data-dir", str(peer_dir),
             "--name", "study-laptop", "--token", app.controller.token(), "--lan-only",
             "--listen", "/ip4/127.0.0.1/tcp/0", "--worker", "--share-mib", "3072"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        window = app.window
        window.resize(1180, 760)
        chat = window.chat
        chat.model_picker.setCurrentIndex(max(chat.model_picker.findData(chat_model()), 0))
        chat.input.setPlainText(QUESTION)
        chat.send_button.click()
        while chat._reply is not None:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                p.get("name") == "study-laptop" and p.get("worker")
                for p in app.controller.last_peers):
            await asyncio.sleep(0.5)
        out.mkdir(parents=True, exist_ok=True)
        for page in ("Chat", "Swarm", "Models", "Settings"):
            window.show_page(page)
            await app.controller.refresh()
            await asyncio.sleep(0.5)
            path = out / f"{page.lower()}.png"
            window.grab().save(str(path))
            print(f"saved {path}")
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(15)
        await app.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    with virtual_display():
        import qasync
        from PySide6.QtWidgets import QApplication

        qt = QApplication.instance() or QApplication([])
        loop = qasync.QEventLoop(qt)
        asyncio.set_event_loop(loop)
        with loop:
            loop.run_until_complete(shoot(args.out))
    sys.stdout.flush()
    os._exit(0)  # PySide6 can crash in the interpreter's teardown; everything is saved


if __name__ == "__main__":
    sys.exit(main())
