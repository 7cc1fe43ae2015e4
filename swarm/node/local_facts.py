"""What this machine is: its name, OS, cores, RAM and Covey version, gathered for the "node"
ledger entry (swarm/ledger/entries.py) and for sizing what worker mode donates."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket

from backends.ggml import RPC_PROTOCOL_VERSION
from backends.memory import memory_bytes
from swarm.ledger.entries import MAX_NAME_CHARS, NodeInfo


@functools.cache  # it scans the installed packages: cheap once, an EMFILE risk each time
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
