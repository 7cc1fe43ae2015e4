"""The node's remembered settings: the swarm token and what the user chose at `covey node`,
including where prompts may go (`remote_prompts`: to other machines at all; `prefer_route`:
the route `auto` tries first), what this node lends as a relay (`relay_*`; None: default) and
whether it may ask the router for a port mapping (`upnp`).

Kept in `swarm.json` in the data directory with mode 0600, because the token is the swarm's
only secret. Written atomically so a crash never leaves half a file. A setting added later is
optional in the file, so an older file still reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swarm.net.relay_limits import MiB, RelayLimits
from swarm.routes.auto import PREFERABLE
from swarm.trust.private_file import narrow_mode, write_private

SETTINGS_FILE = "swarm.json"
SETTINGS_VERSION = 1


# Upper bounds on what a relay may be told to lend: past them a typo, not a choice.
RELAY_MAX: dict[str, int] = {
    "relay_max_circuits": 4096, "relay_rate_mib": 100_000, "relay_circuit_mib": 1 << 20}
_WORDS: dict[type, str] = {int: "whole number", float: "number"}


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
    relay_max_circuits: int | None = None  # circuits relayed at once, all members together
    relay_rate_mib: float | None = None  # relayed MiB/s, all circuits together
    relay_circuit_mib: int | None = None  # MiB one circuit carries before the relay ends it
    upnp: bool = True  # off: never ask the router to map a port
    version: int = SETTINGS_VERSION

    def relay_limits(self) -> RelayLimits:
        """What this node lends as a relay: the defaults, with what the user chose."""
        default = RelayLimits()
        circuits = self.relay_max_circuits or default.max_circuits
        return RelayLimits(
            max_circuits=circuits,
            max_circuits_per_peer=min(default.max_circuits_per_peer, circuits),
            rate_bytes_s=(self.relay_rate_mib * MiB if self.relay_rate_mib
                          else default.rate_bytes_s),
            circuit_bytes=(self.relay_circuit_mib * MiB if self.relay_circuit_mib
                           else default.circuit_bytes),
        )


def _positive(body: dict[str, Any], key: str, kind: type[int] | type[float]) -> int | float | None:
    """`body[key]`: None, or a positive number of `kind` (ValueError naming the key)."""
    value = body.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (kind, int))
            or not 0 < value <= RELAY_MAX[key]):
        raise ValueError(f"{key} must be a positive {_WORDS[kind]} up to "
                         f"{RELAY_MAX[key]}, or null")
    return kind(value)


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
        upnp = body.get("upnp", True)
        for key, flag in (("remote_prompts", remote_prompts), ("upnp", upnp)):
            if not isinstance(flag, bool):
                raise ValueError(f"{key} must be true or false")
        if prefer_route not in PREFERABLE:
            raise ValueError(f"prefer_route must be one of {', '.join(PREFERABLE)}")
        ctx = body.get("ctx")
        if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
            raise ValueError("ctx must be a positive whole number or null")
        relay_circuits = _positive(body, "relay_max_circuits", int)
        relay_rate = _positive(body, "relay_rate_mib", float)
        relay_circuit = _positive(body, "relay_circuit_mib", int)
        return Settings(
            token=str(body["token"]),
            name=body.get("name"),
            bootstrap=[str(a) for a in body.get("bootstrap", [])],
            remote_prompts=remote_prompts,
            prefer_route=prefer_route,
            ctx=ctx,
            relay_max_circuits=int(relay_circuits) if relay_circuits else None,
            relay_rate_mib=relay_rate,
            relay_circuit_mib=int(relay_circuit) if relay_circuit else None,
            upnp=upnp,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SettingsError(
            f"{path} is damaged ({exc}); pass --token again to replace it."
        ) from None


def save_settings(data_dir: Path, settings: Settings) -> None:
    write_private(data_dir / SETTINGS_FILE, json.dumps(asdict(settings), indent=2).encode())
