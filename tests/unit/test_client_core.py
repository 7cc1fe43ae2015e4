"""The node-API clients' shared core: finding the node, headers, replies and event streams.

Both clients (the CLI's NodeClient and the desktop app's NodeLink) must fail the same way for
the same problem, so the user reads the same explanation in the terminal and in the window.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from swarm.api.files import INFO_FILE, SECRET_FILE, ApiInfo, write_api_info
from swarm.client.async_client import NodeLink
from swarm.client.core import (
    DONE,
    STREAM_ENDED_EARLY,
    ApiError,
    EventStream,
    NodeClientError,
    NodeNotRunning,
    decode_reply,
    parse_sse_line,
    request_headers,
)
from swarm.client.sync_client import NodeClient

SECRET = "s3cret-token_value"
DEAD_PID = 2**31 - 1  # above any kernel's pid_max: no process can have it


def _no_api_json(data_dir: Path) -> Path:
    return data_dir  # the message names the data directory, where api.json is missing


def _stale_pid(data_dir: Path) -> Path:
    return write_api_info(data_dir, 4321, DEAD_PID)


def _garbage_api_json(data_dir: Path) -> Path:
    path = data_dir / INFO_FILE
    path.write_text('{"version": 1, "port": "http"')
    return path


def _secret_unreadable(data_dir: Path) -> Path:
    write_api_info(data_dir, 4321, os.getpid())
    path = data_dir / SECRET_FILE
    path.mkdir()  # reading a directory fails for root too, unlike a chmod 000 file
    return path


def _secret_missing(data_dir: Path) -> Path:
    write_api_info(data_dir, 4321, os.getpid())
    return data_dir / SECRET_FILE


def _secret_garbage(data_dir: Path) -> Path:
    write_api_info(data_dir, 4321, os.getpid())
    path = data_dir / SECRET_FILE
    path.write_bytes(b"\xff\xfe not a token\n")
    return path


def _secret_empty(data_dir: Path) -> Path:
    write_api_info(data_dir, 4321, os.getpid())
    path = data_dir / SECRET_FILE
    path.write_text("\n")
    return path


@pytest.mark.parametrize(("setup", "error"), [
    (_no_api_json, NodeNotRunning),
    (_stale_pid, NodeNotRunning),
    (_garbage_api_json, NodeNotRunning),
    # A live process owns api.json, so a node most likely runs: "start one" would mislead,
    # and the desktop app would start a second node that trips on the same file.
    (_secret_unreadable, NodeClientError),
    (_secret_missing, NodeClientError),
    (_secret_garbage, NodeClientError),
    (_secret_empty, NodeClientError),
])
def test_both_clients_fail_alike_naming_the_file(
        tmp_path: Path, setup: Callable[[Path], Path], error: type[Exception]) -> None:
    if setup is _stale_pid and sys.platform == "win32":
        pytest.skip("Windows: the connection attempt decides whether the node lives")
    named = setup(tmp_path)
    with pytest.raises(NodeClientError) as cli:
        NodeClient.from_data_dir(tmp_path)
    with pytest.raises(NodeClientError) as app:
        NodeLink.find(tmp_path)
    assert type(cli.value) is error and type(app.value) is error
    assert str(cli.value) == str(app.value)
    assert str(named) in str(cli.value)


def test_a_live_node_is_found_with_its_secret(tmp_path: Path) -> None:
    write_api_info(tmp_path, 4321, os.getpid())
    (tmp_path / SECRET_FILE).write_text(SECRET + "\n")
    client, link = NodeClient.from_data_dir(tmp_path), NodeLink.find(tmp_path)
    assert (client.port, client.secret) == (link.port, link.secret) == (4321, SECRET)


def test_stale_pid_says_the_process_exited(tmp_path: Path) -> None:
    if sys.platform == "win32":
        pytest.skip("Windows: the connection attempt decides whether the node lives")
    path = _stale_pid(tmp_path)
    with pytest.raises(NodeNotRunning, match=f"process {DEAD_PID} from .* has exited"):
        NodeClient.from_data_dir(tmp_path)
    assert path.exists()  # a client never deletes the node's files


@pytest.mark.parametrize("content", [
    "[]", '{"version": 2, "port": 1, "pid": 1}', '{"version": 1, "port": true, "pid": 1}',
    '{"version": 1, "port": 70000, "pid": 1}', '{"version": 1, "port": 80}',
    '{"version": 1, "port": 80, "pid": 0}', "not json",
])
def test_bad_api_info_is_refused(content: str) -> None:
    with pytest.raises(ValueError):
        ApiInfo.decode(content)


def test_api_info_round_trips() -> None:
    info = ApiInfo(port=8123, pid=42)
    assert json.loads(info.encode()) == {"version": 1, "port": 8123, "pid": 42}
    assert ApiInfo.decode(info.encode()) == info


def test_headers_without_a_body() -> None:
    assert request_headers(8123, SECRET, "application/json", None) == {
        "Host": "127.0.0.1:8123",  # the node refuses any other Host (DNS rebinding)
        "Authorization": f"Bearer {SECRET}",
        "Accept": "application/json",
        "Connection": "close",
    }


def test_headers_with_a_body() -> None:
    headers = request_headers(8123, SECRET, "text/event-stream", b'{"a": 1}')
    assert headers["Accept"] == "text/event-stream"
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == "8"


def test_reply_json_and_empty() -> None:
    assert decode_reply(200, b'{"ok": true}') == {"ok": True}
    assert decode_reply(204, b"") is None


def test_reply_error_carries_the_nodes_message() -> None:
    body = json.dumps({"error": {"message": "No such model: x", "type": "invalid_request_error"}})
    with pytest.raises(ApiError) as info:
        decode_reply(404, body.encode())
    assert info.value.status == 404 and info.value.message == "No such model: x"
    assert str(info.value) == "Covey node answered 404: No such model: x"


@pytest.mark.parametrize(("body", "message"), [
    (b"plain words\n", "plain words"), (b"", "(no message)"), (b'{"error": 3}', '{"error": 3}'),
])
def test_reply_error_that_is_not_openai_shaped(body: bytes, message: str) -> None:
    with pytest.raises(ApiError) as info:
        decode_reply(502, body)
    assert info.value.message == message


def test_reply_that_is_not_json() -> None:
    with pytest.raises(NodeClientError, match="not JSON") as info:
        decode_reply(200, b"<html>")
    assert not isinstance(info.value, ApiError)


@pytest.mark.parametrize(("line", "event"), [
    (b'data: {"choices": []}', {"choices": []}),
    (b"data: [DONE]", DONE),
    (b": keep-alive comment", None),
    (b"event: ping", None),
    (b"", None),
    (b"data: [1, 2]", None),  # only objects are events
])
def test_sse_lines(line: bytes, event: Any) -> None:
    assert parse_sse_line(line) == event  # DONE compares by identity


def test_sse_error_event_is_the_nodes_error() -> None:
    with pytest.raises(ApiError) as info:
        parse_sse_line(b'data: {"error": {"message": "the engine crashed"}}')
    assert info.value.status == 500 and info.value.message == "the engine crashed"


def test_sse_event_that_is_not_json() -> None:
    with pytest.raises(NodeClientError, match="not JSON"):
        parse_sse_line(b"data: {half")


STREAM = (b'data: {"n": 1}\r\n\r\n: comment\n\ndata: {"n": 2}\n\n'
          b'data: [DONE]\n\ndata: {"n": 3}\n\n')


@pytest.mark.parametrize("size", [1, 2, 7, len(STREAM)])
def test_event_stream_in_pieces_of_any_size(size: int) -> None:
    stream, events = EventStream(), []
    for i in range(0, len(STREAM), size):
        events += stream.feed(STREAM[i:i + size])
    assert events == [{"n": 1}, {"n": 2}]  # nothing after [DONE]
    assert stream.done
    stream.end()


def test_event_stream_cut_off_before_done() -> None:
    stream = EventStream()
    assert stream.feed(b'data: {"n": 1}\n\ndata: {"n"') == [{"n": 1}]
    assert not stream.done
    with pytest.raises(NodeClientError, match=STREAM_ENDED_EARLY):
        stream.end()
