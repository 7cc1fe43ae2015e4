"""The user's data directory per OS: outside any install tree, where each OS keeps it."""

from __future__ import annotations

from pathlib import Path, PureWindowsPath

import pytest

from backends.paths import data_dir_for, default_data_dir

HOME = Path("/home/alice")


@pytest.mark.parametrize(("platform", "env", "expected"), [
    ("linux", {}, HOME / ".local/share/covey"),
    ("linux", {"XDG_DATA_HOME": "/data/xdg"}, Path("/data/xdg/covey")),
    ("darwin", {}, HOME / "Library/Application Support/Covey"),
    ("darwin", {"XDG_DATA_HOME": "/data/xdg"}, HOME / "Library/Application Support/Covey"),
    ("win32", {"LOCALAPPDATA": "/users/alice/local"}, Path("/users/alice/local/Covey")),
    ("win32", {}, HOME / "AppData/Local/Covey"),
    ("freebsd14", {}, HOME / ".local/share/covey"),
])
def test_each_os_has_its_own_place(platform: str, env: dict, expected: Path) -> None:
    assert data_dir_for(platform, env, HOME) == expected


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_covey_data_dir_wins_everywhere(platform: str) -> None:
    env = {"COVEY_DATA_DIR": "/srv/covey", "XDG_DATA_HOME": "/x", "LOCALAPPDATA": "/y"}
    assert data_dir_for(platform, env, HOME) == Path("/srv/covey")


def test_windows_path_shape() -> None:
    """On Windows the result is %LOCALAPPDATA%\\Covey, a sibling of other apps' data."""
    env = {"LOCALAPPDATA": r"C:\Users\alice\AppData\Local"}
    path = data_dir_for("win32", env, HOME)
    assert PureWindowsPath(str(path)).name == "Covey"
    assert PureWindowsPath(str(path)).parent == PureWindowsPath(env["LOCALAPPDATA"])


def test_default_follows_this_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COVEY_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "covey"
    monkeypatch.setenv("COVEY_DATA_DIR", str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"
