"""The options every `covey` subcommand shares, defined once.

They work before the subcommand's name (`covey --data-dir D chat`) and after it
(`covey chat --data-dir D`); given in both places, the later one wins.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from backends.paths import default_data_dir


def shared_options() -> argparse.ArgumentParser:
    """A parent parser (`parents=[shared_options()]`) for the top level and each subcommand.

    No defaults (SUPPRESS): a subcommand's parser must not overwrite what was given before
    its name, so an option never given is simply absent from the parsed arguments.
    """
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                        help=f"this machine's data directory (default: {default_data_dir()})")
    return shared


def chosen_data_dir(args: argparse.Namespace) -> Path:
    """--data-dir where given, before or after the subcommand; else the default."""
    return getattr(args, "data_dir", None) or default_data_dir()
