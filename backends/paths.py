"""Where Covey keeps its files on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """The user's Covey data directory: $COVEY_DATA_DIR, else the XDG data home."""
    explicit = os.environ.get("COVEY_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "covey"
