"""The local API as a client meets it: a real server on loopback, driven over real sockets."""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from swarm.api.files import SecretError, load_or_create_secret, remove_api_info, write_api_info
from swarm.api.server import (
    MAX_HEAD_BYTES,
    HttpError,
    LocalApi,
    Request,
    Response,
    StreamingResponse,
)
from swarm.client.core import ApiError, NodeNotRunning
from swarm.client.sync_client import NodeClient

pytestmark = [pytest.mark.processes, pytest.mark.timeout(30)]

MAX_BODY = 1024 * 1024


@dataclass
class Server:
    port: int
    secret: str
    data_dir: Path
    token: trio.lowlevel.TrioToken
    gate: trio.Event  # the streaming handlers wait on it between chunks
    released: threading.Event  # set when a stream's generator has been closed

    def auth(self) -> dict[str, str]:
        return {"Host": f"127.0.0.1:{self.port}", "Authorization": f"Bearer {self.secret}"}

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path, body=body, headers=headers or self.auth())
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def raw(self, data: bytes) -> bytes:
        """Send bytes as they are; everything the server answers until it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(data)
            return recv_all(s)

    def open_gate(self) -> None:
        trio.from_thread.run_sync(self.gate.set, trio_token=self.token)


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def error_of(body: bytes) -> dict[str, str]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def build_api(secret: str, gate: trio.Event, released: threading.Event,
              **limits: float) -> LocalApi:
    api = LocalApi(secret, **limits)

    async def ok(req: Request) -> Response:
        return Response.json({"ok": True, "query": req.query})

    async def echo(req: Request) -> Response:
        return Response.json({"got": req.json(), "content_type": req.headers.get("content-type")})

    async def boom(req: Request) -> Response:
        raise RuntimeError("handler exploded")

    async def teapot(req: Request) -> Response:
        raise HttpError(418, "short and stout")

    async def events() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        await gate.wait()
        yield b"data: two\n\n"
        yield b"data: [DONE]\n\n"

    async def stream(req: Request) -> StreamingResponse:
        return StreamingResponse(events())

    async def failing_events() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        raise RuntimeError("generation broke")

    async def watched_events() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"data: tick\n\n"
                await gate.wait()
        finally:
            released.set()

    async def stream_fails(req: Request) -> StreamingResponse:
        return StreamingResponse(failing_events())

    async def stream_watched(req: Request) -> StreamingResponse:
        return StreamingResponse(watched_events())

    async def until_gate(req: Request) -> Response:
        try:
            await gate.wait()
            return Response.json({"waited": True})
        finally:
            released.set()  # also when the client hung up and the wait was cancelled

    api.add_route("GET", "/ok", ok)
    api.add_route("POST", "/until-gate", until_gate, stop_on_hangup=True)
    api.add_route("POST", "/echo", echo)
    api.add_route("GET", "/boom", boom)
    api.add_route("GET", "/teapot", teapot)
    api.add_route("GET", "/stream", stream)
    api.add_route("GET", "/stream-fails", stream_fails)
    api.add_route("GET", "/stream-watched", stream_watched)
    return api


@pytest.fixture
def server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Server]:
    yield from run_server(tmp_path, caplog)


def run_server(data_dir: Path, caplog: pytest.LogCaptureFixture,
               **limits: float) -> Iterator[Server]:
    """The API in its own thread under trio.run; teardown cancels it and checks it never died."""
    caplog.set_level(logging.DEBUG)
    secret = load_or_create_secret(data_dir)
    started: queue.Queue[tuple[int, trio.lowlevel.TrioToken, trio.CancelScope, trio.Event]] = \
        queue.Queue()
    crashed: list[BaseException] = []
    released = threading.Event()

    async def main() -> None:
        gate = trio.Event()
        api = build_api(secret, gate, released, **limits)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(api.serve, 0)
                started.put((port, trio.lowlevel.current_trio_token(), scope, gate))

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            crashed.append(exc)
            started.put(None)  # type: ignore[arg-type]

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    item = started.get(timeout=5)
    assert item is not None, crashed
    port, token, scope, gate = item
    yield Server(port, secret, data_dir, token, gate, released)
    trio.from_thread.run_sync(scope.cancel, trio_token=token)
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert crashed == [], "the server died"
    assert secret not in caplog.text


def test_ok_with_secret(server: Server) -> None:
    status, headers, body = server.request("GET", "/ok?x=1&y=")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"ok": True, "query": {"x": "1", "y": ""}}


@pytest.mark.parametrize("host", ["localhost", "[::1]"])
def test_other_loopback_host_names_accepted(server: Server, host: str) -> None:
    headers = {**server.auth(), "Host": f"{host}:{server.port}"}
    assert server.request("GET", "/ok", headers=headers)[0] == 200


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer ", "Basic abc"])
def test_missing_or_wrong_secret_is_401(server: Server, authorization: str | None) -> None:
    headers = {"Host": f"127.0.0.1:{server.port}"}
    if authorization is not None:
        headers["Authorization"] = authorization
    status, resp_headers, body = server.request("GET", "/ok", headers=headers)
    assert status == 401
    assert resp_headers["www-authenticate"] == "Bearer"
    assert error_of(body)["type"] == "authentication_error"


def test_secret_prefix_is_not_enough(server: Server) -> None:
    headers = {**server.auth(), "Authorization": f"Bearer {server.secret[:-1]}"}
    assert server.request("GET", "/ok", headers=headers)[0] == 401


@pytest.mark.parametrize("host", ["evil.example:{port}", "127.0.0.1", "localhost",
                                  "127.0.0.1:1", "evil.example"])
def test_foreign_host_is_403_even_with_secret(server: Server, host: str) -> None:
    headers = {**server.auth(), "Host": host.format(port=server.port)}
    status, _, body = server.request("GET", "/ok", headers=headers)
    assert status == 403
    assert error_of(body)["type"] == "permission_error"


def test_host_checked_before_auth(server: Server) -> None:
    status, _, _ = server.request("GET", "/ok", headers={"Host": f"evil.example:{server.port}"})
    assert status == 403


def test_unknown_path_404_wrong_method_405(server: Server) -> None:
    status, _, body = server.request("GET", "/nope")
    assert status == 404 and error_of(body)["type"] == "not_found_error"
    status, headers, body = server.request("DELETE", "/ok")
    assert status == 405 and headers["allow"] == "GET"
    error_of(body)


def test_garbage_is_400_and_server_keeps_serving(server: Server) -> None:
    answer = server.raw(b"\x00\x01\x02 not http at all\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    error_of(answer.split(b"\r\n\r\n", 1)[1])
    assert server.raw(b"GET /ok HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    assert server.request("GET", "/ok")[0] == 200


def test_oversize_body_is_413(server: Server) -> None:
    status, _, body = server.request("POST", "/echo", body=b"x" * (MAX_BODY + 1),
                                     headers={**server.auth(), "Content-Type": "text/plain"})
    assert status == 413
    assert error_of(body)["type"] == "request_too_large"
    assert server.request("GET", "/ok")[0] == 200


def test_oversize_declared_body_is_413_before_it_is_sent(server: Server) -> None:
    head = (f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Bearer {server.secret}\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(head.encode())
        answer = recv_all(s)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in answer.lower()


def test_oversize_chunked_body_is_413(server: Server) -> None:
    head = (f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Bearer {server.secret}\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 65536
    body = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 17 + b"0\r\n\r\n"
    assert server.raw(head.encode() + body).startswith(b"HTTP/1.1 413 ")


def test_oversize_head_is_431(server: Server) -> None:
    headers = {**server.auth(), "X-Big": "a" * (MAX_HEAD_BYTES + 1)}
    status, _, body = server.request("GET", "/ok", headers=headers)
    assert status == 431
    error_of(body)
    # The same head trickled in, so that h11 sees it incomplete and over its buffer limit.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(f"GET /ok HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode())
        for _ in range(MAX_HEAD_BYTES // 1000 + 2):
            s.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
        assert recv_all(s).startswith(b"HTTP/1.1 431 ")
    assert server.request("GET", "/ok")[0] == 200


def test_body_up_to_the_limit_is_accepted(server: Server) -> None:
    payload = json.dumps({"s": "x" * (MAX_BODY - 20)}).encode()
    assert len(payload) <= MAX_BODY
    status, _, body = server.request("POST", "/echo", body=payload,
                                     headers={**server.auth(), "Content-Type": "application/json"})
    assert status == 200
    assert json.loads(body)["got"] == json.loads(payload)


def test_bad_json_is_400_from_request_json(server: Server) -> None:
    status, _, body = server.request("POST", "/echo", body=b"{nope")
    assert status == 400 and "not valid JSON" in error_of(body)["message"]


def test_handler_error_is_500_logged_and_server_keeps_serving(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    status, _, body = server.request("GET", "/boom")
    assert status == 500
    assert error_of(body)["type"] == "server_error"
    assert "handler exploded" not in body.decode()
    assert "GET /boom failed" in caplog.text and "handler exploded" in caplog.text
    assert server.request("GET", "/ok")[0] == 200


def test_http_error_from_handler_keeps_its_status(server: Server) -> None:
    status, _, body = server.request("GET", "/teapot")
    assert status == 418 and error_of(body)["message"] == "short and stout"


def test_keep_alive_reuses_the_connection(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        sockets = []
        for path, want in [("/ok", 200), ("/nope", 404), ("/boom", 500), ("/ok", 200)]:
            conn.request("GET", path, headers=server.auth())
            sockets.append(conn.sock)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == want
            assert not resp.will_close
        # http.client reconnects silently when a server closes; the same socket proves it didn't.
        assert all(s is sockets[0] for s in sockets)
    finally:
        conn.close()


def test_stream_is_chunked_and_not_buffered(server: Server) -> None:
    head = (f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Bearer {server.secret}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(head.encode())
        got = b""
        # The handler holds the rest back until the gate opens, so the first event must
        # arrive on its own; a server that buffered the stream would time out here.
        while b"data: one" not in got:
            chunk = s.recv(65536)
            assert chunk, "closed before the first event"
            got += chunk
        assert b"data: two" not in got
        head_part = got.split(b"\r\n\r\n", 1)[0].lower()
        assert head_part.startswith(b"http/1.1 200 ")
        assert b"transfer-encoding: chunked" in head_part
        assert b"content-type: text/event-stream" in head_part
        server.open_gate()
        while not got.endswith(b"\r\n0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk, "closed before the last chunk"
            got += chunk
    body = got.split(b"\r\n\r\n", 1)[1]
    assert body == (b"b\r\ndata: one\n\n\r\n" b"b\r\ndata: two\n\n\r\n"
                    b"e\r\ndata: [DONE]\n\n\r\n" b"0\r\n\r\n")


def test_stream_decodes_with_http_client(server: Server) -> None:
    server.open_gate()
    status, headers, body = server.request("GET", "/stream")
    assert status == 200 and headers["cache-control"] == "no-cache"
    assert body == b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"


def test_stream_failure_cuts_the_body_and_is_logged(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/stream-fails", headers=server.auth())
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    finally:
        conn.close()
    assert "GET /stream-fails failed" in caplog.text and "generation broke" in caplog.text
    assert server.request("GET", "/ok")[0] == 200


def test_client_hanging_up_mid_stream_releases_the_generator(server: Server) -> None:
    head = (f"GET /stream-watched HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Bearer {server.secret}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(head.encode())
        got = b""
        while b"data: tick" not in got:
            got += s.recv(65536)
    assert not server.released.is_set()
    server.open_gate()  # the generator now yields into a closed socket, forever if let
    assert server.released.wait(5), "the stream's generator was never closed"
    assert server.request("GET", "/ok")[0] == 200


def test_idle_connection_is_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for server in run_server(tmp_path, caplog, head_timeout=0.2, idle_timeout=0.2):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            began = time.monotonic()
            assert s.recv(100) == b""
            assert time.monotonic() - began < 2
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET /ok HTTP/1.1\r\n")  # a head that never finishes
            assert recv_all(s).startswith(b"HTTP/1.1 408 ")
        assert server.request("GET", "/ok")[0] == 200


def test_a_head_trickled_in_is_cut_off_at_the_head_timeout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Slowloris: a byte now and then keeps no connection open past the head timeout, though
    an idle keep-alive connection may wait longer for its next request."""
    for server in run_server(tmp_path, caplog, head_timeout=1.0, idle_timeout=20.0):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            began = time.monotonic()
            s.sendall(b"GET /ok HTTP/1.1\r\n")
            got = b""
            for _ in range(40):  # well past the head timeout, if nothing cut it off
                try:
                    s.sendall(b"X")
                except OSError:
                    break
                s.settimeout(0.1)
                try:
                    got += s.recv(4096)
                except TimeoutError:
                    continue
                if got:
                    break
            assert got.startswith(b"HTTP/1.1 408 "), got
            assert 0.9 < time.monotonic() - began < 3
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.settimeout(1.5)  # idle, it outlives the head timeout
            with pytest.raises(TimeoutError):
                s.recv(100)
        assert server.request("GET", "/ok")[0] == 200


