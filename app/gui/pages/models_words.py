"""What the models page says, as pure functions: its rows, the progress bar's label, and a
failed download or import named in plain words. The page (models.py) only draws these."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from backends.sizes import human_bytes
from backends.store.download import DownloadCancelled, DownloadError
from backends.store.model_store import (
    DiskFull,
    DuplicateModel,
    HashMismatch,
    InvalidModelFile,
    InvalidModelName,
    ModelExists,
)
from backends.store.suggested import SuggestedModel

ROUTE_WORDS = {"local": "this machine", "sharded": "spread over workers",
               "federated": "served by a peer"}
RATE_WINDOW_S = 3.0  # the speed shown is the average over this long
EMPTY_WORDS = ("No models on this machine yet. Download one of the suggested models below with "
               "one click, or import a GGUF file you already have (Import GGUF file…).")
# Why a download stopped, in the words its message starts with (DownloadError.kind).
DOWNLOAD_FAILURES = {
    "bad_url": "Bad URL",
    "not_found": "Not found on the server",
    "refused": "The server refused it",
    "unreachable": "Cannot reach the server",
    "connection_lost": "Connection lost",
    "server_error": "The server keeps failing",
    "write_failed": "Cannot save the file",
}


def model_rows(local: list[dict[str, Any]], models: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model name: local store entries merged with what peers offer and what the
    swarm can run now."""
    rows: dict[str, dict[str, Any]] = {}
    for m in local:
        rows[m["name"]] = {"name": m["name"], "size": m["size"], "local": True, "peers": [],
                           "facts": m.get("facts")}
    for m in models.get("swarm", []):
        row = rows.setdefault(m["name"], {"name": m["name"], "size": m["size"],
                                          "local": False, "peers": [], "facts": None})
        row["peers"] += [p for p in m.get("machines", []) if p not in row["peers"]]
    runnable = {m["id"]: m.get("covey", {}) for m in models.get("runnable", [])}
    for model_id, where in runnable.items():  # the bundled model, before its first use
        if model_id not in rows and "local" in where.get("routes", []):
            rows[model_id] = {"name": model_id, "size": 0, "local": True, "peers": [],
                              "facts": None}
    for row in rows.values():
        where = runnable.get(row["name"])
        row["runs"] = ", ".join(ROUTE_WORDS.get(r, r) for r in where.get("routes", [])
                                ) if where else (
            "copy it here first" if not row["local"] else "does not fit")
    return sorted(rows.values(), key=lambda r: (not r["local"], r["name"]))


def rate(samples: Sequence[tuple[float, int]], window_s: float = RATE_WINDOW_S) -> float:
    """Bytes per second over the last `window_s` of (time, bytes done) samples; 0 until two
    samples are at least a moment apart."""
    if not samples:
        return 0.0
    now, done = samples[-1]
    first = next((s for s in samples if now - s[0] <= window_s), samples[-1])
    elapsed = now - first[0]
    return max(done - first[1], 0) / elapsed if elapsed > 0.05 else 0.0


def progress_words(done: int, total: int | None, bytes_per_s: float) -> str:
    """The progress bar's label: "117.3 MiB of 468.6 MiB, 11.4 MiB/s"."""
    amount = f"{human_bytes(done)} of {human_bytes(total)}" if total else (
        f"{human_bytes(done)} so far")
    return f"{amount}, {human_bytes(bytes_per_s)}/s" if bytes_per_s > 0 else amount


def failure_words(what: str, exc: Exception) -> str:
    """A failed import or download ("Download", "Import"), headed by why in plain words."""
    if isinstance(exc, DuplicateModel):
        return f"Already there: {exc}"
    if isinstance(exc, DownloadCancelled):
        return str(exc)
    if isinstance(exc, DownloadError):
        headline = DOWNLOAD_FAILURES.get(exc.kind, "Failed")
    elif isinstance(exc, DiskFull):
        headline = "Disk full"
    elif isinstance(exc, HashMismatch):
        headline = "Checksum mismatch (not the file expected)"
    elif isinstance(exc, InvalidModelFile):
        headline = "Not a GGUF model"
    elif isinstance(exc, InvalidModelName | ModelExists):
        headline = "Name not possible"
    else:
        headline = "Failed"
    return f"{what} failed — {headline}. {exc}"


def suggestion_rows(suggested: Iterable[SuggestedModel], have: set[str]
                    ) -> list[tuple[SuggestedModel, list[str], bool]]:
    """Per suggested model: its cells (name, description, download size, license) and whether
    it is already on this machine (then there is nothing to download)."""
    return [(m, [m.name, m.description, f"about {human_bytes(m.size)}", m.license],
             m.name in have) for m in suggested]
