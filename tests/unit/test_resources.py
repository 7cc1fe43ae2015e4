"""The shipped icons: every one the app can ask for exists and parses, the tray names map
the node state correctly, the hicolor PNGs have their sizes, and each tray icon's light
and dark variants really differ in glyph colour."""

from __future__ import annotations

import itertools
import os
import statistics
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import resources
from resources import (
    APP_ICON,
    ICON_DIR,
    PNG_SIZES,
    TRAY_STATES,
    all_icon_names,
    hicolor_png_path,
    icon_path,
    tray_icon_name,
)

SVG_NS = "{http://www.w3.org/2000/svg}"


# ---------------------------------------------------------------- Qt-free


def test_every_icon_the_app_can_ask_for_exists() -> None:
    names = set(all_icon_names())
    for worker, federated, online, dark in itertools.product((False, True), repeat=4):
        names.add(tray_icon_name(worker, federated, online, dark))
    assert len(names) == 1 + 2 * len(TRAY_STATES)
    for name in sorted(names):
        path = icon_path(name)
        assert path.is_file() and path.parent == ICON_DIR, name


def test_no_stray_svgs() -> None:
    assert sorted(p.stem for p in ICON_DIR.glob("*.svg")) == sorted(all_icon_names())


@pytest.mark.parametrize("name", all_icon_names())
def test_svg_is_well_formed_xml_with_a_square_viewbox(name: str) -> None:
    root = ET.parse(icon_path(name)).getroot()
    assert root.tag == f"{SVG_NS}svg"
    side = 256 if name == APP_ICON else 64
    assert root.get("viewBox") == f"0 0 {side} {side}"
    # Hand-written vector art only: no embedded bitmaps, scripts or external references.
    text = icon_path(name).read_text()
    for forbidden in ("<image", "<script", 'xlink:href="http', "data:"):
        assert forbidden not in text, (name, forbidden)


def test_icon_path_accepts_the_suffix_and_rejects_unknown_names() -> None:
    assert icon_path("covey.svg") == icon_path("covey") == ICON_DIR / "covey.svg"
    for bad in ("nope", "tray-idle", "", "../__init__", "hicolor/16x16/apps/covey", ".svg"):
        with pytest.raises(FileNotFoundError, match="Known icons: covey"):
            icon_path(bad)


@pytest.mark.parametrize(
    ("worker", "federated", "online", "dark_panel", "expected"),
    [
        (False, False, True, False, "tray-idle-light"),
        (False, False, True, True, "tray-idle-dark"),
        (True, False, True, False, "tray-worker-light"),
        (True, False, True, True, "tray-worker-dark"),
        (False, True, True, False, "tray-federated-light"),
        (False, True, True, True, "tray-federated-dark"),
        (True, True, True, False, "tray-both-light"),
        (True, True, True, True, "tray-both-dark"),
        # Offline wins over any role: the roles are stale when the node is not running.
        (False, False, False, False, "tray-offline-light"),
        (True, True, False, True, "tray-offline-dark"),
        (True, False, False, True, "tray-offline-dark"),
        (False, True, False, False, "tray-offline-light"),
    ],
)
def test_tray_icon_name(
    worker: bool, federated: bool, online: bool, dark_panel: bool, expected: str
) -> None:
    assert tray_icon_name(worker, federated, online, dark_panel) == expected


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("size", PNG_SIZES)
def test_hicolor_pngs_have_their_sizes(size: int) -> None:
    path = hicolor_png_path(size)
    assert path == ICON_DIR / "hicolor" / f"{size}x{size}" / "apps" / "covey.png"
    assert _png_size(path) == (size, size)


def test_resources_module_is_qt_free() -> None:
    source = Path(resources.__file__).read_text()
    assert "PySide6" not in source and "PyQt" not in source


# ---------------------------------------------------------------- rendered with QtSvg

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="module")
def qt(qapp: object) -> object:
    """pytest-qt's one QApplication: the GUI tests need a QApplication, not a bare
    QGuiApplication, and Qt allows one per process."""
    return qapp


def _render(name: str, size: int) -> list[tuple[int, int, int, int]]:
    """The icon drawn at size px, as straight (not premultiplied) RGBA pixels."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(str(icon_path(name)))
    assert renderer.isValid(), name
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    renderer.render(painter)
    painter.end()
    rgba = image.convertToFormat(QImage.Format.Format_RGBA8888)
    raw = bytes(rgba.constBits())[: size * size * 4]
    return [tuple(raw[i : i + 4]) for i in range(0, len(raw), 4)]  # type: ignore[misc]


def _glyph_luminance(pixels: list[tuple[int, int, int, int]]) -> float:
    """The dominant glyph colour's luminance (0 black .. 1 white): the median luma of the
    icon's opaque pixels, so a coloured badge does not drag it off the glyph's own ink."""
    opaque = [(r, g, b) for r, g, b, a in pixels if a >= 200]
    assert len(opaque) > 50, "the icon draws almost nothing"
    return statistics.median(0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b in opaque) / 255


def _mean_luminance(pixels: list[tuple[int, int, int, int]]) -> float:
    opaque = [(r, g, b) for r, g, b, a in pixels if a >= 200]
    return sum(0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b in opaque) / 255 / len(opaque)


@pytest.mark.parametrize("name", all_icon_names())
def test_svg_renders_with_qtsvg(qt: object, name: str) -> None:
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(str(icon_path(name)))
    assert renderer.isValid()
    side = 256 if name == APP_ICON else 64
    assert (renderer.viewBox().width(), renderer.viewBox().height()) == (side, side)
    pixels = _render(name, 32)
    coverage = sum(a for *_, a in pixels) / 255 / len(pixels)
    assert 0.08 < coverage < 0.95, (name, coverage)


@pytest.mark.parametrize("state", TRAY_STATES)
def test_tray_variants_differ_in_glyph_colour(qt: object, state: str) -> None:
    light_panel = _glyph_luminance(_render(f"tray-{state}-light", 64))
    dark_panel = _glyph_luminance(_render(f"tray-{state}-dark", 64))
    # The light-panel variant is a dark glyph and the dark-panel one a light glyph.
    assert light_panel < 0.3, light_panel
    assert dark_panel > 0.7, dark_panel
    assert dark_panel - light_panel > 0.5
    # And the mean over every opaque pixel, badges included, points the same way.
    light_mean = _mean_luminance(_render(f"tray-{state}-light", 64))
    dark_mean = _mean_luminance(_render(f"tray-{state}-dark", 64))
    assert dark_mean - light_mean > 0.4, (light_mean, dark_mean)


def test_tray_states_look_different(qt: object) -> None:
    """No two states of one variant render the same (a copy-paste slip would)."""
    for variant in ("light", "dark"):
        renders = {s: _render(f"tray-{s}-{variant}", 22) for s in TRAY_STATES}
        for a, b in itertools.combinations(TRAY_STATES, 2):
            assert renders[a] != renders[b], (variant, a, b)


def test_render_icons_writes_every_png_size(qt: object, tmp_path: Path) -> None:
    from resources.render_icons import render_all

    written = render_all(tmp_path)
    assert sorted(written) == sorted(hicolor_png_path(n, tmp_path) for n in PNG_SIZES)
    for n in PNG_SIZES:
        assert _png_size(hicolor_png_path(n, tmp_path)) == (n, n)
    assert render_all(tmp_path) == []  # idempotent: nothing changes the second time
