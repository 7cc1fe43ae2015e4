"""One process changing a model store, for tests that race several such processes.

Run as `python -m tests.support.store_race ROOT GO OP...`. It prints "ready", waits until the
file GO exists (so racers start together), then runs each OP once and prints a JSON list of
[OP, outcome], the outcome being "ok" or the class name of the error it raised. An OP is
`import:NAME:SOURCE`, `remove:NAME` or `list` (which checks that every listed model has its
recorded manifest); with a leading "*" it is tried again until it succeeds (all retries of
one process stop 10 s after GO).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from backends.store.model_store import ModelStore

RETRY_FOR_S = 10


def run_until_ok(store: ModelStore, op: str, deadline: float) -> str:
    if not op.startswith("*"):
        return run(store, op)
    while (outcome := run(store, op[1:])) != "ok" and time.monotonic() < deadline:
        time.sleep(0.001)  # leave the CPU to the racer this one waits for
    return outcome


def run(store: ModelStore, op: str) -> str:
    action, _, rest = op.partition(":")
    try:
        if action == "import":
            name, _, source = rest.partition(":")
            store.import_file(source, name=name)
        elif action == "remove":
            store.remove(rest)
        elif action == "list":
            # Every model in these races is added with a manifest: one listed without it lost
            # its metadata to a remove racing the add.
            if any(entry.manifest.sha256 is None for entry in store.list()):
                return "ManifestLost"
        else:
            raise ValueError(f"unknown op {op!r}")
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
        return type(exc).__name__
    return "ok"


def main(argv: list[str]) -> None:
    root, go, *ops = argv
    store = ModelStore(Path(root))
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise SystemExit("nobody said go")
        time.sleep(0.001)
    retry_until = time.monotonic() + RETRY_FOR_S
    print(json.dumps([[op, run_until_ok(store, op, retry_until)] for op in ops]))


if __name__ == "__main__":
    main(sys.argv[1:])
