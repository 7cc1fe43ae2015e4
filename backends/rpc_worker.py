"""A bare ggml RPC worker process: serves this machine's CPU to one llama.cpp client.

A ggml RPC server has no authentication or encryption at all, so it listens on loopback
only, and a node's worker (`--socket`) on a Unix socket only its own user can open (mode
0600, in a folder of mode 0700): no other process reaches it, and other machines reach it
through the node's authenticated relays. Prints one JSON ready line on stdout, then serves
until SIGTERM. Run as `covey worker-rpc` or `python -m backends.rpc_worker`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

from backends import ggml
from backends.compute import physical_cores
from backends.endpoints import UNIX_PREFIX, connect_local, is_loopback, local_endpoint
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


def check_socket_path(path: str) -> None:
    """Refuse a socket path whose folder other users could enter (the socket's own mode
    is set when it is made; the folder keeps anyone out even before that)."""
    folder = os.path.dirname(path)
    if not os.path.isabs(path) or not os.path.isdir(folder):
        raise BindRefused(f"--socket {path}: give an absolute path in an existing folder")
    if os.stat(folder).st_mode & 0o077:
        raise BindRefused(f"--socket {path}: its folder must be private (mode 700)")


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


def _wait_listening(endpoint: str, server: threading.Thread, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.is_alive():
        try:
            with connect_local(local_endpoint(endpoint), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="covey worker-rpc", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    p.add_argument("--socket", metavar="PATH",
                   help="listen on a Unix socket (mode 0600) at PATH instead of TCP; its "
                        "folder must be private (mode 700)")
    p.add_argument("--share-mib", type=int, help="memory donated, MiB (default: half of RAM)")
    p.add_argument("--cache-dir", help="tensor cache folder (speeds up reloading big models)")
    p.add_argument("--threads", type=int, default=physical_cores(),
                   help="compute threads (default: the physical cores)")
    p.add_argument("--unsafe-bind", action="store_true", help="allow a non-loopback address")
    p.add_argument("--parent-pid", type=int,
                   help="exit when this process (the node that started it) is gone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.socket:
            check_socket_path(args.socket)
        else:
            check_bind(args.host, args.unsafe_bind)
        share = resolve_share(args.share_mib, memory_bytes().total)
        ggml.check_rpc_support()
        if args.socket:
            ggml.check_unix_socket_support()
    except (BindRefused, ValueError, ggml.GgmlUnavailable) as exc:
        print(f"covey worker-rpc: error: {exc}", file=sys.stderr)
        return 2
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # ggml's banner and logs go to stderr; stdout carries only the ready line
    if args.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)  # a socket left by a worker that was killed
        endpoint = UNIX_PREFIX + args.socket
    else:
        endpoint = f"{args.host}:{args.port or free_port(args.host)}"
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
    if not _wait_listening(endpoint, server, timeout=10):
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
    if args.socket:
        with contextlib.suppress(OSError):
            os.unlink(args.socket)
    # The ggml server has no stop call and blocks in C; leaving the process ends it.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
