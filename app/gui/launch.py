"""`covey` with no arguments: the desktop app, if this machine can show it.

Checks for a display and for Qt before importing any of it, so a headless machine gets a
pointer to `covey chat` and `covey node` instead of a Qt crash dump. Then it builds the Qt
application on a qasync event loop, so the node API's coroutines run on Qt's own loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

NO_DISPLAY = (
    "covey: this machine has no display, so the desktop app cannot open.\n"
    "  Chat in the terminal:   covey chat\n"
    "  Run the swarm node:     covey node --token-file FILE"
)


def has_display() -> bool:
    if os.environ.get("QT_QPA_PLATFORM"):
        return True
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run(data_dir: Path) -> int:
    if not has_display():
        print(NO_DISPLAY, file=sys.stderr)
        return 2
    from app.gui.startup_check import check

    problem = check()  # a missing system library gets its name, not a Qt crash dump
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        import qasync
        from PySide6.QtWidgets import QApplication
    except ImportError as exc:
        print(f"covey: the desktop app needs Qt, which is missing here ({exc}).\n"
              "  Install it with:  pip install PySide6-Essentials qasync\n"
              "  or use:           covey chat", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    qt_app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(qt_app, QApplication)  # instance() is typed as the base class
    qt_app.setApplicationName("Covey")
    # Names the installed .desktop file, so Wayland docks show Covey's icon and name.
    qt_app.setDesktopFileName("org.covey.covey")
    loop = qasync.QEventLoop(qt_app)
    asyncio.set_event_loop(loop)

    from app.gui.desktop import CoveyApp
    from app.gui.quit_signals import quit_on_signals

    async def main() -> None:
        app = CoveyApp(data_dir)
        # Logout or `kill`: stop the node we started, then exit (the undo also keeps the
        # signal watcher alive until then).
        restore_signals = quit_on_signals(app.quit)
        try:
            await app.start()
        except Exception as exc:  # the node would not start: say why in the window
            app.window.node_label.setText(f"Covey's node did not start: {exc}")
        await app.quitting
        await app.shutdown()
        restore_signals()

    with loop:
        loop.run_until_complete(main())
    # Everything is saved and the node is stopped. Skip the interpreter's teardown: PySide6
    # can crash while Python frees Qt objects in an arbitrary order at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
