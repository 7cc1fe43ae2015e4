"""The sans-IO core of both clients of the node's local API: no sockets, no event loop.

It finds the node (`api.json` and `api-secret`, see swarm.api.files), builds the headers of a
request, decodes a whole reply and the lines of a server-sent event stream, and defines the
errors, whose messages are written for users. The blocking client (sync_client) and the
asyncio one (async_client) add only their transport, so both fail the same way.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Final

from swarm.api.files import INFO_FILE, SECRET_FILE, ApiInfo, SecretError, read_secret

STREAM_ENDED_EARLY = "The stream from the Covey node ended before the reply did"


class NodeClientError(Exception):
    """Talking to the local node failed; the message says why."""


class NodeNotRunning(NodeClientError):
    """No node runs for the data directory: starting one is the remedy."""

    def __init__(self, data_dir: Path, detail: str = "") -> None:
        super().__init__(
            f"No Covey node is running for {data_dir}{f' ({detail})' if detail else ''}. "
            "Start one with: covey node --token-file FILE"
        )
        self.data_dir = data_dir


class ApiError(NodeClientError):
    """The node answered with an error status; `message` is the node's own explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Covey node answered {status}: {message}")
        self.status = status
        self.message = message


def pid_alive(pid: int) -> bool:
    if sys.platform == "win32":
        # os.kill(pid, 0) sends CTRL_C_EVENT on Windows; let the connection attempt decide.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


def read_api_info(data_dir: Path) -> tuple[int, int]:
    """(port, pid) of the node from api.json; NodeNotRunning when it is missing, bad or stale."""
    path = data_dir / INFO_FILE
    try:
        info = ApiInfo.read(data_dir)
    except FileNotFoundError:
        raise NodeNotRunning(data_dir) from None
    except (OSError, ValueError) as exc:
        raise NodeNotRunning(data_dir, f"{path} is unreadable: {exc}") from None
    if not pid_alive(info.pid):
        raise NodeNotRunning(data_dir, f"process {info.pid} from {path} has exited")
    return info.port, info.pid


def find_secret(data_dir: Path) -> str:
    """The running node's bearer secret; NodeClientError naming the file when it is unusable.

    Not NodeNotRunning: api.json names a live process, so a node most likely runs, and
    telling the user to start another would hide the real problem, this file."""
    path = data_dir / SECRET_FILE
    cannot = f"Cannot read the Covey node's API secret {path}"
    # A missing or empty secret is one the node writes anew when it starts.
    renew = "; restarting the node writes a new one"
    try:
        secret = read_secret(path)
    except SecretError as exc:
        raise NodeClientError(str(exc)) from None  # it says what to do
    except FileNotFoundError:
        raise NodeClientError(f"{cannot}: it does not exist{renew}") from None
    except OSError as exc:
        raise NodeClientError(f"{cannot}: {exc.strerror or exc}") from None
    if not secret:
        raise NodeClientError(f"{cannot}: it is empty{renew}")
    return secret


def find_node(data_dir: Path) -> tuple[int, str]:
    """(port, secret) of the node running for `data_dir`; see read_api_info and find_secret."""
    port, _ = read_api_info(data_dir)
    return port, find_secret(data_dir)


def not_listening(data_dir: Path, port: int) -> NodeNotRunning:
    """The error for a refused connection: api.json names a port where nothing listens."""
    return NodeNotRunning(data_dir, f"nothing listens on port {port}")


def no_answer(port: int, seconds: float) -> NodeClientError:
    return NodeClientError(f"The Covey node on port {port} did not answer within {seconds:g} s")


def talk_failed(port: int, exc: Exception) -> NodeClientError:
    return NodeClientError(f"Talking to the Covey node on port {port} failed: {exc}")


def json_body(body: Any) -> bytes | None:
    return None if body is None else json.dumps(body).encode()


def request_headers(port: int, secret: str, accept: str, body: bytes | None
                    ) -> dict[str, str]:
    """The headers of one request, which is the only one on its connection."""
    headers = {
        # Set explicitly: the server accepts only these exact Host values.
        "Host": f"127.0.0.1:{port}",
        "Authorization": f"Bearer {secret}",
        "Accept": accept,
        "Connection": "close",
    }
    if body is not None:
        headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(body))
    return headers


def error_message(body: bytes) -> str:
    """The message from an OpenAI-style error body, or the raw text when it is not one."""
    try:
        message = json.loads(body)["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return body.decode("utf-8", "replace").strip() or "(no message)"


def decode_reply(status: int, data: bytes) -> Any:
    """The JSON of a whole answer (None when empty); ApiError for an error status."""
    if status >= 400:
        raise ApiError(status, error_message(data))
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise NodeClientError(f"The Covey node sent a reply that is not JSON: {exc}") from None


DONE: Final = object()  # what parse_sse_line returns for `data: [DONE]`


def parse_sse_line(line: bytes) -> Any:
    """One SSE line (without its line end): the event's JSON object, DONE, or None for a line
    that carries no event. An `{"error": ...}` event is the node failing mid-stream: ApiError."""
    if not line.startswith(b"data: "):
        return None
    payload = line[len(b"data: "):]
    if payload == b"[DONE]":
        return DONE
    try:
        event = json.loads(payload)
    except ValueError:
        raise NodeClientError("The Covey node sent a stream event that is not JSON") from None
    if isinstance(event, dict) and "error" in event:
        raise ApiError(500, error_message(payload))
    return event if isinstance(event, dict) else None


class EventStream:
    """Bytes of a server-sent event stream in, in pieces of any size; events out.

    `feed` returns the complete events so far; `done` turns true at `data: [DONE]`, after
    which the rest is ignored. A transport that runs out of bytes before `done` calls `end`."""

    def __init__(self) -> None:
        self._pending = b""
        self.done = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self.done:
            return []
        *lines, self._pending = (self._pending + data).split(b"\n")
        events = []
        for line in lines:
            event = parse_sse_line(line.rstrip(b"\r"))
            if event is DONE:
                self.done = True
                break
            if event is not None:
                events.append(event)
        return events

    def end(self) -> None:
        """The stream closed; NodeClientError unless it had ended the reply."""
        if not self.done:
            raise NodeClientError(STREAM_ENDED_EARLY)
