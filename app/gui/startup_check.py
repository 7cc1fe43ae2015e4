"""Before Qt loads: are the system libraries the desktop app needs on this machine?

PySide6 brings Qt's own libraries, but Qt links to a few dozen of the system's (OpenGL,
fonts, D-Bus, and for a window on X11 the xcb family). When one is missing, importing
PySide6 fails with a bare "cannot open shared object file", or Qt aborts with "Could not
load the Qt platform plugin" and a core dump. This module checks first, on Linux only, and
names each missing library with the Debian/Ubuntu package that provides it.

`missing_libraries` and `message` are pure (the loader is passed in); `check` is the thin
adapter the app calls before it imports PySide6; `python -m app.gui.startup_check` runs it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple


class Library(NamedTuple):
    soname: str
    package: str  # the Debian/Ubuntu package that ships it


# What Qt's core, GUI, widgets and D-Bus libraries link to, whatever the display.
QT_COMMON: tuple[Library, ...] = (
    Library("libEGL.so.1", "libegl1"),
    Library("libGL.so.1", "libgl1"),
    Library("libxkbcommon.so.0", "libxkbcommon0"),
    Library("libfontconfig.so.1", "libfontconfig1"),
    Library("libfreetype.so.6", "libfreetype6"),
    Library("libdbus-1.so.3", "libdbus-1-3"),
    Library("libglib-2.0.so.0", "libglib2.0-0"),
    Library("libX11.so.6", "libx11-6"),
)
# Qt's xcb platform plugin: a window on X11 (and Qt's fallback on Wayland).
QT_XCB: tuple[Library, ...] = (
    Library("libX11-xcb.so.1", "libx11-xcb1"),
    Library("libxkbcommon-x11.so.0", "libxkbcommon-x11-0"),
    Library("libxcb-cursor.so.0", "libxcb-cursor0"),
    Library("libxcb-icccm.so.4", "libxcb-icccm4"),
    Library("libxcb-image.so.0", "libxcb-image0"),
    Library("libxcb-keysyms.so.1", "libxcb-keysyms1"),
    Library("libxcb-randr.so.0", "libxcb-randr0"),
    Library("libxcb-render-util.so.0", "libxcb-render-util0"),
    Library("libxcb-shape.so.0", "libxcb-shape0"),
    Library("libxcb-xfixes.so.0", "libxcb-xfixes0"),
    Library("libxcb-xkb.so.1", "libxcb-xkb1"),
)
# Qt's wayland platform plugin.
QT_WAYLAND: tuple[Library, ...] = (
    Library("libwayland-client.so.0", "libwayland-client0"),
    Library("libwayland-cursor.so.0", "libwayland-cursor0"),
)


def qt_platform(env: Mapping[str, str]) -> str:
    """The Qt platform plugin that will load: $QT_QPA_PLATFORM's first choice, else
    "wayland" in a Wayland session and "xcb" otherwise (as Qt 6 chooses)."""
    chosen = env.get("QT_QPA_PLATFORM", "").split(";")[0].split(":")[0].strip()
    if chosen:
        return chosen
    return "wayland" if env.get("WAYLAND_DISPLAY") else "xcb"


def required_libraries(platform: str) -> tuple[Library, ...]:
    """The system libraries Qt needs with this platform plugin ("offscreen" and the other
    headless plugins need only the common ones)."""
    if platform == "xcb":
        return QT_COMMON + QT_XCB
    if platform.startswith("wayland"):
        return QT_COMMON + QT_WAYLAND
    return QT_COMMON


def missing_libraries(required: Iterable[Library], can_load: Callable[[str], bool]
                      ) -> list[Library]:
    """The libraries in `required` that `can_load` cannot load, in order."""
    return [lib for lib in required if not can_load(lib.soname)]


def message(missing: Iterable[Library]) -> str | None:
    """What to tell the user about `missing`; None when nothing is missing."""
    missing = list(missing)
    if not missing:
        return None
    width = max(len(lib.soname) for lib in missing)
    lines = [f"  {lib.soname:<{width}}  (package {lib.package})" for lib in missing]
    packages = " ".join(dict.fromkeys(lib.package for lib in missing))
    return (
        "covey: the desktop app cannot start: Qt needs system libraries that are missing "
        "here:\n" + "\n".join(lines) + "\n"
        "On Debian or Ubuntu, install them with:\n"
        f"  sudo apt-get install {packages}\n"
        "Meanwhile `covey chat` works in the terminal."
    )


def can_load(soname: str) -> bool:
    """Whether the dynamic loader finds `soname` and everything it links to."""
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def check(env: Mapping[str, str] | None = None) -> str | None:
    """The message about missing libraries on this machine, or None when Qt can load.

    Only Linux is checked: on macOS and Windows Qt brings everything it needs.
    """
    if not sys.platform.startswith("linux"):
        return None
    platform = qt_platform(os.environ if env is None else env)
    return message(missing_libraries(required_libraries(platform), can_load))


def main() -> int:
    problem = check()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    print("covey: every system library Qt needs is present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
