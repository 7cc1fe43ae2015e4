"""The tree keeps the architecture it shows: imports point one way (app -> swarm -> backends),
the command line never loads Qt, and no folder grows past what a newcomer can scan."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "swarm", "backends")
MAX_MODULES_PER_FOLDER = 15


def modules(package: str) -> list[str]:
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported(path: Path) -> set[str]:
    """Every absolute module name `path` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize(("package", "forbidden"), [
    ("backends", ("app", "swarm", "PySide6", "qasync")),
    ("swarm", ("app", "PySide6", "qasync")),
    ("app/cli", ("PySide6", "qasync")),  # `covey` alone opens app.gui, imported only then
])
def test_imports_point_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    wrong = sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in imported(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )
    assert not wrong, wrong


def test_command_line_never_loads_qt() -> None:
    """`covey chat`, `covey node`, `covey models`: every module they can reach, imported
    together, leaves PySide6 unloaded (a terminal-only machine may not even have its libs)."""
    names = [m for m in modules("app") + modules("swarm") + modules("backends")
             if not m.startswith("app.gui") and m != "app.cli.__main__"]
    code = (f"import importlib, sys\nfor m in {names!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'qasync')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert len(names) > 60  # the whole command line and node, not a handful


def test_no_folder_holds_more_than_fifteen_modules() -> None:
    crowded = {}
    for package in PACKAGES:
        for folder in [ROOT / package, *(p for p in (ROOT / package).rglob("*") if p.is_dir())]:
            count = len([p for p in folder.glob("*.py") if p.name != "__init__.py"])
            if count > MAX_MODULES_PER_FOLDER:
                crowded[str(folder.relative_to(ROOT))] = count
    assert not crowded, crowded
