"""`covey node`: turn command-line options and remembered settings into a running Node.

A token given once is remembered (0600) in the data directory, so later starts need no
options. It comes from a file (--token-file) or standard input (--token -) so that it never
sits in the process's command line, which every local user can read; --token TOKEN still
works, with a warning. SIGTERM and Ctrl-C stop the node cleanly: goodbye to peers, API file
removed.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import sys
from pathlib import Path
from typing import IO, TextIO, TypeVar

import trio

from backends.endpoints import split_host_port
from swarm.api.cors import check_host_name, normalize_origin
from swarm.api.server import MIN_NETWORK_KEY_CHARS
from swarm.exception_groups import first_leaf
from swarm.node.fd_limit import raise_open_file_limit
from swarm.node.settings import Settings, SettingsError, load_settings, save_settings
from swarm.trust.identity import IdentityError
from swarm.trust.token import TokenError, check_bootstrap_address, parse_token

log = logging.getLogger("covey.node")

LOCK_FILE = "node.lock"
# "0" turns model copies over the direct TLS path off (both ways): benchmarks, debugging
DIRECT_COPY_ENV = "COVEY_DIRECT_COPY"
_Number = TypeVar("_Number", int, float)
STDIN_TOKEN = "-"
TOKEN_ON_COMMAND_LINE = (
    "covey: warning: a token given as --token TOKEN can be read by every user of this machine "
    "while the node runs (it is on the command line). Use --token-file FILE, or --token - to "
    "read it from standard input."
)


def token_option(token: str | None, token_file: Path | None, stdin: TextIO) -> str | None:
    """The token given with --token, --token - (one line of `stdin`) or --token-file, or None
    when none of them was; TokenError when the file or standard input gives nothing usable."""
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"cannot read the token from --token-file {token_file}: {exc}"
                             ) from None
        source = f"--token-file {token_file}"
    elif token == STDIN_TOKEN:
        text = getpass.getpass("Swarm token: ") if stdin.isatty() else stdin.readline()
        source = "standard input (--token -)"
    else:
        return token
    if not text.strip():
        raise TokenError(f"no token in {source}: it is empty")
    return text.strip()


def resolve_settings(args: argparse.Namespace, data_dir: Path) -> Settings:
    """The settings to run with: options override what is remembered; raises on bad input."""
    saved = load_settings(data_dir)
    given = token_option(args.token, getattr(args, "token_file", None), sys.stdin)
    token_text = given or (saved.token if saved else None)
    if not token_text:
        raise TokenError(
            "This node has no swarm token yet. Create one with `covey token new`, or paste the "
            "one from another machine: covey node --token-file FILE (or --token -, reading "
            "standard input)"
        )
    parse_token(token_text)
    for i, addr in enumerate(args.bootstrap, 1):
        check_bootstrap_address(addr, i)
    remote = getattr(args, "remote_prompts", None)
    upnp = getattr(args, "upnp", None)
    prefer = getattr(args, "prefer_route", None)
    return Settings(
        token=token_text.strip(),
        name=args.name or (saved.name if saved else None),
        bootstrap=list(args.bootstrap) or (saved.bootstrap if saved else []),
        remote_prompts=remote if remote is not None else (saved.remote_prompts if saved else True),
        prefer_route=prefer or (saved.prefer_route if saved else "auto"),
        ctx=_ctx_setting(getattr(args, "ctx", None), saved),
        relay_max_circuits=_remembered(getattr(args, "relay_max_circuits", None),
                                       saved.relay_max_circuits if saved else None),
        relay_rate_mib=_remembered(getattr(args, "relay_rate_mib", None),
                                   saved.relay_rate_mib if saved else None),
        relay_circuit_mib=_remembered(getattr(args, "relay_circuit_mib", None),
                                      saved.relay_circuit_mib if saved else None),
        upnp=upnp if upnp is not None else (saved.upnp if saved else True),
    )


def _ctx_setting(given: int | None, saved: Settings | None) -> int | None:
    """--ctx N is remembered; --ctx 0 goes back to automatic (None)."""
    return _remembered(given, saved.ctx if saved else None)


def _remembered(given: _Number | None, saved: _Number | None) -> _Number | None:
    """An option given is remembered; not given, the remembered value stays; 0 goes back to
    the default (None)."""
    if given is None:
        return saved
    return given or None


class AlreadyRunning(Exception):
    pass


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold an exclusive lock for the node's lifetime: two nodes must never share one identity.

    The lock goes with the process, so a crash never leaves a stale one behind."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / LOCK_FILE).open("a+b")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; the API port still tells the story
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise AlreadyRunning(
            f"A Covey node is already running with data directory {data_dir}. "
            "Stop it first, or use another --data-dir."
        ) from None
    return handle


def main(args: argparse.Namespace, data_dir: Path) -> int:
    level = os.environ.get("COVEY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # py-libp2p logs routine network churn as warnings; keep our own log readable.
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    if args.token not in (None, STDIN_TOKEN):
        print(TOKEN_ON_COMMAND_LINE, file=sys.stderr)
    raise_open_file_limit()
    try:
        settings = resolve_settings(args, data_dir)
        lock = lock_data_dir(data_dir)
        save_settings(data_dir, settings)
        node = _make_node(args, data_dir, settings)
    except AlreadyRunning as exc:
        print(f"covey: {exc}", file=sys.stderr)
        return 1
    except (TokenError, SettingsError, IdentityError, ValueError) as exc:
        print(f"covey: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_serve, node)
    except KeyboardInterrupt:
        pass
    except (OSError, BaseExceptionGroup) as exc:
        error = first_leaf(exc, OSError)
        if error is None:
            raise
        print(f"covey: could not start the node: {error}", file=sys.stderr)
        return 1
    finally:
        lock.close()
    return 0


def _make_node(args: argparse.Namespace, data_dir: Path, settings: Settings):  # -> Node
    from backends.memory import memory_bytes
    from backends.store.bundled import chat_model, prepare_at_start
    from swarm.net.host import parse_multiaddrs
    from swarm.node.daemon import DEFAULT_LISTEN, Node, NodeConfig
    from swarm.node.local_facts import default_node_name
    from swarm.routes.auto import RoutePrefs
    from swarm.workers.worker import share_bytes

    listen = tuple(args.listen) or DEFAULT_LISTEN
    for addr in parse_multiaddrs(listen):  # raises ValueError naming a malformed address
        names = [p.name for p in addr.protocols()]
        if names != ["ip4", "tcp"]:
            raise ValueError(
                f"--listen {addr}: Covey listens on IPv4 TCP only, e.g. /ip4/0.0.0.0/tcp/0"
            )
    api_listen, api_key = _network_api(args)
    config = NodeConfig(
        data_dir=data_dir,
        token=parse_token(settings.token),
        name=settings.name or default_node_name(),
        listen=listen,
        api_port=args.api_port,
        lan_only=args.lan_only,
        bootstrap=tuple(settings.bootstrap),
        api_listen=api_listen,
        api_key=api_key,
        federated_model=(args.model or chat_model()) if args.federated else None,
        upload_limit_bytes_s=(args.upload_limit_mib * (1 << 20)
                              if args.upload_limit_mib else None),
        direct_copy=os.environ.get(DIRECT_COPY_ENV, "").strip() != "0",
        threads=args.threads,
        bundled_models=tuple(name for name in [prepare_at_start(args.prepare_at_start)] if name),
        ctx=settings.ctx,
        cors_origins=_cors_origins(getattr(args, "cors_origin", None) or []),
        api_hosts=tuple(check_host_name(n) for n in getattr(args, "api_host", None) or []),
        worker_share_bytes=(share_bytes(args.share_mib, args.share_percent,
                                        memory_bytes().total) if args.worker else None),
        routing=RoutePrefs(settings.remote_prompts, settings.prefer_route),
        relay=getattr(args, "relay", None),
        relay_limits=settings.relay_limits(),
        upnp=settings.upnp,
    )
    return Node(config)


def _cors_origins(given: list[str]) -> tuple[str, ...]:
    try:
        return tuple(normalize_origin(o) for o in given)
    except ValueError as exc:
        raise ValueError(f"--cors-origin: {exc}") from None


def _network_api(args: argparse.Namespace) -> tuple[tuple[str, int] | None, str | None]:
    """--api-listen ADDR:PORT, allowed only with an API key (--api-key-file or $COVEY_API_KEY)."""
    if not args.api_listen:
        return None, None
    try:
        host, port = split_host_port(args.api_listen)
    except ValueError as exc:
        raise ValueError(f"--api-listen: {exc}") from None
    key = os.environ.get("COVEY_API_KEY", "")
    if args.api_key_file:
        try:
            key = args.api_key_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --api-key-file: {exc}") from None
    if len(key) < MIN_NETWORK_KEY_CHARS:
        raise ValueError(
            "--api-listen exposes the OpenAI API beyond this machine, so it needs an API key "
            f"of at least {MIN_NETWORK_KEY_CHARS} characters: --api-key-file FILE or "
            "$COVEY_API_KEY. Clients send it as `Authorization: Bearer KEY`."
        )
    return (host, port), key


async def _serve(node) -> None:  # node: swarm.node.daemon.Node
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                log.info("stopping")
                node.stop()
                break
