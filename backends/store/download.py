"""Downloading one file over HTTP(S) into a partial file that survives interruptions.

Owns resuming (HTTP Range from what is already on disk), retrying with backoff, progress,
cancellation and the disk-full case. Finishing the file (hash, validation, rename) belongs to
the model store. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from backends.errors import ModelStoreError

CHUNK_BYTES = 1 << 20
PROGRESS_INTERVAL_S = 0.1
USER_AGENT = "Covey/0.1 (model download)"
# Worth retrying: the server or something in between is busy or broke, not the request.
_RETRY_STATUSES = frozenset({408, 425, 429})
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.IGNORECASE)

Progress = Callable[[int, int | None], None]
# Why a download failed, for words a person reads (see DownloadError.kind).
DownloadFailure = Literal["bad_url", "not_found", "refused", "unreachable", "connection_lost",
                          "server_error", "write_failed"]


class DownloadError(ModelStoreError):
    """The download failed for good (bad URL, a 4xx answer, or retries used up); `kind`
    says which way."""

    def __init__(self, message: str, kind: DownloadFailure = "bad_url") -> None:
        super().__init__(message)
        self.kind: DownloadFailure = kind


class DownloadCancelled(ModelStoreError):
    """The caller cancelled; the partial file is kept so a later download resumes it."""


class DiskFull(ModelStoreError):
    """The disk filled up while writing; the partial file is kept."""


@dataclass(frozen=True)
class _Answer:
    """How the server answered one request, reduced to what the copy loop needs."""

    append: bool  # True: the body continues the partial file (206)
    total: int | None  # full size of the file, when the server said
    body_length: int | None  # bytes this body should carry, when the server said


class _Retryable(Exception):
    """Internal: this attempt failed in a way the next attempt may not."""

    def __init__(self, message: str, kind: DownloadFailure = "connection_lost") -> None:
        super().__init__(message)
        self.kind: DownloadFailure = kind


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's contents."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sidecar_path(partial_path: Path) -> Path:
    """Where the URL a partial file came from is recorded."""
    return partial_path.with_name(partial_path.name + ".json")


def _check_url(url: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:
        raise DownloadError(f"cannot download {url!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DownloadError(f"cannot download {url!r}: only http:// and https:// URLs work")


def _adopt_partial(url: str, partial_path: Path) -> None:
    """Keep a partial only if it came from this URL; record the URL for the next resume."""
    sidecar = sidecar_path(partial_path)
    previous: str | None = None
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        previous = json.loads(sidecar.read_text(encoding="utf-8")).get("url")
    if previous != url:
        partial_path.unlink(missing_ok=True)
    partial_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps({"url": url}), encoding="utf-8")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, full size) from a Content-Range header; None where absent or '*'."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return first, total


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _answer(
    status: int, headers: http.client.HTTPMessage, offset: int, partial_path: Path
) -> _Answer:
    length = _int_header(headers.get("Content-Length"))
    if status == 206:
        first, total = _parse_content_range(headers.get("Content-Range"))
        if first == offset:
            return _Answer(append=True, total=total, body_length=length)
        # A range we did not ask for: trust nothing on disk and start over.
        partial_path.unlink(missing_ok=True)
        raise _Retryable(f"server resumed at byte {first}, not {offset}; starting over")
    # 200: the server sends the whole file (it ignored or does not support Range).
    return _Answer(append=False, total=length, body_length=length)


def _disk_full(partial_path: Path, total: int | None, done: int) -> DiskFull:
    directory = partial_path.parent
    free = shutil.disk_usage(directory).free
    need = f" It needs {total - done} more bytes;" if total is not None else ""
    return DiskFull(
        f"The disk holding {directory} is full after saving {done} bytes.{need} "
        f"{free} bytes are free. Free some space and download again: it resumes where it "
        "stopped."
    )


def _write_all(f: BinaryIO, data: memoryview) -> None:
    """Write every byte through an unbuffered file (which may write only part of a chunk)."""
    while data:
        written = f.write(data)
        data = data[written:]


def _copy_body(
    response: http.client.HTTPResponse,
    partial_path: Path,
    answer: _Answer,
    offset: int,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> None:
    """Stream the body into the partial file; raises _Retryable if it stops short."""
    done = offset if answer.append else 0
    total = answer.total
    last_report = float("-inf")  # the first chunk always reports
    # Unbuffered, so what is on disk is exactly what we counted, even after ENOSPC.
    with partial_path.open("ab" if answer.append else "wb", buffering=0) as f:
        received = 0
        while True:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled(
                    f"Download cancelled after {done} bytes; the part saved so far is kept "
                    "and the next download of this URL resumes it."
                )
            try:
                chunk = response.read1(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as e:
                raise _Retryable(f"connection broke: {e}") from e
            if not chunk:
                break
            try:
                _write_all(f, memoryview(chunk))
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _disk_full(partial_path, total, _size(partial_path)) from e
                raise DownloadError(f"Cannot write {partial_path}: {e.strerror or e}",
                                    "write_failed") from e
            received += len(chunk)
            done += len(chunk)
            now = time.monotonic()
            if progress is not None and now - last_report >= PROGRESS_INTERVAL_S:
                last_report = now
                progress(done, total)
    if answer.body_length is not None and received < answer.body_length:
        raise _Retryable(f"connection closed after {received} of {answer.body_length} bytes")
    if progress is not None:
        progress(done, total)


def _attempt(
    url: str,
    partial_path: Path,
    expected_size: int | None,
    progress: Progress | None,
    cancel: threading.Event | None,
    timeout_s: float,
) -> None:
    """One request; returns when the partial file is complete."""
    offset = _size(partial_path)
    if expected_size is not None:
        if offset == expected_size:
            if progress is not None:
                progress(offset, expected_size)
            return
        if offset > expected_size:
            partial_path.unlink()
            offset = 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            _, total = _parse_content_range(e.headers.get("Content-Range"))
            if total == offset:
                if progress is not None:
                    progress(offset, total)
                return  # the partial already holds the whole file
            partial_path.unlink()  # a partial the server does not recognise: start over
            raise _Retryable("server refused to resume; starting over") from e
        if e.code >= 500 or e.code in _RETRY_STATUSES:
            raise _Retryable(f"server answered {e.code} {e.reason}", "server_error") from e
        raise DownloadError(
            f"The server answered {e.code} {e.reason} for {url}. Check the URL "
            "(and that the file is public).", "not_found" if e.code in (404, 410) else "refused"
        ) from e
    except (http.client.InvalidURL, ValueError) as e:
        raise DownloadError(f"cannot download {url!r}: {e}") from None
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, socket.gaierror):  # no such host: retrying will not make one
            host = urllib.parse.urlsplit(url).hostname
            raise DownloadError(
                f"Cannot find the server {host!r} of {url}. Check the URL, and that this "
                "machine is online."
            ) from e
        # URLError, refused or reset connections and timeouts land here.
        raise _Retryable(f"cannot reach the server: {reason}", "unreachable") from e
    with response:
        answer = _answer(response.status, response.headers, offset, partial_path)
        if expected_size is not None and answer.total not in (None, expected_size):
            raise DownloadError(
                f"The server says {url} is {answer.total} bytes, but {expected_size} were "
                "expected. Check the URL."
            )
        if answer.total is None and expected_size is not None:
            answer = _Answer(answer.append, expected_size, answer.body_length)
        _copy_body(response, partial_path, answer, offset, progress, cancel)
    size = _size(partial_path)
    if answer.total is not None and size != answer.total:
        if size > answer.total:
            partial_path.unlink()
        raise _Retryable(f"have {size} of {answer.total} bytes")


def download_to_partial(
    url: str,
    partial_path: Path,
    *,
    expected_size: int | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    retries: int = 5,
    backoff_s: float = 0.5,
    timeout_s: float = 30,
) -> None:
    """Download `url` into `partial_path`, resuming what is there; returns once complete.

    `retries` counts consecutive failed attempts that added nothing to the file, so a flaky
    connection that keeps making progress does not run out of tries on a large file.
    """
    _check_url(url)
    partial_path = Path(partial_path)
    _adopt_partial(url, partial_path)
    failures = 0
    high_water = _size(partial_path)
    while True:
        if cancel is not None and cancel.is_set():
            raise DownloadCancelled(
                "Download cancelled; the part saved so far is kept and the next download of "
                "this URL resumes it."
            )
        try:
            _attempt(url, partial_path, expected_size, progress, cancel, timeout_s)
            return
        except _Retryable as e:
            reason, kind = str(e), e.kind
        size = _size(partial_path)
        if size > high_water:
            high_water = size
            failures = 0
        else:
            failures += 1
        if failures > retries:
            raise DownloadError(
                f"Downloading {url} failed {failures} times in a row (last: {reason}). Try "
                "again later; what was saved so far is kept.", kind
            )
        delay = backoff_s * 2 ** max(failures - 1, 0)
        if cancel is not None:
            cancel.wait(delay)
        else:
            time.sleep(delay)
