"""The desktop app's asyncio client for this machine's node API.

The app runs on Qt's event loop through qasync, so every call here is a coroutine and nothing
blocks the Qt thread. It speaks HTTP/1.1 (h11) to 127.0.0.1, one request per connection;
finding the node, the headers, decoding and the errors are swarm.client.core's, shared with
the CLI's blocking client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11

from swarm.client import core

REQUEST_TIMEOUT_S = 15.0
STREAM_IDLE_TIMEOUT_S = 600.0  # a model load on a slow machine can be silent this long
READ_BYTES = 65536


@dataclass(frozen=True)
class NodeLink:
    data_dir: Path
    port: int
    secret: str

    def __repr__(self) -> str:  # the secret stays out of logs and tracebacks
        return f"NodeLink(data_dir={self.data_dir!s}, port={self.port})"

    @classmethod
    def find(cls, data_dir: Path) -> NodeLink:
        """The running node of this data directory; NodeClientError when there is none."""
        port, secret = core.find_node(data_dir)
        return cls(data_dir, port, secret)

    async def get(self, path: str, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        return await self.request("GET", path, None, timeout)

    async def post(self, path: str, body: Any, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        return await self.request("POST", path, body, timeout)

    async def request(self, method: str, path: str, body: Any,
                      timeout: float = REQUEST_TIMEOUT_S) -> Any:
        """One request; the decoded JSON answer (None when empty)."""
        try:
            async with asyncio.timeout(timeout):
                async with self._exchange(method, path, body, "application/json") as (
                        status, chunks):
                    data = b"".join([c async for c in chunks])
        except TimeoutError:
            raise core.no_answer(self.port, timeout) from None
        return core.decode_reply(status, data)

    async def stream(self, path: str, body: Any) -> AsyncGenerator[dict[str, Any], None]:
        """POST `body` and yield each server-sent event until `[DONE]`.

        Closing the generator early (`aclose`, or cancelling its consumer) hangs up, which
        stops the generation on the node."""
        async with self._exchange("POST", path, body, "text/event-stream") as (status, chunks):
            if status >= 400:
                raise core.ApiError(status, core.error_message(b"".join([c async for c in chunks])))
            events = core.EventStream()
            async for data in chunks:
                for event in events.feed(data):
                    yield event
                if events.done:
                    return
            events.end()

    @contextlib.asynccontextmanager
    async def _exchange(self, method: str, path: str, body: Any, accept: str
                        ) -> AsyncGenerator[tuple[int, AsyncGenerator[bytes, None]], None]:
        payload = core.json_body(body)
        headers = list(core.request_headers(self.port, self.secret, accept, payload).items())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            raise core.not_listening(self.data_dir, self.port) from None
        conn = h11.Connection(h11.CLIENT)
        try:
            writer.write(conn.send(h11.Request(method=method, target=path, headers=headers)))
            if payload is not None:
                writer.write(conn.send(h11.Data(data=payload)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            response = await _next_event(conn, reader)
            if not isinstance(response, h11.Response):
                raise core.NodeClientError("The Covey node closed the connection without answering")
            yield response.status_code, _body(conn, reader)
        except (OSError, h11.ProtocolError) as exc:
            raise core.talk_failed(self.port, exc) from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader,
                      idle_s: float = STREAM_IDLE_TIMEOUT_S) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            async with asyncio.timeout(idle_s):
                data = await reader.read(READ_BYTES)
        except TimeoutError:
            raise core.NodeClientError(f"The Covey node sent nothing for {idle_s:g} s") from None
        if not data and conn.their_state is h11.SEND_RESPONSE:
            raise core.NodeClientError("The Covey node closed the connection without answering")
        conn.receive_data(data)


async def _body(conn: h11.Connection, reader: asyncio.StreamReader) -> AsyncGenerator[bytes, None]:
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return
