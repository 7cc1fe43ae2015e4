"""The blocking client of the node's local API, for the CLI.

It speaks plain HTTP/1.1 (http.client) to 127.0.0.1, one request per connection; finding the
node, the headers, decoding and the errors are swarm.client.core's, shared with the desktop
app's asyncio client.
"""

from __future__ import annotations

import http.client
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm.client import core

DEFAULT_TIMEOUT_S = 30.0


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
        """The client of the node running for `data_dir`; NodeClientError when there is none."""
        port, secret = core.find_node(data_dir)
        return cls(data_dir, port, secret, timeout)

    def get_json(self, path: str) -> Any:
        return self.request("GET", path)

    def post_json(self, path: str, body: Any) -> Any:
        return self.request("POST", path, core.json_body(body))

    def stream_events(self, path: str, body: Any) -> Generator[dict[str, Any], None, None]:
        """POST `body` and yield each server-sent event's JSON until `data: [DONE]`.

        Closing the iterator early hangs up, which makes the node stop the generation."""
        data = core.json_body(body)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            try:
                conn.request("POST", path, body=data, headers=core.request_headers(
                    self.port, self.secret, "text/event-stream", data))
                resp = conn.getresponse()
            except ConnectionRefusedError:
                raise core.not_listening(self.data_dir, self.port) from None
            if resp.status >= 400:
                raise core.ApiError(resp.status, core.error_message(resp.read()))
            events = core.EventStream()
            for line in resp:
                yield from events.feed(line)
                if events.done:
                    return
            events.end()
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise core.NodeClientError(f"The stream from the Covey node broke off: {exc}") from None
        finally:
            conn.close()

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        """One request on a fresh connection; the decoded JSON reply, or None if empty."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=core.request_headers(
                self.port, self.secret, "application/json", body))
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
        except ConnectionRefusedError:
            raise core.not_listening(self.data_dir, self.port) from None
        except TimeoutError:
            raise core.no_answer(self.port, self.timeout) from None
        except (OSError, http.client.HTTPException) as exc:
            raise core.talk_failed(self.port, exc) from None
        finally:
            conn.close()
        return core.decode_reply(status, data)
