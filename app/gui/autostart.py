"""Start Covey at login: an XDG autostart entry on Linux, a LaunchAgent on macOS, a Run key on
Windows. Each is one small function pair; `set_enabled` picks the one for this system.
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import shlex
import sys
from pathlib import Path

APP_ID = "org.covey.Covey"


def command() -> list[str]:
    """How this Covey starts: the installed launcher if there is one, else this Python."""
    return [sys.executable, "-m", "app.cli"]


def linux_entry_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "autostart" / "covey.desktop"


def linux_entry(cmd: list[str]) -> str:
    return "\n".join([
        "[Desktop Entry]",
        "Type=Application",
        "Name=Covey",
        "Comment=Run large language models on the computers you own",
        f"Exec={' '.join(shlex.quote(c) for c in cmd)}",
        "Icon=covey",
        "X-GNOME-Autostart-enabled=true",
        "",
    ])


def macos_agent_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{APP_ID}.plist"


def macos_agent(cmd: list[str]) -> bytes:
    return plistlib.dumps({"Label": APP_ID, "ProgramArguments": cmd, "RunAtLoad": True})


def _windows_set(enabled: bool, cmd: list[str]) -> None:
    if sys.platform != "win32":  # also tells type checkers that winreg exists below
        raise OSError("the Run key exists only on Windows")
    import winreg

    key = winreg.OpenKey(winreg.HKEY_CURRENT_USER,
                         r"Software\Microsoft\Windows\CurrentVersion\Run", 0,
                         winreg.KEY_SET_VALUE)
    with key:
        if enabled:
            winreg.SetValueEx(key, "Covey", 0, winreg.REG_SZ,
                              " ".join(f'"{c}"' for c in cmd))
        else:
            with contextlib.suppress(FileNotFoundError):
                winreg.DeleteValue(key, "Covey")


def _write_or_remove(path: Path, data: bytes | None) -> None:
    if data is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def set_enabled(enabled: bool, cmd: list[str] | None = None) -> None:
    cmd = cmd or command()
    if sys.platform == "win32":
        _windows_set(enabled, cmd)
    elif sys.platform == "darwin":
        _write_or_remove(macos_agent_path(), macos_agent(cmd) if enabled else None)
    else:
        _write_or_remove(linux_entry_path(), linux_entry(cmd).encode() if enabled else None)

