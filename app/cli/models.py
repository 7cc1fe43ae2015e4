"""`covey models`: list, import, download, copy, rename and remove the models in this
machine's store.

Copying from peers runs in the node (`covey node`); this command starts it and shows progress.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from backends.errors import ModelStoreError
from backends.sizes import human_bytes
from backends.store.model_store import ModelStore
from swarm.client.core import NodeClientError
from swarm.client.sync_client import NodeClient


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
            line = f"[{bar:<30}] {100 * done / total:5.1f}% "
            line += f"{human_bytes(done)} of {human_bytes(total)}"
        else:
            line = human_bytes(done)
        sys.stderr.write(f"\r{line} at {human_bytes(rate)}/s ")
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
              f"{human_bytes(i.file_size):>10}")


def _copy_from_swarm(data_dir: Path, name: str, sha256: str | None) -> int:
    """Start the node's copy of `name`, draw its progress until it ends; Ctrl-C cancels it."""
    try:
        client = NodeClient.from_data_dir(data_dir)
        job = client.post_json("/api/models/copy", {"model": name, "sha256": sha256})
    except NodeClientError as exc:
        print(f"covey: error: {exc}", file=sys.stderr)
        return 1
    progress, said = _Progress(), set()
    try:
        while job["state"] in ("waiting", "running", "verifying"):
            progress(job["done"], job["size"])
            for line in (f"from {job['source']}" if job["source"] else None, job["notice"]):
                if line and line not in said:
                    said.add(line)
                    sys.stderr.write(f"\n{line}\n")
            time.sleep(0.2)
            copies = client.get_json("/api/models")["copies"]
            job = next(c for c in copies if c["model"] == name)
        progress(job["done"], job["size"])
    except KeyboardInterrupt:
        client.post_json("/api/models/copy", {"model": name, "cancel": True})
        print("\ncovey: copy cancelled; run the same command again to resume", file=sys.stderr)
        return 130
    except NodeClientError as exc:
        print(f"\ncovey: error: {exc}", file=sys.stderr)
        return 1
    sys.stderr.write("\n")
    if job["state"] != "done":
        print(f"covey: error: {job['error']}", file=sys.stderr)
        return 1
    print(f"copied {name} from {' and '.join(job['sources'])} (sha256 {job['sha256']} verified)")
    return 0


def _rename(store: ModelStore, old: str, new: str) -> int:
    """`covey models rename OLD NEW`; a rename the store refuses (no such model, the name taken
    or not valid, a bundled model) changes nothing and exits 1 with the store's reason, like
    the other `covey models` commands."""
    try:
        entry = store.rename(old, new)
    except ModelStoreError as exc:
        print(f"covey: error: {exc}", file=sys.stderr)
        return 1
    print(f"renamed {old} to {entry.name}")
    return 0


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
        elif args.models_command == "copy":
            return _copy_from_swarm(data_dir, args.name, args.sha256)
        elif args.models_command == "rename":
            return _rename(store, args.old, args.new)
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
