"""What each node publishes about itself in the ledger (key "node"), and how it is checked.

A peer's info arrives from the network, so `NodeInfo.from_value` validates every field's type
and size rather than trusting it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
from dataclasses import asdict, dataclass
from typing import Any

from backends.ggml import RPC_PROTOCOL_VERSION
from backends.memory import memory_bytes

NODE_KEY = "node"
INFO_VERSION = 1
ROLES = ("client", "worker", "federated")
MAX_NAME_CHARS = 64


@dataclass(frozen=True)
class NodeInfo:
    name: str
    os: str
    covey_version: str
    rpc_protocol: str
    cores: int
    ram_total: int
    ram_free: int
    roles: tuple[str, ...]
    version: int = INFO_VERSION

    def to_value(self) -> dict[str, Any]:
        value = asdict(self)
        value["roles"] = list(self.roles)
        return value

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> NodeInfo:
        """Raises ValueError for anything a well-behaved node would not send."""
        def text(name: str, limit: int = MAX_NAME_CHARS) -> str:
            v = value.get(name)
            if not isinstance(v, str) or len(v) > limit:
                raise ValueError(f"{name} must be text of at most {limit} characters")
            return v

        def count(name: str) -> int:
            v = value.get(name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer")
            return v

        roles = value.get("roles")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ValueError("roles must be a list of text")
        if value.get("version") != INFO_VERSION:
            raise ValueError(f"node info version {value.get('version')!r} is not {INFO_VERSION}")
        return cls(
            name=text("name"),
            os=text("os"),
            covey_version=text("covey_version", 32),
            rpc_protocol=text("rpc_protocol", 32),
            cores=count("cores"),
            ram_total=count("ram_total"),
            ram_free=count("ram_free"),
            roles=tuple(r for r in roles[:8] if len(r) <= 32),
        )


def covey_version() -> str:
    try:
        return importlib.metadata.version("covey")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def default_node_name() -> str:
    return socket.gethostname()[:MAX_NAME_CHARS] or "covey-node"


def collect_node_info(name: str, roles: tuple[str, ...]) -> NodeInfo:
    total, free = memory_bytes()
    return NodeInfo(
        name=name[:MAX_NAME_CHARS],
        os=f"{platform.system()} {platform.release()}"[:MAX_NAME_CHARS],
        covey_version=covey_version(),
        rpc_protocol=RPC_PROTOCOL_VERSION,
        cores=os.cpu_count() or 1,
        ram_total=total,
        ram_free=free,
        roles=roles,
    )
