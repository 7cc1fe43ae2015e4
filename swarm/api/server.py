"""The node's local HTTP API: an h11 server on trio that listens on loopback only.

It owns the transport and the gate in front of every handler: the Host check (against DNS
rebinding), CORS for the browser origins allowed (swarm.api.cors), the bearer secret, size and
time limits, a cap on open connections (see
swarm.api.limits), OpenAI-style JSON errors, and chunked streaming. The files through which
a client finds it (`api-secret`, `api.json`) belong to swarm.api.files.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import h11
import trio

from swarm.api.cors import CorsPolicy, host_values
from swarm.api.limits import ConnectionSlots, Slot

if TYPE_CHECKING:
    # libp2p installs trio-typing, whose stubs shadow trio's own and define TaskStatus here.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

LOOPBACK_BIND_HOSTS = ("127.0.0.1", "::1")
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
# A connection may wait IDLE_TIMEOUT_S for the first byte of a request (keep-alive), then has
# HEAD_TIMEOUT_S to finish the head: a head trickled in byte by byte (slowloris) is cut off.
IDLE_TIMEOUT_S = 10.0
HEAD_TIMEOUT_S = 10.0
# Per listener; the local API and --api-listen each have their own. Far below the 1,024 open
# files a desktop allows by default, so a flood of sockets never starves the rest of the node.
MAX_CONNECTIONS = 128
FULL_WARNING_EVERY_S = 60.0
BODY_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 30.0
# After an error response the client may still be sending; reading it off before closing
# keeps the kernel from answering with a reset that would destroy our response in flight.
DRAIN_TIMEOUT_S = 1.0
DRAIN_MAX_BYTES = 4 * MAX_BODY_BYTES
RECEIVE_SIZE = 64 * 1024
_HEAD_TOO_LARGE = f"Request head is over {MAX_HEAD_BYTES} bytes"

_FRAMING_HEADERS = frozenset({"content-length", "content-type", "transfer-encoding"})

@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lowercased; repeated headers joined with ", "
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON, or an HttpError(400) a handler can let propagate."""
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, f"Request body is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Mapping[str, str] | None = None
             ) -> Response:
        return cls(status, json.dumps(data).encode(), "application/json", headers or {})


@dataclass(frozen=True)
class StreamingResponse:
    """A body produced while it is sent, one HTTP/1.1 chunk per item (e.g. server-sent events)."""

    chunks: AsyncIterable[bytes]
    status: int = 200
    content_type: str = "text/event-stream"
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]