def test_idle_connections_beyond_the_cap_give_way_to_new_callers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for server in run_server(tmp_path, caplog, max_connections=4):
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                for _ in range(12)]
        try:
            # Each newcomer evicted the one that had waited longest: the first eight are shut.
            for s in idle[:8]:
                assert s.recv(100) == b""
            assert server.request("GET", "/ok")[0] == 200  # no waiting behind idle sockets
        finally:
            for s in idle:
                s.close()


def test_when_every_connection_is_busy_a_newcomer_is_refused_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    head = ("GET /stream-watched HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Authorization: Bearer {secret}\r\n\r\n")
    for server in run_server(tmp_path, caplog, max_connections=2):
        busy = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                for _ in range(2)]
        try:
            for s in busy:
                s.sendall(head.format(port=server.port, secret=server.secret).encode())
                got = b""
                while b"data: tick" not in got:
                    got += s.recv(65536)
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as late:
                late.sendall(b"GET /ok HTTP/1.1\r\n\r\n")
                try:
                    answer = recv_all(late)
                except ConnectionResetError:  # closed with our request unread
                    answer = b""
                assert answer == b""
            assert "all 2 connections are busy" in caplog.text
        finally:
            for s in busy:
                s.close()
        server.open_gate()
        assert server.released.wait(5)
        assert server.request("GET", "/ok")[0] == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "localhost", "127.0.0.2"])
