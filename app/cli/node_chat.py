"""`covey chat --route ROUTE`: chat through this machine's node and its OpenAI API, the same
code path as any other client. The node chooses the machines; the reply says which served it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.cli.chat import interactive, status
from backends.model_store import DEFAULT_MODEL
from swarm.client.core import NodeClientError
from swarm.client.sync_client import NodeClient


def request_body(args: argparse.Namespace, messages: list[dict[str, str]]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model or DEFAULT_MODEL,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
        "covey_route": args.route,
    }
    if args.seed is not None:
        body["seed"] = args.seed
    if args.deterministic:
        body["covey_deterministic"] = True
    return body


def collect(events: Iterator[dict[str, Any]], echo: bool) -> dict[str, Any]:
    """Print the streamed text as it comes; the summary `--json` prints at the end."""
    text, finish, usage, covey = [], None, None, None
    for event in events:
        covey = event.get("covey", covey)
        usage = event.get("usage") or usage
        for choice in event.get("choices", []):
            piece = choice.get("delta", {}).get("content") or ""
            text.append(piece)
            finish = choice.get("finish_reason") or finish
            if echo and piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
    return {"version": 1, "text": "".join(text), "finish_reason": finish, "usage": usage,
            "covey": covey}


def ask(client: NodeClient, args: argparse.Namespace, messages: list[dict[str, str]],
        echo: bool) -> dict[str, Any]:
    events = client.stream_events("/v1/chat/completions", request_body(args, messages))
    try:
        return collect(events, echo)
    except KeyboardInterrupt:  # hanging up stops the generation on the node
        events.close()
        return {"version": 1, "text": "", "finish_reason": "cancelled", "usage": None,
                "covey": None}


def run(args: argparse.Namespace, data_dir: Path) -> int:
    if args.model and ("/" in args.model or args.model.endswith(".gguf")):
        status("covey: error: --route uses the swarm's models: give a model name, not a path")
        return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
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
    status(f"[{usage.get('completion_tokens', '?')} tokens via the {covey.get('route', '?')} "
           f"route on {', '.join(covey.get('machines', [])) or '?'}]")
