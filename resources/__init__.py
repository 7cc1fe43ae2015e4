"""Icons, style sheets and desktop files shipped with Covey.

The icons are hand-written SVG under ``resources/icons``:

* ``covey.svg``: the app icon (a flock of three birds on a deep-teal tile), with PNG
  renders for a Linux desktop install under ``icons/hicolor/{N}x{N}/apps/covey.png``
  (made by ``python -m resources.render_icons``);
* ``tray-{state}-{light|dark}.svg``: the system-tray icon for each node state. The
  ``light`` variant is for a light panel (dark glyph), ``dark`` for a dark panel
  (light glyph). States: ``idle`` (in a swarm, no role), ``worker`` (lends memory to
  the swarm: amber disc with an up arrow), ``federated`` (serves whole requests: teal
  square with a chevron), ``both`` (amber/teal split disc) and ``offline`` (node not
  running or not in a swarm: faded flock with a crossed circle).

This module is Qt-free on purpose: it only names files. The app layer loads them with
``QIcon(str(icon_path(...)))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = [
    "APP_ICON",
    "ICON_DIR",
    "PNG_SIZES",
    "TRAY_STATES",
    "all_icon_names",
    "hicolor_png_path",
    "icon_path",
    "tray_icon_name",
]

ICON_DIR: Final[Path] = Path(__file__).resolve().parent / "icons"
APP_ICON: Final[str] = "covey"
TRAY_STATES: Final[tuple[str, ...]] = ("idle", "worker", "federated", "both", "offline")
TRAY_VARIANTS: Final[tuple[str, ...]] = ("light", "dark")
PNG_SIZES: Final[tuple[int, ...]] = (16, 32, 48, 128, 256)


def icon_path(name: str) -> Path:
    """The SVG file of icon ``name`` (``"covey"``, ``"tray-idle-dark"``; ``.svg`` optional).

    Raises FileNotFoundError, naming the known icons, when there is no such icon.
    """
    stem = name.removesuffix(".svg")
    path = ICON_DIR / f"{stem}.svg"
    # A name is a bare file stem: anything with a path separator is not one of ours.
    if not stem or "/" in stem or "\\" in stem or stem.startswith(".") or not path.is_file():
        known = ", ".join(sorted(p.stem for p in ICON_DIR.glob("*.svg")))
        raise FileNotFoundError(
            f"No icon named {name!r} in {ICON_DIR}. Known icons: {known or '(none)'}."
        )
    return path


def tray_icon_name(worker: bool, federated: bool, online: bool, dark_panel: bool) -> str:
    """The tray icon's name for a node state, e.g. ``"tray-worker-dark"``.

    ``online`` is false when the node is not running or not in a swarm; then the roles
    do not matter and the icon is the offline one. ``dark_panel`` picks the light glyph.
    """
    if not online:
        state = "offline"
    elif worker and federated:
        state = "both"
    elif worker:
        state = "worker"
    elif federated:
        state = "federated"
    else:
        state = "idle"
    return f"tray-{state}-{'dark' if dark_panel else 'light'}"


def all_icon_names() -> list[str]:
    """Every icon name the app can ask for: the app icon and each tray state and variant."""
    return [APP_ICON] + [f"tray-{s}-{v}" for s in TRAY_STATES for v in TRAY_VARIANTS]


def hicolor_png_path(size: int, root: Path = ICON_DIR) -> Path:
    """Where the ``size`` px PNG of the app icon lives in the hicolor theme tree under root."""
    return root / "hicolor" / f"{size}x{size}" / "apps" / f"{APP_ICON}.png"
