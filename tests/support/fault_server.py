"""A real HTTP file server on 127.0.0.1 that can misbehave on purpose, for download tests.

Serves in-memory files with Range support and per-file faults: cut the body short, answer an
error status a few times, stall, ignore Range. Records every request it saw.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Faults:
    """How to misbehave for one file. Counters run down as requests arrive."""

    cut_after: int | None = None  # send only this many body bytes, then hang up...
    cut_times: int = 1  # ...on this many requests
    fail_status: int | None = None  # answer this status instead of the file...
    fail_times: int = 0  # ...on this many requests
    ignore_range: bool = False  # always answer 200 with the whole file
    stall_s: float = 0.0  # wait this long before answering...
    stall_times: int = 0  # ...on this many requests
    chunk_delay_s: float = 0.0  # pause between 64 KiB body chunks (slow network)


@dataclass
class Seen:
    """One request as the server saw it."""

    path: str
    range: str | None
    status: int
    body_bytes: int = 0


@dataclass
class _File:
    data: bytes
    faults: Faults


@dataclass
class ServerState:
    files: dict[str, _File] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


CHUNK = 64 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # keep test output clean

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        range_header = self.headers.get("Range")
        with state.lock:
            entry = state.files.get(path)
            seen = Seen(path=path, range=range_header, status=0)
            state.seen.append(seen)
            faults = entry.faults if entry else Faults()
            stall = faults.stall_s if faults.stall_times > 0 else 0.0
            faults.stall_times -= 1 if stall else 0
            fail = faults.fail_status if faults.fail_times > 0 else None
            faults.fail_times -= 1 if fail else 0
            cut = faults.cut_after if faults.cut_times > 0 else None
            faults.cut_times -= 1 if cut is not None else 0
        if stall:
            time.sleep(stall)
        if entry is None or fail is not None:
            seen.status = 404 if entry is None else int(fail or 500)
            self.send_error(seen.status)
            return
        data = entry.data
        start = 0
        match = _RANGE.fullmatch(range_header or "")
        if match and not faults.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                seen.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            seen.status = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            seen.status = 200
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        body = data[start:] if cut is None else data[start : start + cut]
        try:
            for i in range(0, len(body), CHUNK):
                self.wfile.write(body[i : i + CHUNK])
                self.wfile.flush()
                seen.body_bytes += len(body[i : i + CHUNK])
                if faults.chunk_delay_s:
                    time.sleep(faults.chunk_delay_s)
        except OSError:
            pass  # the client hung up (cancelled or timed out): that is its right
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out leave broken pipes behind; not the test's business


class FaultServer:
    """Start with `with FaultServer() as server:`; `server.add(...)` returns the file's URL."""

    def __init__(self) -> None:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.state = ServerState()
        # A short poll interval makes shutdown() (once per test) quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def state(self) -> ServerState:
        return self._httpd.state

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, path: str, data: bytes, faults: Faults | None = None) -> str:
        with self.state.lock:
            self.state.files[path] = _File(data, faults or Faults())
        return self.base_url + path

    def seen(self, path: str | None = None) -> list[Seen]:
        with self.state.lock:
            return [s for s in self.state.seen if path is None or s.path == path]

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
