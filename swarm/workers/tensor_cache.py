"""The worker's tensor cache folder, kept within a size cap.

ggml's RPC server can keep large tensors it was sent in files named by their hash, so a client
that loads the same model again sends hashes instead of weights. Members may no longer write it
(swarm/workers/rpc_guard.py), but a cache left by an older Covey can still hold gigabytes:
when worker mode starts, the oldest files go until the folder fits its cap (the donated share by
default, so a worker never keeps more on disk than it offers in memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedFile:
    path: Path
    size: int
    mtime: float


def files_to_evict(files: list[CachedFile], cap_bytes: int) -> list[CachedFile]:
    """The oldest files whose removal brings the total to `cap_bytes` or less."""
    total = sum(f.size for f in files)
    evict: list[CachedFile] = []
    for f in sorted(files, key=lambda f: (f.mtime, str(f.path))):
        if total <= cap_bytes:
            break
        evict.append(f)
        total -= f.size
    return evict


def _listing(folder: Path) -> list[CachedFile]:
    files = []
    for path in folder.iterdir():
        try:
            info = path.lstat()
        except OSError:
            continue  # gone meanwhile
        if path.is_file() and not path.is_symlink():
            files.append(CachedFile(path, info.st_size, info.st_mtime))
    return files


def prune(folder: Path, cap_bytes: int) -> int:
    """Remove the oldest files in `folder` until it holds at most `cap_bytes`; returns the
    bytes freed. A file that cannot be removed is logged and skipped."""
    if not folder.is_dir():
        return 0
    freed = 0
    for f in files_to_evict(_listing(folder), cap_bytes):
        try:
            f.path.unlink()
        except OSError as exc:
            log.warning("cannot remove %s from the tensor cache: %s", f.path.name, exc)
            continue
        freed += f.size
    if freed:
        log.info("tensor cache: removed %d MiB of the oldest files to stay within %d MiB",
                 freed >> 20, cap_bytes >> 20)
    return freed
