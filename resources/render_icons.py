"""Render the app icon's PNGs for a Linux desktop install (the hicolor icon theme).

Run ``python -m resources.render_icons`` after changing ``icons/covey.svg``. It writes
``icons/hicolor/{N}x{N}/apps/covey.png`` for each size in ``PNG_SIZES`` and is
idempotent: a PNG whose bytes would not change is left alone. Needs PySide6's QtSvg;
runs headless (``QT_QPA_PLATFORM`` defaults to ``offscreen``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from resources import APP_ICON, ICON_DIR, PNG_SIZES, hicolor_png_path, icon_path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt  # noqa: E402
from PySide6.QtGui import QGuiApplication, QImage, QPainter  # noqa: E402
from PySide6.QtSvg import QSvgRenderer  # noqa: E402


def _app() -> QGuiApplication:
    """Qt wants an application object before painting; reuse one if it exists."""
    existing = QGuiApplication.instance()
    if isinstance(existing, QGuiApplication):
        return existing
    return QGuiApplication(sys.argv[:1])


def render_png(svg: Path, size: int) -> bytes:
    """The SVG drawn into a size x size ARGB image, encoded as PNG."""
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise ValueError(f"{svg} is not a valid SVG for QtSvg")
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
    renderer.render(painter)
    painter.end()
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    if not image.convertToFormat(QImage.Format.Format_ARGB32).save(buffer, "PNG"):
        raise RuntimeError(f"could not encode {svg} at {size} px as PNG")
    buffer.close()
    return bytes(data.data())


def render_all(root: Path = ICON_DIR, sizes: tuple[int, ...] = PNG_SIZES) -> list[Path]:
    """Write the app icon's PNGs under root; return the paths that changed."""
    _app()
    svg = icon_path(APP_ICON)
    changed = []
    for size in sizes:
        out = hicolor_png_path(size, root)
        png = render_png(svg, size)
        if out.is_file() and out.read_bytes() == png:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".png.tmp")
        tmp.write_bytes(png)
        tmp.replace(out)
        changed.append(out)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ICON_DIR, help="where the hicolor tree goes")
    args = parser.parse_args(argv)
    changed = render_all(args.root)
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print("icons up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
