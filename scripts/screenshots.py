"""Screenshots of the desktop app's pages, for the README.

Starts Xvfb (unless a display is set), runs the real app with its own node on loopback and the
bundled default model, asks one question with the chat's side panel open (chat.png) and one
whose reply holds a code block, its Copy link clicked (chat-code.png), and saves each other page
(the Swarm page with its worker and federated switches, Models, Settings) to docs/screenshots/.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PySide6.QtWidgets import QWidget

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTION = "In two sentences: what is a covey, and why is it a good name for a swarm of computers?"
SYSTEM_PROMPT = "You are a friendly guide. Answer briefly, in plain words."
CODE_QUESTION = "Write a short Python function that checks whether a word is a palindrome."


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
        window.resize(1260, 780)
        chat = window.chat
        while chat.starting() or not chat.model_picker.count():
            await asyncio.sleep(0.1)
        chat.model_picker.setCurrentIndex(max(chat.model_picker.findData(chat_model()), 0))
        out.mkdir(parents=True, exist_ok=True)

        async def ask(question: str) -> None:
            chat.input.setPlainText(question)
            chat.send_button.click()
            while chat._reply is not None:
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)

        # A reply with a code block, its Copy link clicked, the side panel closed for room.
        chat.show_panel(False)
        await ask(CODE_QUESTION)
        chat.transcript.copy_code(0)
        save(window, out / "chat-code.png")

        chat.new_conversation()
        chat.show_panel(True)
        chat.panel.system_prompt.setPlainText(SYSTEM_PROMPT)
        await ask(QUESTION)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                p.get("name") == "study-laptop" and p.get("worker")
                for p in app.controller.last_peers):
            await asyncio.sleep(0.5)
        for page in ("Chat", "Swarm", "Models", "Settings"):
            window.show_page(page)
            await app.controller.refresh()
            await asyncio.sleep(0.5)
            save(window, out / f"{page.lower()}.png")
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(15)
        await app.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)


def save(window: QWidget, path: Path) -> None:
    window.grab().save(str(path))
    print(f"saved {path}")


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
