"""A blocking client for the node's local API, for the CLI and the desktop app.

It finds the node through `api.json` and `api-secret` in the data directory, speaks plain
HTTP/1.1 to 127.0.0.1 with the bearer secret, and turns every failure into NodeNotRunning
or ApiError with a message fit to show a user.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Written by the node (swarm.api.server), read here; this module stays free of trio.
SECRET_FILE = "api-secret"
INFO_FILE = "api.json"
INFO_VERSION = 1
DEFAULT_TIMEOUT_S = 30.0


class NodeClientError(Exception):
    """Talking to the local node failed; the message says why."""


class NodeNotRunning(NodeClientError):
    def __init__(self, data_dir: Path, detail: str = "") -> None:
        super().__init__(
            f"No Covey node is running for {data_dir}{f' ({detail})' if detail else ''}. "
            "Start one with: covey node --token TOKEN"
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
    """(port, pid) from api.json; NodeNotRunning when it is missing, unreadable or stale."""
    path = data_dir / INFO_FILE
    try:
        info = json.loads(path.read_text())
        if info.get("version") != INFO_VERSION:
            raise ValueError(f"unknown version {info.get('version')!r}")
        port, pid = info["port"], info["pid"]
        if not (isinstance(port, int) and 0 < port < 65536 and isinstance(pid, int)):
            raise ValueError("bad port or pid")
    except FileNotFoundError:
        raise NodeNotRunning(data_dir) from None
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise NodeNotRunning(data_dir, f"{path} is unreadable: {exc}") from None
    if not pid_alive(pid):
        raise NodeNotRunning(data_dir, f"process {pid} from {path} has exited") from None
    return port, pid


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


@dataclass(frozen=True)
class NodeClient:
    data_dir: Path
    port: int
    secret: str
    timeout: float = DEFAULT_TIMEOUT_S

    def __repr__(self) -> str:  # the secret stays out of tracebacks and logs
        return f"NodeClient(data_dir={self.data_dir!s}, port={self.port})"

    @classmethod
    def from_data_dir(cls, data_dir: Path, timeout: float = DEFAULT_TIMEOUT_S) -> NodeClient:
        port, _ = read_api_info(data_dir)
        secret_path = data_dir / SECRET_FILE
        try:
            secret = secret_path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise NodeClientError(f"Cannot read the node's API secret {secret_path}: {exc}"
                                  ) from None
        return cls(data_dir, port, secret, timeout)

    def get_json(self, path: str) -> Any:
        return self.request("GET", path)

    def post_json(self, path: str, body: Any) -> Any:
        return self.request("POST", path, json.dumps(body).encode())

    def _headers(self, body: bytes | None, accept: str) -> dict[str, str]:
        headers = {
            # Set explicitly: the server accepts only these exact Host values.
            "Host": f"127.0.0.1:{self.port}",
            "Authorization": f"Bearer {self.secret}",
            "Accept": accept,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        return headers

    def stream_events(self, path: str, body: Any) -> Iterator[Any]:
        """POST `body` and yield each server-sent event's JSON until `data: [DONE]`.

        Closing the iterator early hangs up, which makes the node stop the generation."""
        data = json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            try:
                conn.request("POST", path, body=data,
                             headers=self._headers(data, "text/event-stream"))
                resp = conn.getresponse()
            except ConnectionRefusedError:
                raise NodeNotRunning(self.data_dir, f"nothing listens on port {self.port}"
                                     ) from None
            if resp.status >= 400:
                raise ApiError(resp.status, error_message(resp.read()))
            for raw in resp:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if isinstance(event, dict) and "error" in event:
                    raise ApiError(500, error_message(payload.encode()))
                yield event
        except (TimeoutError, OSError, http.client.HTTPException, ValueError) as exc:
            raise NodeClientError(f"The stream from the Covey node broke off: {exc}") from None
        finally:
            conn.close()

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        """One request on a fresh connection; the decoded JSON reply, or None if empty."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=self._headers(body, "application/json"))
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
        except ConnectionRefusedError:
            raise NodeNotRunning(self.data_dir, f"nothing listens on port {self.port}") from None
        except TimeoutError:
            raise NodeClientError(f"The Covey node on port {self.port} did not answer "
                                  f"within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise NodeClientError(f"Talking to the Covey node on port {self.port} failed: "
                                  f"{exc}") from None
        finally:
            conn.close()
        return decode_reply(status, data)
