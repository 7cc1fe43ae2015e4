"""`covey chat`: a terminal chat with a model, one question or an interactive session.

Tokens stream to stdout as they come; status and errors go to stderr, so `--json` output
stays one clean object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from app.common.chat_request import ChatSettings, generate_request
from backends import ggml
from backends.engine import Done, Engine, EngineConfig, EngineError, GenerateRequest, Loaded
from backends.errors import ModelStoreError
from backends.store.bundled import chat_model
from backends.store.model_store import ModelStore

JSON_VERSION = 1


def status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_model(store: ModelStore, model: str | None) -> Path:
    if model:
        return store.resolve(model)
    name = chat_model()
    if name not in store.names():
        status(f"Preparing the bundled model {name} (first run only)...")
    show = _show_progress(name, "Preparing")
    return store.ensure(name, (lambda done, total: show(done / total if total else 0))
                        if show else None).path


def reply_summary(model: Path, loaded: Loaded, done: Done) -> dict[str, Any]:
    """The `--json` object: what was said, with the figures a user or script checks."""
    return {
        "version": JSON_VERSION,
        "model": model.stem,
        "text": done.text,
        "tokens": list(done.tokens),
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens,
        "timings": {**asdict(done.timings), "load_s": loaded.load_s},
        "devices": [asdict(d) for d in loaded.devices],
    }


def _show_progress(name: str, doing: str = "Loading") -> Callable[[float], None] | None:
    """A percentage on one terminal line; nothing when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(fraction: float) -> None:
        sys.stderr.write(f"\r\x1b[K{doing} {name}... {100 * fraction:3.0f}%")
        sys.stderr.flush()

    return show


def _describe(loaded: Loaded) -> str:
    parts = [
        f"{d.endpoint or d.name}: {d.layers} layers" for d in loaded.devices if d.layers
    ] or ["CPU"]
    return f"loaded in {loaded.load_s:.1f} s ({'; '.join(parts)})"


def system_messages(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def chat_settings(args: argparse.Namespace) -> ChatSettings:
    """The sampling options of `covey chat`, with or without --route."""
    return ChatSettings(max_tokens=args.max_tokens, temperature=args.temperature,
                        top_p=args.top_p, repeat_penalty=args.repeat_penalty, seed=args.seed,
                        deterministic=args.deterministic)


def engine_request(args: argparse.Namespace, messages: list[dict[str, str]]) -> GenerateRequest:
    return generate_request(chat_settings(args), messages)


def _stream(engine: Engine, request: GenerateRequest, echo: bool) -> Done:
    """Print the reply as it comes; Ctrl-C ends the reply, not the program."""
    request_id = request.id
    events = engine.generate(request)
    while True:
        try:
            for event in events:
                if isinstance(event, Done):
                    return event
                request_id = event.id
                if echo:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            engine.stop(request_id)
            continue


def interactive(reply: Callable[[list[dict[str, str]]], str],
                system: list[dict[str, str]]) -> None:
    """The chat loop; `reply` prints the answer to a conversation as it comes and returns it."""
    status("Type a message and press Enter. /reset starts over, /exit or Ctrl-D quits.")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            status("(conversation cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("covey> ")
        text = reply(system + history)
        print()
        history.append({"role": "assistant", "content": text})


def run(args: argparse.Namespace, data_dir: Path) -> int:
    if args.tensor_split and len(args.tensor_split) != len(args.rpc):
        status("covey: error: --tensor-split needs one value per --rpc endpoint")
        return 2
    if args.max_tokens < 0:
        status("covey: error: --max-tokens must be 0 or more")
        return 2
    try:
        if args.rpc:
            ggml.check_rpc_support()
        model = resolve_model(ModelStore(data_dir / "models"), args.model)
    except (ModelStoreError, ggml.GgmlUnavailable) as exc:
        status(f"covey: error: {exc}")
        return 1
    config = EngineConfig(
        model_path=str(model),
        rpc_endpoints=args.rpc,
        tensor_split=args.tensor_split,
        n_ctx=args.ctx,
        n_threads=args.threads,
        deterministic=args.deterministic,
    )
    if not args.json:
        status(f"Loading {model.stem}...")
    try:
        with Engine(config) as engine:
            loaded = engine.wait_loaded(None if args.json else _show_progress(model.stem))
            if not args.json:
                status(("\r\x1b[K" if sys.stderr.isatty() else "") + _describe(loaded))
            if args.prompt is None:
                interactive(
                    lambda msgs: _stream(engine, engine_request(args, msgs), echo=True).text,
                    system_messages(args),
                )
                return 0
            messages = [*system_messages(args), {"role": "user", "content": args.prompt}]
            done = _stream(engine, engine_request(args, messages), echo=not args.json)
    except EngineError as exc:
        status(f"covey: error: {exc}")
        return 1
    if args.json:
        print(json.dumps(reply_summary(model, loaded, done), ensure_ascii=False))
    else:
        print()
        t = done.timings
        status(f"[{len(done.tokens)} tokens, prompt {t.prompt_tokens_per_s:.1f} tok/s, "
               f"generation {t.generation_tokens_per_s:.1f} tok/s]")
    return 0
