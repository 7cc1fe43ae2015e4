"""The node's remembered settings: the swarm token and what the user chose at `covey node`,
including where prompts may go (`remote_prompts`: to other machines at all; `prefer_route`:
the route `auto` tries first).

Kept in `swarm.json` in the data directory with mode 0600, because the token is the swarm's
only secret. Written atomically so a crash never leaves half a file. A setting added later is
optional in the file, so an older file still reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from swarm.routes.auto import PREFERABLE
from swarm.trust.private_file import narrow_mode, write_private

SETTINGS_FILE = "swarm.json"
SETTINGS_VERSION = 1


class SettingsError(Exception):
    """The settings file is unreadable; the message names it."""


@dataclass(frozen=True)
class Settings:
    token: str
    name: str | None = None
    bootstrap: list[str] = field(default_factory=list)
    remote_prompts: bool = True  # off: no prompt leaves this machine (no federated, sharded)
    prefer_route: str = "auto"  # a route `auto` takes first when it can serve
    ctx: int | None = None  # the engine's context length; None: the model's trained one
    version: int = SETTINGS_VERSION


def load_settings(data_dir: Path) -> Settings | None:
    path = data_dir / SETTINGS_FILE
    if not path.exists():
        return None
    narrow_mode(path)
    try:
        body = json.loads(path.read_text())
        if body.get("version") != SETTINGS_VERSION:
            raise ValueError(f"version {body.get('version')!r}")
        remote_prompts = body.get("remote_prompts", True)
        prefer_route = body.get("prefer_route", "auto")
        if not isinstance(remote_prompts, bool):
            raise ValueError("remote_prompts must be true or false")
        if prefer_route not in PREFERABLE:
            raise ValueError(f"prefer_route must be one of {', '.join(PREFERABLE)}")
        ctx = body.get("ctx")
        if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
            raise ValueError("ctx must be a positive whole number or null")
        return Settings(
            token=str(body["token"]),
            name=body.get("name"),
            bootstrap=[str(a) for a in body.get("bootstrap", [])],
            remote_prompts=remote_prompts,
            prefer_route=prefer_route,
            ctx=ctx,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SettingsError(
            f"{path} is damaged ({exc}); pass --token again to replace it."
        ) from None


def save_settings(data_dir: Path, settings: Settings) -> None:
    write_private(data_dir / SETTINGS_FILE, json.dumps(asdict(settings), indent=2).encode())
