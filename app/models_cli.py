"""`covey models`: list, import, download and remove the models in this machine's store."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from backends.errors import ModelStoreError
from backends.model_store import ModelStore


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class _Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.drawn = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.drawn < 0.1 and done != total:
            return
        self.drawn = now
        rate = done / max(now - self.started, 1e-6)
        if total:
            bar = "#" * int(30 * done / total)
            line = f"[{bar:<30}] {100 * done / total:5.1f}% {_size(done)} of {_size(total)}"
        else:
            line = f"{_size(done)}"
        sys.stderr.write(f"\r{line} at {_size(rate)}/s ")
        sys.stderr.flush()


def _list(store: ModelStore, as_json: bool) -> None:
    entries = store.list()
    if as_json:
        print(json.dumps([{"name": e.name, "path": str(e.path), "info": e.info.to_dict()}
                          for e in entries]))
        return
    if not entries:
        print("No models yet: `covey chat` sets up the bundled one, or use `covey models "
              "import PATH` / `covey models download URL`.")
        return
    print(f"{'NAME':<32} {'ARCH':<10} {'PARAMS':>8} {'QUANT':<8} {'LAYERS':>6} {'CTX':>7} "
          f"{'SIZE':>10}")
    for e in entries:
        i = e.info
        print(f"{e.name:<32} {i.architecture:<10} {i.parameters / 1e6:>7.0f}M "
              f"{i.quantisation:<8} {i.n_layers:>6} {i.context_length:>7} "
              f"{_size(i.file_size):>10}")


def run(args: argparse.Namespace, data_dir: Path) -> int:
    store = ModelStore(data_dir / "models")
    try:
        if args.models_command == "list":
            _list(store, args.json)
        elif args.models_command == "import":
            try:
                entry = store.import_file(args.path, name=args.name, progress=_Progress())
            finally:
                sys.stderr.write("\n")
            print(f"imported {entry.name}")
        elif args.models_command == "download":
            try:
                entry = store.download(args.url, name=args.name, sha256=args.sha256,
                                       progress=_Progress())
            finally:
                sys.stderr.write("\n")
            print(f"downloaded {entry.name}")
        elif args.models_command == "remove":
            store.remove(args.name)
            print(f"removed {args.name}")
    except KeyboardInterrupt:
        print("covey: download interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    except ModelStoreError as exc:
        print(f"covey: error: {exc}", file=sys.stderr)
        return 1
    return 0