class HttpError(Exception):
    """Raised by a handler (or the server) to answer with a JSON error instead of a 500."""

    def __init__(self, status: int, message: str, kind: str | None = None, *,
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = kind or error_type(status)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def error_type(status: int) -> str:
    return {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        405: "invalid_request_error",
        408: "timeout_error",
        413: "request_too_large",
        429: "rate_limit_error",
        431: "request_too_large",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_response(status: int, message: str, kind: str | None = None,
                   headers: Mapping[str, str] | None = None, *, param: str | None = None,
                   code: str | None = None) -> Response:
    """OpenAI's error shape, which every failure uses: {"error": {message, type, param, code}}."""
    body = {"error": {"message": message, "type": kind or error_type(status), "param": param,
                      "code": code}}
    return Response.json(body, status, headers)


MIN_NETWORK_KEY_CHARS = 16


def check_bind_host(host: str) -> str:
    """The host unchanged if it is a loopback address we bind to; ValueError otherwise."""
    if host not in LOOPBACK_BIND_HOSTS:
        raise ValueError(
            f"The local API binds only to {' or '.join(LOOPBACK_BIND_HOSTS)}, not {host!r}: "
            "it controls this node and must never be reachable from a network."
        )
    return host


def allowed_hosts(port: int) -> frozenset[str]:
    return frozenset({f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"})


def bearer_matches(authorization: str | None, secret: str) -> bool:
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Bytes, because compare_digest refuses non-ASCII str and the header may hold anything.
    return hmac.compare_digest(token.strip().encode("latin-1", "replace"), secret.encode())


def split_target(target: str) -> tuple[str, dict[str, str]]:
    path, _, query = target.partition("?")
    return path, dict(parse_qsl(query, keep_blank_values=True))


def decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def own_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """A handler's extra headers, minus the framing ones the server itself decides."""
    return [(k, v) for k, v in headers.items() if k.lower() not in _FRAMING_HEADERS]


def head_size(event: h11.Request) -> int:
    """Roughly the bytes the request head took on the wire."""
    return len(event.method) + len(event.target) + sum(
        len(name) + len(value) + 4 for name, value in event.headers)


def declared_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("content-length")
    # h11 has already rejected malformed or conflicting lengths.
    return int(value) if value is not None and value.isdigit() else None


class _Closed(Exception):
    """The peer went away or stalled; the connection ends without another word."""


class _Conn:
    """One accepted socket and its h11 state, with deadline-bound reads and writes."""

    def __init__(self, stream: trio.abc.Stream, slot: Slot) -> None:
        self.stream = stream
        self.slot = slot
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.cors_headers: dict[str, str] = {}  # for the request being answered

    async def next_event(self, deadline: float) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self._receive_by(deadline))

    async def next_head(self, idle_timeout: float, head_timeout: float) -> Any:
        """The event that starts the next request: `idle_timeout` for its first byte, then
        `head_timeout` for the rest of the head. TimeoutError when either runs out."""
        started = bool(self.h11.trailing_data[0])  # pipelined bytes already began it
        deadline = trio.current_time() + (head_timeout if started else idle_timeout)
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self._receive_by(deadline)
            if data and not started:
                started = True
                deadline = trio.current_time() + head_timeout
            self.h11.receive_data(data)

    async def _receive_by(self, deadline: float) -> bytes:
        with trio.move_on_at(deadline) as scope:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        if scope.cancelled_caught:
            raise TimeoutError
        return data

    async def send(self, *events: Any) -> None:
        data = b"".join(b for b in (self.h11.send(e) for e in events) if b)
        with trio.move_on_after(SEND_TIMEOUT_S) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise _Closed

    async def send_response(self, resp: Response) -> None:
        headers = [*own_headers({**self.cors_headers, **resp.headers}),
                   ("content-type", resp.content_type),
                   ("content-length", str(len(resp.body)))]
        await self.send(h11.Response(status_code=resp.status, headers=headers),
                        h11.Data(data=resp.body), h11.EndOfMessage())

    async def hung_up(self) -> bool:
        """Wait for the client's next bytes: True when it closed the connection instead; bytes
        it sent (a pipelined request) are kept for the next cycle and end the watch (False)."""
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return True
        if not data:
            return True
        self.h11.receive_data(data)
        return False

    async def close(self) -> None:
        """Half-close, read off what the client is still sending, then close."""
        try:
            if isinstance(self.stream, trio.SocketStream):
                await self.stream.send_eof()
            drained = 0
            with trio.move_on_after(DRAIN_TIMEOUT_S):
                while drained < DRAIN_MAX_BYTES:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await trio.aclose_forcefully(self.stream)


class LocalApi:
    """Routes plus the loopback server that guards and dispatches them."""

    def __init__(self, secret: str, *, max_body: int = MAX_BODY_BYTES,
                 head_timeout: float = HEAD_TIMEOUT_S, body_timeout: float = BODY_TIMEOUT_S,
                 idle_timeout: float = IDLE_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
                 cors: CorsPolicy | None = None, host_names: Iterable[str] = ()) -> None:
        if not secret:
            # An empty secret would let "Authorization: Bearer " through.
            raise ValueError("The local API needs a non-empty secret")
        self._secret = secret
        self.max_body = max_body
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self.slots = ConnectionSlots(max_connections)
        self._warned_full_at: float | None = None
        self.routes: dict[str, dict[str, Handler]] = {}
        self._stop_on_hangup: set[Handler] = set()
        self.port: int | None = None
        self.cors = cors or CorsPolicy()
        self.host_names = tuple(host_names)  # --api-host: answered on every listener

    def __repr__(self) -> str:  # keeps the secret out of any log that prints the object
        return f"LocalApi(port={self.port}, routes={sorted(self.routes)})"

    def add_route(self, method: str, path: str, handler: Handler, *,
                  stop_on_hangup: bool = False) -> None:
        """`path` may end in one `{parameter}`: it then takes any non-empty rest of a path
        (the handler reads it from `request.path`). With `stop_on_hangup`, a client that
        closes its connection before the answer cancels the handler (long work no one waits
        for); a client that half-closes after its request counts as gone too."""
        self.routes.setdefault(path, {})[method.upper()] = handler
        if stop_on_hangup:
            self._stop_on_hangup.add(handler)

    def methods(self, path: str) -> dict[str, Handler] | None:
        """The handlers by method for `path`, an exact route before a parameterised one."""
        found = self.routes.get(path)
        if found is not None:
            return found
        for template, methods in self.routes.items():
            prefix, brace, _ = template.partition("{")
            if brace and template.endswith("}") and path.startswith(prefix) \
                    and len(path) > len(prefix):
                return methods
        return None

    async def serve(self, port: int, *, host: str = "127.0.0.1",
                    task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on loopback until cancelled; port 0 picks a free one, reported via started()."""
        check_bind_host(host)
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        hosts = allowed_hosts(self.port) | host_values(self.host_names, self.port)
        log.info("Local API listening on %s port %d", host, self.port)
        task_status.started(self.port)
        await trio.serve_listeners(lambda s: self._serve_connection(s, hosts), listeners)

    async def serve_network(self, host: str, port: int, *, names: Iterable[str] = (),
                            task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        """Listen on a network address: only for an API whose secret is a deliberate API key.

        The Host header must name this address, this machine's name, one of `names` (the
        addresses a wildcard listens on) or of `host_names` (DNS rebinding)."""
        if len(self._secret) < MIN_NETWORK_KEY_CHARS:
            raise ValueError(
                f"an API key of at least {MIN_NETWORK_KEY_CHARS} characters is needed to "
                "listen on a network"
            )
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        own = {host, socket.gethostname(), f"{socket.gethostname()}.local", *names,
               *self.host_names}
        hosts = host_values(own, self.port) | allowed_hosts(self.port)
        log.info("API listening on %s port %d (API key required)", host, self.port)
        task_status.started(self.port)
        await trio.serve_listeners(lambda s: self._serve_connection(s, hosts), listeners)

    async def _serve_connection(self, stream: trio.abc.Stream, hosts: frozenset[str]) -> None:
        evicted = trio.CancelScope()
        slot = self.slots.admit(evicted.cancel, trio.current_time())
        if slot is None:
            self._warn_full()
            await trio.aclose_forcefully(stream)
            return
        conn = _Conn(stream, slot)
        try:
            with evicted:  # cancelled when a newcomer takes the slot of this waiting one
                try:
                    while await self._serve_one(conn, hosts):
                        conn.h11.start_next_cycle()
                except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                except Exception:
                    # An escaping exception would cancel serve_listeners and take the API down.
                    log.exception("Local API connection failed")
                # Draining keeps the socket a while: it holds the slot, but gives it up first.
                slot.waiting(trio.current_time())
                await conn.close()
        finally:
            self.slots.release(slot)
            await trio.aclose_forcefully(stream)  # a no-op unless eviction cut close() short

    def _warn_full(self) -> None:
        now = trio.current_time()
        if self._warned_full_at is None or now - self._warned_full_at >= FULL_WARNING_EVERY_S:
            self._warned_full_at = now
            log.warning("API on port %s: all %d connections are busy; refusing new ones",
                        self.port, self.slots.limit)

    async def _serve_one(self, conn: _Conn, hosts: frozenset[str]) -> bool:
        """Answer one request; True when the connection can carry another."""
        conn.slot.waiting(trio.current_time())
        try:
            event = await conn.next_head(self.idle_timeout, self.head_timeout)
        except h11.RemoteProtocolError as exc:
            await self._send_error(conn, exc.error_status_hint, _protocol_message(exc))
            return False
        except TimeoutError:
            # Mid-head we owe the client a reason; an idle keep-alive socket just goes.
            if conn.h11.trailing_data[0]:
                await self._send_error(conn, 408, "Timed out reading the request head")
            return False
        if isinstance(event, h11.ConnectionClosed):
            return False
        assert isinstance(event, h11.Request)
        conn.slot.busy()

        method, target = event.method.decode("ascii"), event.target.decode("latin-1")
        headers = decode_headers(event.headers)
        # No CORS header at all for a request whose Host is wrong (a rebound page).
        conn.cors_headers = (self.cors.response_headers(headers.get("origin"))
                             if headers.get("host") in hosts else {})
        if head_size(event) > MAX_HEAD_BYTES:
            # h11 bounds only a head still incomplete; one that arrived whole needs this.
            return await self._reject(conn, error_response(431, _HEAD_TOO_LARGE))
        rejection = self._gate(method, target, headers, hosts)
        if rejection is not None:
            return await self._reject(conn, rejection)

        if conn.h11.they_are_waiting_for_100_continue:
            await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        try:
            body = await self._read_body(conn)
        except HttpError as exc:
            await self._send_error(conn, exc.status, exc.message)
            return False
        except h11.RemoteProtocolError as exc:
            await self._send_error(conn, exc.error_status_hint, _protocol_message(exc))
            return False

        path, query = split_target(target)
        request = Request(method, path, query, headers, body)
        methods = self.methods(path)
        assert methods is not None  # the gate checked
        await self._dispatch(conn, methods[method], request)
        return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE

    def _gate(self, method: str, target: str, headers: Mapping[str, str],
              hosts: frozenset[str]) -> Response | None:
        """The error a request earns from its head alone, or None to let it through."""
        if not target.startswith("/"):
            return error_response(400, "The request target must be a path")
        # Host before auth: a rebound browser page must learn nothing, not even "wrong secret".
        if headers.get("host") not in hosts:
            return error_response(403, "Host header not allowed; use 127.0.0.1:<port>")
        # A browser's preflight carries no key; it learns only whether its origin may call.
        if self.cors.is_preflight(method, headers):
            allowed = self.cors.preflight_headers(headers)
            if allowed is None:
                return error_response(403, "Origin not allowed")
            return Response(204, b"", "text/plain", allowed)
        if not bearer_matches(headers.get("authorization"), self._secret):
            return error_response(401, "Missing or wrong API secret (Authorization: Bearer)",
                                  headers={"www-authenticate": "Bearer"})
        length = declared_length(headers)
        if length is not None and length > self.max_body:
            return error_response(413, f"Request body is over {self.max_body} bytes")
        path, _ = split_target(target)
        methods = self.methods(path)
        if methods is None:
            return error_response(404, f"No such endpoint: {path}")
        if method not in methods:
            return error_response(405, f"Method {method} not allowed on {path}",
                                  headers={"allow": ", ".join(sorted(methods))})
        return None

    async def _reject(self, conn: _Conn, resp: Response) -> bool:
        """Send a gate error; keep the connection only if the request carried no body."""
        try:
            bodiless = conn.h11.next_event() is not h11.NEED_DATA and \
                conn.h11.their_state is h11.DONE
        except h11.RemoteProtocolError:
            bodiless = False
        if not bodiless:
            resp = Response(resp.status, resp.body, resp.content_type,
                            {**resp.headers, "connection": "close"})
        await conn.send_response(resp)
        return bodiless and conn.h11.our_state is h11.DONE

    async def _read_body(self, conn: _Conn) -> bytes:
        deadline = trio.current_time() + self.body_timeout
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = await conn.next_event(deadline)
            except TimeoutError:
                raise HttpError(408, "Timed out reading the request body") from None
            if isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            if isinstance(event, h11.ConnectionClosed):
                raise _Closed
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:  # chunked bodies announce no length up front
                    raise HttpError(413, f"Request body is over {self.max_body} bytes")
                parts.append(event.data)

    async def _dispatch(self, conn: _Conn, handler: Handler, request: Request) -> None:
        resp: Response | StreamingResponse
        try:
            resp = await self._call(conn, handler, request)
            if not isinstance(resp, Response | StreamingResponse):
                raise TypeError(f"handler returned {type(resp).__name__}, not a Response")
        except HttpError as exc:
            resp = error_response(exc.status, exc.message, exc.type, exc.headers,
                                  param=exc.param, code=exc.code)
        except _Closed:
            raise  # the client hung up: nothing to answer
        except Exception:
            log.exception("Local API handler for %s %s failed", request.method, request.path)
            resp = error_response(500, "Internal error in the node; see its log")
        if isinstance(resp, StreamingResponse):
            await self._send_stream(conn, resp, request)
        else:
            await conn.send_response(resp)

    async def _call(self, conn: _Conn, handler: Handler, request: Request
                    ) -> Response | StreamingResponse:
        """`handler(request)`, cancelled if the client hangs up first when the route asks
        for that (then _Closed: there is no one to answer)."""
        if handler not in self._stop_on_hangup:
            return await handler(request)
        gone = False
        result: list[Response | StreamingResponse | Exception] = []
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                nonlocal gone
                if await conn.hung_up():
                    gone = True
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                result.append(await handler(request))
            except Exception as exc:  # raised below, outside the nursery's exception group
                result.append(exc)
            nursery.cancel_scope.cancel()
        if gone or not result:
            raise _Closed
        if isinstance(result[0], Exception):
            raise result[0]
        return result[0]

    async def _send_stream(self, conn: _Conn, resp: StreamingResponse, request: Request
                           ) -> None:
        headers = [*own_headers({**conn.cors_headers, **resp.headers}),
                   ("content-type", resp.content_type)]
        if resp.content_type.startswith("text/event-stream"):
            headers.append(("cache-control", "no-cache"))
        await conn.send(h11.Response(status_code=resp.status, headers=headers))
        chunks = aiter(resp.chunks)
        try:
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except Exception:
                    # Headers are gone; ending without the last chunk tells the client the
                    # body was cut short.
                    log.exception("Local API stream for %s %s failed",
                                  request.method, request.path)
                    raise _Closed from None
                if chunk:  # an empty chunk would read as the end of the body
                    await conn.send(h11.Data(data=chunk))
        finally:
            # A client that hangs up mid-stream must still release the generator's resources.
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()
        await conn.send(h11.EndOfMessage())

    async def _send_error(self, conn: _Conn, status: int, message: str) -> None:
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        await conn.send_response(error_response(status, message,
                                                headers={"connection": "close"}))


def _protocol_message(exc: h11.RemoteProtocolError) -> str:
    if exc.error_status_hint == 431:
        return _HEAD_TOO_LARGE
    return f"Malformed HTTP request: {exc}"

