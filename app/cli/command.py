"""The `covey` command: parses arguments and hands each subcommand to its module."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from app.cli import swarm as swarm_cli
from app.cli.options import chosen_data_dir, shared_options
from app.common.chat_request import DEFAULTS
from backends.endpoints import split_host_port


def _endpoints(text: str) -> tuple[str, ...]:
    endpoints = tuple(e.strip() for e in text.split(",") if e.strip())
    for e in endpoints:
        try:
            split_host_port(e)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return endpoints


def _split(text: str) -> tuple[float, ...]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError("tensor split values must be >= 0 with a positive sum")
    return parts


def build_parser() -> argparse.ArgumentParser:
    here = shared_options()
    parser = argparse.ArgumentParser(
        prog="covey", description="Run large language models on the computers you own.",
        parents=[here],
    )
    sub = parser.add_subparsers(dest="command")

    chat = sub.add_parser("chat", parents=[here],
                          help="chat with a model (interactive without PROMPT)")
    chat.add_argument("prompt", nargs="?", help="ask one question and exit")
    chat.add_argument("--model", help="a model name from `covey models list`, or a GGUF path")
    chat.add_argument("--rpc", type=_endpoints, default=(), help="RPC workers, HOST:PORT,...")
    chat.add_argument("--tensor-split", type=_split, help="share of layers per RPC worker")
    chat.add_argument("--max-tokens", type=int, default=DEFAULTS.max_tokens)
    chat.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    chat.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    chat.add_argument("--repeat-penalty", type=float, default=DEFAULTS.repeat_penalty,
                      help="1.0 turns it off")
    chat.add_argument("--seed", type=int, default=DEFAULTS.seed)
    chat.add_argument("--ctx", type=int, default=4096, help="context length in tokens")
    chat.add_argument("--threads", type=int, help="CPU threads for the engine")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument(
        "--deterministic",
        action="store_true",
        help="no CPU weight repacking: greedy output identical however layers are split",
    )
    chat.add_argument("--json", action="store_true", help="print one JSON object at the end")
    chat.add_argument(
        "--route",
        choices=("auto", "local", "sharded", "federated"),
        help="chat through this machine's running node and its OpenAI API on this route",
    )

    models = sub.add_parser("models", help="list, import, download, copy, rename or remove models")
    msub = models.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("list", parents=[here], help="the models in the store")
    ls.add_argument("--json", action="store_true")
    imp = msub.add_parser("import", parents=[here], help="copy a GGUF file into the store")
    imp.add_argument("path", type=Path)
    imp.add_argument("--name")
    dl = msub.add_parser("download", parents=[here],
                         help="download a GGUF by URL (resumable)")
    dl.add_argument("url")
    dl.add_argument("--name")
    dl.add_argument("--sha256", help="expected sha256 of the file")
    rm = msub.add_parser("remove", parents=[here], help="delete a model from the store")
    rm.add_argument("name")
    mv = msub.add_parser("rename", parents=[here], help="give a model in the store another name")
    mv.add_argument("old")
    mv.add_argument("new")
    cp = msub.add_parser("copy", parents=[here], help="copy a model from a peer in the swarm "
                         "(resumable; needs a running node)")
    cp.add_argument("name", help="the model's name, as peers offer it")
    cp.add_argument("--sha256", help="the exact file, when peers offer different ones")

    sub.add_parser("worker-rpc", help="run a bare RPC worker on loopback", add_help=False)
    swarm_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # e.g. `covey chat ... | head -1`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet exit flush
        return 0


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "worker-rpc":  # its options are its own module's to parse
        from backends import rpc_worker

        return rpc_worker.main(rest)
    args = parser.parse_args(argv)
    data_dir = chosen_data_dir(args)
    if args.command == "token":
        return swarm_cli.run_token(args)
    if args.command == "node":
        return swarm_cli.run_node(args, data_dir)
    if args.command == "peers":
        return swarm_cli.run_peers(args, data_dir)
    if args.command == "models":
        from app.cli import models as models_cli

        return models_cli.run(args, data_dir)
    if args.command is None:
        from app.gui import launch as gui

        return gui.run(data_dir)
    from app.cli import chat as chat_cli

    if args.route:
        from app.cli import node_chat

        return node_chat.run(args, data_dir)
    return chat_cli.run(args, data_dir)


if __name__ == "__main__":
    sys.exit(main())
