"""A bare ggml RPC worker process: serves this machine's CPU to one llama.cpp client.

It listens on loopback only; other machines reach it through Covey's authenticated tunnel,
because a ggml RPC server itself has no authentication or encryption at all. Prints one
JSON ready line on stdout, then serves until SIGTERM.
Run as `covey worker-rpc` or `python -m backends.rpc_worker`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

from backends import ggml
from backends.endpoints import is_loopback
from backends.memory import memory_bytes

READY_VERSION = 1


@dataclass(frozen=True)
class WorkerReady:
    """The ready line: where the worker listens and what it donates."""

    endpoint: str
    share_bytes: int
    rpc_protocol: str
    pid: int
    cache_dir: str | None
    version: int = READY_VERSION
    event: str = "ready"


class BindRefused(ValueError):
    pass


def check_bind(host: str, unsafe_bind: bool) -> None:
    """Refuse anything but loopback unless the user insisted."""
    if ":" in host:
        raise BindRefused(f"{host}: ggml RPC endpoints take an IPv4 address or a host name")
    if not is_loopback(host) and not unsafe_bind:
        raise BindRefused(
            f"refusing to listen on {host}: a ggml RPC server has no authentication or "
            "encryption, so anyone who can reach it can run code on your memory. Covey's "
            "swarm reaches workers through its own encrypted tunnel; pass --unsafe-bind only "
            "on a network you trust completely."
        )


def resolve_share(share_mib: int | None, total_bytes: int) -> int:
    """Bytes donated: the asked share, else half the machine's memory."""
    if share_mib is None:
        return total_bytes // 2
    share = share_mib * 1024 * 1024
    if share <= 0 or share > total_bytes:
        raise ValueError(
            f"--share-mib must be between 1 and this machine's {total_bytes // 2**20} MiB"
        )
    return share


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_listening(host: str, port: int, server: threading.Thread, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.is_alive():
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="covey worker-rpc", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    p.add_argument("--share-mib", type=int, help="memory donated, MiB (default: half of RAM)")
    p.add_argument("--cache-dir", help="tensor cache folder (speeds up reloading big models)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--unsafe-bind", action="store_true", help="allow a non-loopback address")
    p.add_argument("--parent-pid", type=int,
                   help="exit when this process (the node that started it) is gone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_bind(args.host, args.unsafe_bind)
        share = resolve_share(args.share_mib, memory_bytes().total)
        ggml.check_rpc_support()
    except (BindRefused, ValueError, ggml.GgmlUnavailable) as exc:
        print(f"covey worker-rpc: error: {exc}", file=sys.stderr)
        return 2
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # ggml's banner and logs go to stderr; stdout carries only the ready line
    port = args.port or free_port(args.host)
    endpoint = f"{args.host}:{port}"
    if args.cache_dir:
        os.makedirs(args.cache_dir, exist_ok=True)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    server = threading.Thread(
        target=ggml.rpc_start_server,
        args=(endpoint, args.cache_dir, args.threads),
        daemon=True,
    )
    server.start()
    if not _wait_listening(args.host, port, server, timeout=10):
        print(f"covey worker-rpc: error: could not listen on {endpoint}", file=sys.stderr)
        return 1
    ready = WorkerReady(endpoint, share, ggml.RPC_PROTOCOL_VERSION, os.getpid(), args.cache_dir)
    out.write(json.dumps(asdict(ready)) + "\n")
    out.flush()
    while not stopping.wait(0.5):
        if args.parent_pid and os.getppid() != args.parent_pid:
            print("covey worker-rpc: the node that started it is gone; stopping",
                  file=sys.stderr)
            break
        if not server.is_alive():
            print("covey worker-rpc: error: the RPC server stopped", file=sys.stderr)
            return 1
    # The ggml server has no stop call and blocks in C; leaving the process ends it.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
