"""Open the installed desktop app offscreen, wait until it shows its window and talks to
its node, then quit it the way the tray's Quit does. Run by installers/prove_deb.py inside
the test system as ``covey -c "$(cat app_smoke.py)"`` (the installed launcher runs ``-c``
like python), offscreen and then on an X server. Prints one ``APP ...`` line; exit status 0
when the app opened and shut down cleanly. With $COVEY_SMOKE_SCREENSHOT set, it saves a
picture of the whole screen there once the window is up.

It follows app/gui/launch.py's run(): a QApplication on a qasync loop, then CoveyApp.
"""

import asyncio
import os
import sys
import time

import qasync
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QApplication

from app.gui.desktop import CoveyApp
from backends.paths import default_data_dir

TIMEOUT_S = 120


async def open_and_quit() -> str:
    started = time.monotonic()
    app = CoveyApp(default_data_dir())
    try:
        await app.start()  # shows the window; attaches to this user's node or starts one
        while app.controller.last_status is None:  # the first answer from the node
            if time.monotonic() - started > TIMEOUT_S:
                raise TimeoutError(f"no status from the node in {TIMEOUT_S} s")
            await asyncio.sleep(0.2)
        opened = time.monotonic() - started
        assert app.window.isVisible(), "the main window is not shown"
        models = [m.get("id") for m in app.controller.last_models.get("runnable", [])]
        screenshot = os.environ.get("COVEY_SMOKE_SCREENSHOT")
        if screenshot:
            await asyncio.sleep(2)  # the pages fill in from the node's first answers
            if not QGuiApplication.primaryScreen().grabWindow(0).save(screenshot):
                raise RuntimeError(f"could not save the screenshot to {screenshot}")
        return (f"window shown on Qt's {QGuiApplication.platformName()} platform and node "
                f"answering in {opened:.1f} s; models {models}")
    finally:
        app.quit()
        await app.shutdown()  # stops the node it started, closes the window


def main() -> int:
    qt = QApplication(sys.argv[:1])
    qt.setApplicationName("Covey")
    loop = qasync.QEventLoop(qt)
    asyncio.set_event_loop(loop)
    with loop:
        summary = loop.run_until_complete(open_and_quit())
    print(f"APP ok: {summary}", flush=True)
    return 0


status = main()
sys.stdout.flush()
# As app/gui/launch.py does: skip the interpreter's teardown, where PySide6 can crash while
# Python frees Qt objects in an arbitrary order.
os._exit(status)
