"""The `covey` command line: chat, models, token, node, peers. Never imports Qt."""

from app.cli.command import main

__all__ = ["main"]
