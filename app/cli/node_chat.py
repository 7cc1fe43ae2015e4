"""`covey chat --route ROUTE`: chat through this machine's node and its OpenAI API, the same
code path as any other client. The node chooses the machines; the reply says which served it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.cli.chat import chat_settings, interactive, status, system_messages
from app.common.chat_request import CHAT_PATH, ChatReply, chat_body
from app.common.reached import reached_through
from backends.store.bundled import chat_model
from swarm.client.core import NodeClientError
from swarm.client.sync_client import NodeClient


def request_body(args: argparse.Namespace, messages: list[dict[str, str]]) -> dict[str, Any]:
    return chat_body(chat_settings(args), args.model or chat_model(), messages, args.route)


def ask(client: NodeClient, args: argparse.Namespace, messages: list[dict[str, str]],
        echo: bool) -> dict[str, Any]:
    """The reply's summary (what `--json` prints); with `echo`, its text as it comes."""
    events = client.stream_events(CHAT_PATH, request_body(args, messages))
    reply = ChatReply()
    try:
        for event in events:
            piece = reply.add(event)
            if echo and piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:  # hanging up stops the generation on the node
        events.close()
        return ChatReply(finish_reason="cancelled").summary()
    return reply.summary()


def run(args: argparse.Namespace, data_dir: Path) -> int:
    if args.model and ("/" in args.model or args.model.endswith(".gguf")):
        status("covey: error: --route uses the swarm's models: give a model name, not a path")
        return 2
    system = system_messages(args)
    try:
        client = NodeClient.from_data_dir(data_dir, timeout=600)
        if args.prompt is not None:
            reply = ask(client, args, [*system, {"role": "user", "content": args.prompt}],
                        echo=not args.json)
            if args.json:
                print(json.dumps(reply, ensure_ascii=False))
            else:
                print()
                _served(reply)
            return 0
        interactive(lambda msgs: ask(client, args, msgs, echo=True)["text"], system)
    except NodeClientError as exc:
        status(f"covey: error: {exc}")
        return 1
    return 0


def _served(reply: dict[str, Any]) -> None:
    covey, usage = reply.get("covey") or {}, reply.get("usage") or {}
    why = f": {covey['route_reason']}" if covey.get("route_reason") else ""
    machines = covey.get("machines", [])
    status(f"[{usage.get('completion_tokens', '?')} tokens via the {covey.get('route', '?')} "
           f"route on {', '.join(machines) or '?'}"
           f"{reached_through(machines, covey.get('relayed'))}{why}]")
