"""Where Covey keeps its files on this machine: the user's data directory, per OS.

Installers put the program in a read-only tree; everything a user owns (swarm, identity,
models, conversations) lives here instead, so upgrades and uninstalls never touch it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def data_dir_for(platform: str, env: Mapping[str, str], home: Path) -> Path:
    """The data directory for `platform` (a `sys.platform` value), `env` and `home`.

    $COVEY_DATA_DIR wins everywhere. Otherwise each OS's own place for application data:
    macOS ~/Library/Application Support/Covey; Windows %LOCALAPPDATA%\\Covey (local, not
    roaming: models are gigabytes); elsewhere $XDG_DATA_HOME/covey, else
    ~/.local/share/covey.
    """
    explicit = env.get("COVEY_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    if platform == "darwin":
        return home / "Library" / "Application Support" / "Covey"
    if platform == "win32":
        local = env.get("LOCALAPPDATA")
        return (Path(local) if local else home / "AppData" / "Local") / "Covey"
    xdg = env.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else home / ".local" / "share") / "covey"


def default_data_dir() -> Path:
    """This user's Covey data directory on this machine."""
    return data_dir_for(sys.platform, os.environ, Path.home())