def test_binding_beyond_loopback_is_refused(host: str) -> None:
    api = LocalApi("secret")

    async def try_to_serve() -> None:
        with trio.move_on_after(1):  # a server that did bind would otherwise run forever
            await api.serve(0, host=host)

    with pytest.raises(ValueError, match="binds only to"):
        trio.run(try_to_serve)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        LocalApi("")


def test_secret_file_is_0600_and_stable(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen it
    try:
        secret = load_or_create_secret(tmp_path / "data")
    finally:
        os.umask(old_umask)
    path = tmp_path / "data" / "api-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 40
    assert load_or_create_secret(tmp_path / "data") == secret


def test_wide_secret_file_is_narrowed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = load_or_create_secret(tmp_path)
    path = tmp_path / "api-secret"
    path.chmod(0o644)
    assert load_or_create_secret(tmp_path) == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "narrowing it to 0600" in caplog.text
    assert secret not in caplog.text


def test_empty_secret_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "api-secret"
    path.touch(mode=0o600)
    secret = load_or_create_secret(tmp_path)
    assert len(secret) >= 40 and path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("content", ["has space\n", "\u00e9t\u00e9", "a=b"])
def test_unusable_secret_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "api-secret"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(SecretError, match="api-secret"):
        load_or_create_secret(tmp_path)


def test_api_info_written_and_removed(tmp_path: Path) -> None:
    path = write_api_info(tmp_path, 4321, 99)
    assert json.loads(path.read_text()) == {"version": 1, "port": 4321, "pid": 99}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.json"]
    remove_api_info(tmp_path, pid=100)  # someone else's: left alone
    assert path.exists()
    remove_api_info(tmp_path, pid=99)
    assert not path.exists()
    remove_api_info(tmp_path)  # already gone is fine


def test_node_client_round_trip(server: Server) -> None:
    write_api_info(server.data_dir, server.port, os.getpid())
    client = NodeClient.from_data_dir(server.data_dir, timeout=5)
    assert server.secret not in repr(client)
    assert client.get_json("/ok") == {"ok": True, "query": {}}
    assert client.post_json("/echo", {"a": [1, 2]}) == {
        "got": {"a": [1, 2]}, "content_type": "application/json"}
    with pytest.raises(ApiError) as info:
        client.get_json("/nope")
    assert info.value.status == 404 and info.value.message == "No such endpoint: /nope"
    with pytest.raises(ApiError) as info:
        client.get_json("/boom")
    assert info.value.status == 500


def test_node_client_wrong_secret_is_api_error(server: Server) -> None:
    write_api_info(server.data_dir, server.port, os.getpid())
    client = NodeClient.from_data_dir(server.data_dir, timeout=5)
    wrong = NodeClient(client.data_dir, client.port, "not-the-secret", 5)
    with pytest.raises(ApiError) as info:
        wrong.get_json("/ok")
    assert info.value.status == 401


def test_node_not_running_without_api_json(tmp_path: Path) -> None:
    with pytest.raises(NodeNotRunning) as info:
        NodeClient.from_data_dir(tmp_path)
    assert str(info.value) == (f"No Covey node is running for {tmp_path}. "
                               "Start one with: covey node --token-file FILE")


def test_node_not_running_when_pid_is_gone(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    write_api_info(tmp_path, 4321, int(proc.stdout))
    load_or_create_secret(tmp_path)
    with pytest.raises(NodeNotRunning, match="has exited.*covey node --token"):
        NodeClient.from_data_dir(tmp_path)


def test_node_not_running_when_port_is_closed(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_api_info(tmp_path, port, os.getpid())
    load_or_create_secret(tmp_path)
    client = NodeClient.from_data_dir(tmp_path, timeout=5)
    with pytest.raises(NodeNotRunning, match=f"No Covey node is running for {tmp_path}"):
        client.get_json("/ok")


def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    auth = f"Host: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {server.secret}\r\n"
    answer = server.raw(f"GET /nope HTTP/1.1\r\n{auth}\r\n"
                        f"GET /ok HTTP/1.1\r\n{auth}Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 200 " in answer


def test_a_client_that_hangs_up_cancels_a_stop_on_hangup_handler(server: Server) -> None:
    request = (f"POST /until-gate HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
               f"Authorization: Bearer {server.secret}\r\nContent-Length: 2\r\n\r\n{{}}")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(request.encode())
        time.sleep(0.3)
        assert not server.released.is_set()  # still working while the client waits
    assert server.released.wait(5), "the handler ran on after its client left"
    assert server.request("GET", "/ok")[0] == 200


def test_a_client_that_waits_gets_the_stop_on_hangup_answer(server: Server) -> None:
    answer: list[tuple[int, dict[str, str], bytes]] = []
    waiter = threading.Thread(target=lambda: answer.append(
        server.request("POST", "/until-gate", b"{}")))
    waiter.start()
    time.sleep(0.3)
    server.open_gate()
    waiter.join(5)
    assert answer and answer[0][0] == 200 and json.loads(answer[0][2]) == {"waited": True}
