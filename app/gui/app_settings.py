"""What the user chose in the desktop app's settings, kept in `app-settings.json`.

These are the app's own choices; the node keeps its swarm token in `swarm.json`. Settings that
the node reads at start (LAN only, the API port, where it listens, the context length) become
`covey node` arguments through `node_arguments`; the rest the app applies itself (the roles
through the node's API, so that switching one never restarts the node). A damaged file falls
back to defaults with a warning, so a bad edit never stops the app from opening.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from swarm.trust.private_file import write_private

log = logging.getLogger(__name__)

SETTINGS_FILE = "app-settings.json"
SETTINGS_VERSION = 1
DEFAULT_API_PORT = 11435  # beside Ollama's 11434, so OpenAI clients find Covey at a fixed port
OPTIONAL_COUNTS = {"share_mib": 1, "threads": 1, "ctx": 0}  # None or a whole number from this


@dataclass(frozen=True)
class AppSettings:
    share_mib: int | None = None  # donated in worker mode; None: half the RAM
    threads: int | None = None  # engine threads; None: llama.cpp's choice
    # The context length: None passes no --ctx (the node's own: automatic unless `covey node
    # --ctx N` set one), 0 passes --ctx 0 (automatic: the node forgets a remembered one).
    ctx: int | None = None
    lan_only: bool = False
    api_enabled: bool = False  # the OpenAI API on a fixed loopback port for other programs
    api_port: int = DEFAULT_API_PORT
    start_at_login: bool = False
    keep_in_tray: bool = True  # closing the window while a role is on keeps Covey running
    tray_notice_shown: bool = False
    listen: tuple[str, ...] = ()  # libp2p listen addresses; empty: the node's default
    # The roles the user switched on: the node forgets them when it stops, the app asks
    # for them again after every start (app/gui/roles.py).
    worker: bool = False
    federated: bool = False
    federated_model: str = ""  # empty: the node's default model
    chat_panel_open: bool = False  # the chat page's side panel (app/gui/pages/chat_panel.py)
    version: int = SETTINGS_VERSION


def load(data_dir: Path) -> AppSettings:
    path = data_dir / SETTINGS_FILE
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return AppSettings()
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); using default settings", path, exc)
        return AppSettings()
    return from_dict(body, path)


def from_dict(body: object, where: Path | str = "settings") -> AppSettings:
    """Settings from JSON; unknown keys are ignored and bad values keep their defaults."""
    if not isinstance(body, dict) or body.get("version") != SETTINGS_VERSION:
        log.warning("%s: not version %d settings; using defaults", where, SETTINGS_VERSION)
        return AppSettings()
    settings = AppSettings()
    for f in fields(AppSettings):
        if f.name == "version" or f.name not in body:
            continue
        value = body[f.name]
        if f.name == "listen" and isinstance(value, list):
            value = tuple(str(v) for v in value)
        default = getattr(settings, f.name)
        if _same_kind(value, default, f.name):
            settings = replace(settings, **{f.name: value})
        else:
            log.warning("%s: ignoring %s=%r", where, f.name, value)
    return settings


def _same_kind(value: object, default: object, name: str) -> bool:
    if name in OPTIONAL_COUNTS:
        return value is None or (isinstance(value, int) and not isinstance(value, bool)
                                 and value >= OPTIONAL_COUNTS[name])
    if name == "api_port":
        return isinstance(value, int) and 0 < value < 65536
    return type(value) is type(default)


def save(data_dir: Path, settings: AppSettings) -> None:
    body = asdict(settings)
    body["listen"] = list(settings.listen)
    write_private(data_dir / SETTINGS_FILE, json.dumps(body, indent=2).encode())


def node_arguments(settings: AppSettings) -> list[str]:
    """The `covey node` arguments these settings ask for."""
    args: list[str] = []
    if settings.lan_only:
        args.append("--lan-only")
    if settings.threads:
        args += ["--threads", str(settings.threads)]
    if settings.ctx is not None:
        args += ["--ctx", str(settings.ctx)]
    if settings.api_enabled:
        args += ["--api-port", str(settings.api_port)]
    for addr in settings.listen:
        args += ["--listen", addr]
    return args


def renamed_model(settings: AppSettings, old: str, new: str) -> AppSettings:
    """The settings once model `old` is called `new`: the federated model follows the rename,
    so federated mode still serves it rather than a name no longer in the store."""
    if settings.federated_model != old:
        return settings
    return replace(settings, federated_model=new)


def ctx_from_field(text: str, before: int | None) -> int | None:
    """The context the Settings page's field asks for: its number of tokens; blank (or 0) is
    automatic, passed as 0 once the app has passed a context so that the node forgets it, and
    left as None (no --ctx, no restart) while the app never has."""
    tokens = int(text) if text.strip() else 0
    if tokens > 0:
        return tokens
    return None if before is None else 0
