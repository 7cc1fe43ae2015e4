"""Quit the desktop app cleanly on SIGTERM, SIGINT and SIGHUP (logout, `kill`, Ctrl+C).

Qt's event loop is C++, so a Python signal handler runs only when Qt next calls into
Python, which an idle app may not do for minutes. `signal.set_wakeup_fd` writes a byte to
a socket that a QSocketNotifier watches: Qt wakes, calls into Python, the handler runs on
the main thread and asks the app to quit, which then stops the node it started.
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable

from PySide6.QtCore import QSocketNotifier

QUIT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def quit_on_signals(quit: Callable[[], None]) -> Callable[[], None]:
    """Call `quit` on the Qt thread when one of QUIT_SIGNALS arrives; returns the undo.

    Does nothing on Windows, where these signals do not reach a GUI app.
    """
    if sys.platform == "win32":
        return lambda: None
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno())
    previous = {sig: signal.signal(sig, lambda *_: quit()) for sig in QUIT_SIGNALS}
    notifier = QSocketNotifier(reader.fileno(), QSocketNotifier.Type.Read)

    def drain() -> None:  # the handler itself has run by the time this Python code does
        try:
            while reader.recv(64):
                pass
        except BlockingIOError:
            pass

    notifier.activated.connect(drain)

    def undo() -> None:
        notifier.setEnabled(False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        reader.close()
        writer.close()

    return undo
