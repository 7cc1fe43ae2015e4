"""Downloads against a real HTTP server on 127.0.0.1 that cuts, fails, stalls and ignores Range."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.store.download import (
    DownloadCancelled,
    DownloadError,
    download_to_partial,
    sha256_file,
    sidecar_path,
)
from tests.support.fault_server import Faults, FaultServer

pytestmark = pytest.mark.processes

SIZE = 3 * 1024 * 1024 + 12345  # a few reads' worth, not a multiple of anything


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(SIZE)


def test_sha256_file(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "blob"
    path.write_bytes(payload)
    assert sha256_file(path) == hashlib.sha256(payload).hexdigest()


def test_download_with_progress(server: FaultServer, payload: bytes, tmp_path: Path) -> None:
    url = server.add("/blob.bin", payload, Faults(chunk_delay_s=0.01))
    calls: list[tuple[int, int | None]] = []
    started = time.monotonic()
    partial = tmp_path / "blob.part"
    download_to_partial(url, partial, progress=lambda d, t: calls.append((d, t)))
    elapsed = time.monotonic() - started
    assert partial.read_bytes() == payload
    assert calls[-1] == (SIZE, SIZE)
    done = [d for d, _ in calls]
    assert done == sorted(done)
    # Throttled to ~10 a second plus the final call, however many chunks arrived.
    assert 2 <= len(calls) <= elapsed / 0.1 + 2
    assert json.loads(sidecar_path(partial).read_text())["url"] == url
    assert [s.range for s in server.seen()] == [None]


def test_cut_off_midway_resumes_with_range(
    server: FaultServer, payload: bytes, tmp_path: Path
) -> None:
    cut = 1024 * 1024 + 7
    url = server.add("/blob.bin", payload, Faults(cut_after=cut))
    partial = tmp_path / "blob.part"
    download_to_partial(url, partial, backoff_s=0.01)
    assert partial.read_bytes() == payload
    seen = server.seen()
    assert [(s.range, s.status) for s in seen] == [(None, 200), (f"bytes={cut}-", 206)]
    sent = sum(s.body_bytes for s in seen)
    assert sent == SIZE < 2 * SIZE


def test_cut_off_repeatedly_keeps_going_while_it_progresses(
    server: FaultServer, payload: bytes, tmp_path: Path
) -> None:
    # Six cuts but only 2 retries allowed: each cut adds bytes, so it never gives up.
    url = server.add("/blob.bin", payload, Faults(cut_after=500_000, cut_times=6))
    partial = tmp_path / "blob.part"
    download_to_partial(url, partial, retries=2, backoff_s=0.01)
    assert partial.read_bytes() == payload
    assert len(server.seen()) == 7


def test_server_ignoring_range_restarts_from_zero(
    server: FaultServer, payload: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob.bin", payload, Faults(cut_after=1_000_000, ignore_range=True))
    partial = tmp_path / "blob.part"
    download_to_partial(url, partial, backoff_s=0.01)
    assert partial.read_bytes() == payload
    seen = server.seen()
    assert [(s.range, s.status) for s in seen] == [(None, 200), ("bytes=1000000-", 200)]


def test_not_found_is_not_retried(server: FaultServer, tmp_path: Path) -> None:
    url = server.base_url + "/missing.gguf"
    with pytest.raises(DownloadError, match=r"answered 404 .*/missing\.gguf") as raised:
        download_to_partial(url, tmp_path / "m.part", backoff_s=0.01)
    assert url in str(raised.value)
    assert len(server.seen()) == 1
    assert not (tmp_path / "m.part").exists()


def test_server_errors_are_retried(server: FaultServer, payload: bytes, tmp_path: Path) -> None:
    url = server.add("/blob.bin", payload, Faults(fail_status=500, fail_times=2))
    partial = tmp_path / "blob.part"
    download_to_partial(url, partial, backoff_s=0.01)
    assert partial.read_bytes() == payload
    assert [s.status for s in server.seen()] == [500, 500, 200]


def test_retries_run_out(server: FaultServer, payload: bytes, tmp_path: Path) -> None:
    url = server.add("/blob.bin", payload, Faults(fail_status=503, fail_times=100))
    with pytest.raises(DownloadError, match=r"failed 3 times in a row .*503"):
        download_to_partial(url, tmp_path / "blob.part", retries=2, backoff_s=0.01)
    assert len(server.seen()) == 3


def test_backoff_grows(server: FaultServer, payload: bytes, tmp_path: Path) -> None:
    url = server.add("/blob.bin", payload, Faults(fail_status=502, fail_times=3))
    started = time.monotonic()
    download_to_partial(url, tmp_path / "blob.part", backoff_s=0.1)
    # Waits of 0.1, 0.2 and 0.4 s between the four attempts.
    assert time.monotonic() - started >= 0.7


def test_stalled_server_times_out_and_is_retried(
    server: FaultServer, payload: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob.bin", payload, Faults(stall_s=1.0, stall_times=1))
    partial = tmp_path / "blob.part"
    download_to_partial(url, partial, timeout_s=0.3, backoff_s=0.01)
    assert partial.read_bytes() == payload
    assert len(server.seen()) == 2


def test_connection_refused_is_retried_then_fails(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on that port any more.
    with pytest.raises(DownloadError, match=r"failed 2 times in a row .*cannot reach"):
        download_to_partial(f"http://127.0.0.1:{port}/x.gguf", tmp_path / "x.part",
                            retries=1, backoff_s=0.01)


def test_cancel_keeps_partial_and_the_next_download_resumes(
    server: FaultServer, payload: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob.bin", payload, Faults(chunk_delay_s=0.005))
    partial = tmp_path / "blob.part"
    cancel = threading.Event()

    def progress(done: int, total: int | None) -> None:
        if done > 0:
            cancel.set()

    with pytest.raises(DownloadCancelled, match="kept"):
        download_to_partial(url, partial, progress=progress, cancel=cancel)
    kept = partial.stat().st_size
    assert 0 < kept < SIZE
    assert payload.startswith(partial.read_bytes())

    download_to_partial(url, partial)
    assert partial.read_bytes() == payload
    assert server.seen()[-1].range == f"bytes={kept}-"


def test_cancel_before_start(server: FaultServer, payload: bytes, tmp_path: Path) -> None:
    url = server.add("/blob.bin", payload)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(DownloadCancelled):
        download_to_partial(url, tmp_path / "blob.part", cancel=cancel)
    assert server.seen() == []


def test_complete_partial_is_not_downloaded_again(
    server: FaultServer, payload: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob.bin", payload)
    partial = tmp_path / "blob.part"
    download_to_partial(url, partial)
    calls: list[tuple[int, int | None]] = []
    download_to_partial(url, partial, progress=lambda d, t: calls.append((d, t)))
    assert partial.read_bytes() == payload
    # The second request asks for the bytes after the end, and the 416 means "you have it".
    assert [(s.range, s.status) for s in server.seen()][1] == (f"bytes={SIZE}-", 416)
    assert calls == [(SIZE, SIZE)]


def test_complete_partial_with_expected_size_makes_no_request(
    server: FaultServer, payload: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob.bin", payload)
    partial = tmp_path / "blob.part"
    download_to_partial(url, partial, expected_size=SIZE)
    download_to_partial(url, partial, expected_size=SIZE)
    assert len(server.seen()) == 1


def test_expected_size_disagreeing_with_server(
    server: FaultServer, payload: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob.bin", payload)
    with pytest.raises(DownloadError, match=rf"is {SIZE} bytes, but 1000 were expected"):
        download_to_partial(url, tmp_path / "blob.part", expected_size=1000)


def test_partial_from_another_url_is_discarded(
    server: FaultServer, payload: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob.bin", payload)
    partial = tmp_path / "blob.part"
    partial.write_bytes(b"x" * 5000)
    sidecar_path(partial).write_text(json.dumps({"url": server.base_url + "/other.bin"}))
    download_to_partial(url, partial)
    assert partial.read_bytes() == payload
    assert [s.range for s in server.seen()] == [None]


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://127.0.0.1/x.gguf", "127.0.0.1/x.gguf", "http:///x", "http://[::1"],
)
def test_only_http_and_https(tmp_path: Path, url: str) -> None:
    with pytest.raises(DownloadError, match="cannot download"):
        download_to_partial(url, tmp_path / "x.part")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_host_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped host name is a bad URL, not a network hiccup worth 30 s of retries. (Name
    lookups are answered here: tests send no traffic off the machine.)"""
    def no_such_host(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="Cannot find the server 'models.example'") as raised:
        download_to_partial("https://models.example/m.gguf", tmp_path / "m.part")
    assert time.monotonic() - started < 2
    assert raised.value.kind == "bad_url"


def test_each_failure_says_which_kind(server: FaultServer, payload: bytes,
                                      tmp_path: Path) -> None:
    def kind(url: str) -> str:
        with pytest.raises(DownloadError) as raised:
            download_to_partial(url, tmp_path / "k.part", retries=1, backoff_s=0.01)
        (tmp_path / "k.part").unlink(missing_ok=True)
        return raised.value.kind

    assert kind(server.base_url + "/missing.gguf") == "not_found"
    assert kind(server.add("/gone.bin", payload, Faults(fail_status=403, fail_times=9))
                ) == "refused"
    assert kind(server.add("/busy.bin", payload, Faults(fail_status=503, fail_times=9))
                ) == "server_error"
    assert kind(server.add("/cut.bin", payload, Faults(cut_after=0, cut_times=9))
                ) == "connection_lost"
    assert kind("not a url") == "bad_url"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert kind(f"http://127.0.0.1:{port}/x.gguf") == "unreachable"
