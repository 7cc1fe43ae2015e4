"""The two files through which a client finds the node's local API, shared by both sides.

The node writes `api-secret` (the bearer secret, 0600, stable across starts) and `api.json`
(which port, which process) into its data directory; the clients in swarm.client read them.
This module owns their names, their format and how each side reads and writes them. It
imports neither trio nor the clients, so the CLI can find a node cheaply.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from swarm.trust.private_file import narrow_mode, write_private

log = logging.getLogger(__name__)

SECRET_FILE = "api-secret"
INFO_FILE = "api.json"
INFO_VERSION = 1

# RFC 6750 token68: the only characters a bearer token may carry in a header.
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")


class SecretError(Exception):
    """The secret file exists but cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class ApiInfo:
    """The content of `api.json`: where the running node listens, and which process it is."""

    port: int
    pid: int
    version: int = INFO_VERSION

    def encode(self) -> bytes:
        return json.dumps({"version": self.version, "port": self.port, "pid": self.pid}).encode()

    @classmethod
    def decode(cls, data: str | bytes) -> ApiInfo:
        """The info in `data`; ValueError, saying what is wrong, for anything else."""
        info = json.loads(data)
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        if info.get("version") != INFO_VERSION:
            raise ValueError(f"unknown version {info.get('version')!r}")
        port, pid = info.get("port"), info.get("pid")
        # bool is an int in Python, but `true` is no port.
        if not (type(port) is int and 0 < port < 65536 and type(pid) is int and pid > 0):
            raise ValueError("bad port or pid")
        return cls(port, pid)

    @classmethod
    def read(cls, data_dir: Path) -> ApiInfo:
        """The published info; OSError when the file cannot be read, ValueError when bad."""
        return cls.decode((data_dir / INFO_FILE).read_bytes())


def write_api_info(data_dir: Path, port: int, pid: int) -> Path:
    """Publish where the running node listens, atomically, so a reader never sees half."""
    path = data_dir / INFO_FILE
    write_private(path, ApiInfo(port, pid).encode())
    return path


def remove_api_info(data_dir: Path, pid: int | None = None) -> None:
    """Remove api.json; with `pid`, only if it is still that process's (another node may own it)."""
    path = data_dir / INFO_FILE
    if pid is not None:
        try:
            if ApiInfo.read(data_dir).pid != pid:
                return
        except (OSError, ValueError):
            return
    path.unlink(missing_ok=True)


def read_secret(path: Path) -> str:
    """The secret in an existing file ("" if empty); SecretError if it is no usable token."""
    secret = path.read_text(encoding="ascii", errors="replace").strip()
    if secret and not _TOKEN_RE.fullmatch(secret):
        raise SecretError(f"{path} does not hold a usable API secret. Delete it; the node "
                          "makes a new one on its next start.")
    return secret


def load_or_create_secret(data_dir: Path) -> str:
    """The node's API secret in `data_dir/api-secret`, created 0600 on first use."""
    path = data_dir / SECRET_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL with the mode: the file is never, even briefly, readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        narrow_mode(path)
        secret = read_secret(path)
        if secret:
            return secret
        # Empty means a first start died between create and write; nobody holds that secret.
        log.warning("%s was empty; writing a new API secret", path)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    secret = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret
