"""`covey token`, `covey node` and `covey peers`: the swarm from the command line.

`covey node` runs the node daemon in this process; `covey peers` is a client of a running
node's local API, found through the data directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.cli.options import shared_options
from app.common.elapsed import ago
from backends.sizes import GiB, human_bytes
from swarm.net.relay_limits import MiB, RelayLimits
from swarm.node.settings import RELAY_MAX
from swarm.routes.auto import PREFERABLE
from swarm.trust.token import TokenError, new_token


def add_parsers(sub: argparse._SubParsersAction) -> None:
    here = shared_options()

    token = sub.add_parser("token", help="create a swarm token")
    tsub = token.add_subparsers(dest="token_command", required=True)
    tnew = tsub.add_parser("new", help="print a new swarm token (one line)")
    tnew.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                      help="a reachable node of this swarm, /ip4/…/tcp/…/p2p/…; repeatable")

    node = sub.add_parser("node", parents=[here], help="run this machine's swarm node")
    tokens = node.add_mutually_exclusive_group()
    tokens.add_argument("--token-file", type=Path, metavar="FILE",
                        help="read the swarm token from FILE (remembered after the first time)")
    tokens.add_argument("--token", metavar="TOKEN",
                        help="the swarm token; `-` reads it from standard input. Given here, "
                             "other users of this machine can read it: prefer --token-file")
    node.add_argument("--name", help="the name other machines see (default: host name)")
    node.add_argument("--listen", action="append", default=[], metavar="MULTIADDR",
                      help="default /ip4/0.0.0.0/tcp/0 (all interfaces, any free port)")
    node.add_argument("--api-port", type=int, default=0, help="local API port (0: any free)")
    node.add_argument("--threads", type=_positive_int, metavar="N",
                      help="CPU threads for the engine (default: the physical cores)")
    node.add_argument("--ctx", type=_whole_number, metavar="N",
                      help="context length in tokens (remembered; 0: automatic, the default: "
                           "the model's trained context capped by memory, 4096 when sharded)")
    node.add_argument("--lan-only", action="store_true", help="no DHT: find peers by mDNS only")
    node.add_argument("--api-listen", metavar="ADDR:PORT",
                      help="also serve the OpenAI API (/v1) on this network address; "
                           "needs an API key")
    node.add_argument("--api-host", action="append", default=[], metavar="NAME",
                      help="also answer API requests whose Host is NAME (e.g. "
                           "host.docker.internal for a container); repeatable")
    node.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                      help="let web pages from ORIGIN (e.g. http://localhost:3000) call the "
                           "API from a browser; repeatable. Default: none")
    node.add_argument("--federated", action="store_true",
                      help="serve whole requests for the swarm (with --model, default bundled)")
    node.add_argument("--model", help="the model --federated serves (a name in the store)")
    node.add_argument("--worker", action="store_true",
                      help="donate memory: hold a share of other machines' models (RPC worker)")
    share = node.add_mutually_exclusive_group()
    share.add_argument("--share-mib", type=int, help="memory donated in worker mode, MiB")
    share.add_argument("--share-percent", type=float,
                       help="memory donated in worker mode, percent of RAM (default 50)")
    node.add_argument("--upload-limit-mib", type=_positive_mib, metavar="MIB_PER_S",
                      help="cap on sending model copies to peers, MiB/s (default: no cap)")
    node.add_argument("--api-key-file", type=Path, metavar="FILE",
                      help="the API key for --api-listen (or set $COVEY_API_KEY)")
    node.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                      help="a reachable node of this swarm; repeatable")
    node.add_argument("--relay", action=argparse.BooleanOptionalAction,
                      help="relay connections between the swarm's members that cannot reach "
                           "each other (members only, with limits; default: when this machine "
                           "has a public address)")
    node.add_argument("--relay-max-circuits", type=_relay_bound("relay_max_circuits", int),
                      metavar="N",
                      help="as a relay: circuits open at once, all members together "
                           f"(remembered; 0: the default, {RelayLimits().max_circuits})")
    node.add_argument("--relay-rate-mib", type=_relay_bound("relay_rate_mib", float),
                      metavar="MIB_PER_S",
                      help="as a relay: MiB/s relayed, all circuits together (remembered; 0: "
                           f"the default, {RelayLimits().rate_bytes_s / MiB:g})")
    node.add_argument("--relay-circuit-mib", type=_relay_bound("relay_circuit_mib", int),
                      metavar="MIB",
                      help="as a relay: MiB one circuit carries before it is ended (remembered; "
                           f"0: the default, {RelayLimits().circuit_bytes // MiB})")
    node.add_argument("--upnp", action=argparse.BooleanOptionalAction,
                      help="when this machine cannot be reached from the internet, ask the "
                           "router (UPnP) to forward the swarm's port to it; remembered, on at "
                           "first (--no-upnp: never)")
    node.add_argument("--remote-prompts", action=argparse.BooleanOptionalAction,
                      help="may prompts go to other machines (federated and sharded routes); "
                           "remembered, on at first")
    node.add_argument("--prefer-route", choices=PREFERABLE,
                      help="the route `auto` takes first when it can serve (remembered; "
                           "default auto: this machine when the model fits)")
    # Tests and development name their default (COVEY_DEFAULT_MODEL), which leaves assembling
    # it to first use; the first-run test asks for a user's start all the same.
    node.add_argument("--prepare-at-start", action="store_true", help=argparse.SUPPRESS)

    peers = sub.add_parser("peers", parents=[here], help="list the machines in this node's swarm")
    peers.add_argument("--json", action="store_true", help="a machine-readable list")


def run_token(args: argparse.Namespace) -> int:
    try:
        token = new_token(args.bootstrap)
    except TokenError as exc:
        print(f"covey: {exc}", file=sys.stderr)
        return 2
    print(token.encode())
    if sys.stderr.isatty():
        print("Join other machines with: covey node --token-file FILE (FILE holding the line "
              "above), or covey node --token - (pasting it)", file=sys.stderr)
    return 0


def run_node(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.node.main import main as node_main

    return node_main(args, data_dir)


def run_peers(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.client.core import NodeClientError
    from swarm.client.sync_client import NodeClient

    try:
        body = NodeClient.from_data_dir(data_dir).get_json("/api/peers")
    except NodeClientError as exc:
        print(f"covey: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body["peers"], indent=2))
    else:
        print(format_peers(body["peers"], time.time()))
    return 0


def format_peers(peers: list[dict[str, Any]], now: float) -> str:
    """The `covey peers` table: this node first, then online peers, then offline ones."""
    header = ("NAME", "PEER", "STATUS", "LINK", "OS", "CORES", "RAM FREE/TOTAL", "ROLES",
              "DONATES", "MODELS", "SEEN")
    order = sorted(peers, key=lambda p: (not p.get("self"), not p.get("online"), p["name"]))
    rows = [header] + [_row(p, now) for p in order]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    if len(peers) <= 1:
        lines.append("(no other machines yet: start `covey node` with the same token on them)")
    return "\n".join(lines)


def _row(p: dict[str, Any], now: float) -> tuple[str, ...]:
    status = "this node" if p.get("self") else ("online" if p.get("online") else "offline")
    link = "-" if p.get("self") else (
        (p.get("link") or "direct") if p.get("connected") else "via swarm")
    seen = "now" if p.get("self") else ago(now - p.get("last_seen", now), compact=True)
    ram = f"{p.get('ram_free', 0) / GiB:.1f}/{p.get('ram_total', 0) / GiB:.1f} GiB"
    worker = p.get("worker")
    donates = "-" if not worker else (
        human_bytes(worker["donated_bytes"]) + (" (leased)" if worker["state"] == "leased"
                                                else ""))
    return (p.get("name", "?"), p["peer_id"][-8:], status, link, p.get("os", "?"),
            str(p.get("cores", "?")), ram, ",".join(p.get("roles", [])) or "-", donates,
            ",".join(p.get("shares_models", [])) or "-", seen)


def _positive_mib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of MiB/s")
    return value


def _relay_bound(key: str, kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type for a relay setting: 0 (the default) up to its bound."""
    most = RELAY_MAX[key]

    def check(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if not 0 <= value <= most:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} from 0 to {most}")
        return value

    return check


def _whole_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)
