"""Federated mode: nodes that hold a whole model serve complete requests for the swarm.

- A federated node publishes a "federated" ledger entry (models, requests in flight, queue)
  and answers the serving protocol by running requests on its local route.
- `FederatedRoute` sends a request to the federated node with the fewest requests in flight
  (counted by this node at dispatch, plus what the node itself reports), ties at random, this
  node included, skipping nodes that just failed. If the node fails mid-reply, the request
  goes to another one with the text so far as a continuation (`swarm/routes/failover.py`),
  so the reply goes on.

Wire format on `/covey/federated/1.0.0`: one request frame (JSON), then reply frames (JSON):
{"type": "token", "text"} (with "logprob" when asked for), then {"type": "done", ...}; or
{"type": "error", "code", "message"}. Request fields added after the first version are sent
only when they differ from their defaults, so an older node serves what it can honour and
refuses (rather than ignores) the rest; `optional` carries what a node may ignore. An
embedding request is a request frame with `embed` instead of `request`, answered by one
frame (`swarm/routes/federated_embeddings.py`).

The client trusts a serving node with nothing unbounded (`ReplyLimits`): a reply ends at the
request's `max_tokens` (finish_reason "length", the stream closed), and a node whose frame or
reply is too big, whose frames are not reply frames, or that does not finish in time fails
like a node that vanished.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import MessageTooLarge
from libp2p.peer.id import ID

from backends.engine import EngineError
from backends.engine_protocol import (
    Done,
    Embeddings,
    GenerateRequest,
    Timings,
    Token,
    logprob_from_raw,
    request_from_raw,
)
from swarm.ledger.entries import FEDERATED_KEY, FederatedEntry, read
from swarm.ledger.rules import Ledger, is_live
from swarm.net.host import (
    parse_versioned,
    read_frame,
    reset_quietly,
    write_frame,
    write_json_frame,
)
from swarm.routes.embeddings import LocalEmbedder
from swarm.routes.failover import (
    AttemptFailed,
    Events,
    OutOfOptions,
    Progress,
    with_failover,
)
from swarm.routes.federated_embeddings import (
    EmbedCall,
    EmbedRefused,
    embed_frame,
    embeddings_frame,
    parse_embed_frame,
    parse_embeddings_reply,
)
from swarm.routes.local import LocalRoute
from swarm.routes.preparing import BundledModels
from swarm.routes.route import Busy, ModelUnknown, RequestRefused, RouteError, Served

log = logging.getLogger(__name__)

PROTOCOL = "/covey/federated/1.0.0"
WIRE_VERSION = 1
MAX_REQUEST_BYTES = 1024 * 1024
# One reply frame: a token, or the done frame that repeats the whole text (JSON-escaped).
MAX_REPLY_FRAME_BYTES = 1 << 20
MAX_REPLY_BYTES = 8 << 20  # every frame of one attempt together
CONNECT_TIMEOUT_S = 10.0
TOKEN_TIMEOUT_S = 120.0  # silence between two frames
DONE_GRACE_S = 10.0  # after max_tokens tokens, the wait for the done frame
# An attempt must finish within base + per token of max_tokens, and never later than max.
REPLY_DEADLINE_BASE_S = 120.0
REPLY_DEADLINE_PER_TOKEN_S = 1.0
REPLY_DEADLINE_MAX_S = 3600.0
MAX_ATTEMPTS = 3
# An embedding attempt: the node may load its embedding engine, then embeds up to 4,096 tokens.
EMBED_DEADLINE_S = 300.0
# Error codes with which a node refuses the embedding request itself: no other node would
# take it either.
EMBED_REFUSED_CODES = ("invalid_request", RequestRefused.code)


@dataclass(frozen=True)
class ReplyLimits:
    """What a client takes from a serving node in one attempt (see the constants)."""

    max_frame_bytes: int = MAX_REPLY_FRAME_BYTES
    max_reply_bytes: int = MAX_REPLY_BYTES
    deadline_base_s: float = REPLY_DEADLINE_BASE_S
    deadline_per_token_s: float = REPLY_DEADLINE_PER_TOKEN_S
    deadline_max_s: float = REPLY_DEADLINE_MAX_S
    embed_deadline_s: float = EMBED_DEADLINE_S

    def deadline_s(self, max_tokens: int) -> float:
        return min(self.deadline_base_s + max_tokens * self.deadline_per_token_s,
                   self.deadline_max_s)


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    name: str
    in_flight: int


def _serving(ledger: Ledger, admitted: set[str], self_id: str, now: float
             ) -> list[tuple[str, FederatedEntry]]:
    """(owner, entry) of each live, well-formed federated entry from an admitted peer or this
    node."""
    found = []
    for r in ledger.by_key(FEDERATED_KEY):
        if is_live(r, now) and (r.entry.owner == self_id or r.entry.owner in admitted):
            entry = read(FederatedEntry.from_value, r.entry.value)
            if entry is not None:
                found.append((r.entry.owner, entry))
    return found


def served_models(ledger: Ledger, admitted: set[str], self_id: str, now: float) -> list[str]:
    """Every model some federated node serves now."""
    return sorted({m for _, entry in _serving(ledger, admitted, self_id, now)
                   for m in entry.models})


def candidates(ledger: Ledger, model: str, admitted: set[str], self_id: str, now: float,
               names: dict[str, str]) -> list[Candidate]:
    """Federated nodes that serve `model` now, with their reported requests in flight."""
    return [Candidate(owner, names.get(owner, owner[-8:]), entry.in_flight)
            for owner, entry in _serving(ledger, admitted, self_id, now)
            if model in entry.models]


def pick(found: Sequence[Candidate], dispatched: dict[str, int], failed: set[str],
         rng: random.Random) -> Candidate | None:
    """Fewest requests in flight (ours at dispatch plus theirs), ties at random; None if
    every candidate just failed."""
    usable = [c for c in found if c.peer_id not in failed]
    if not usable:
        return None
    load = {c.peer_id: max(c.in_flight, dispatched.get(c.peer_id, 0)) for c in usable}
    least = min(load.values())
    return rng.choice([c for c in usable if load[c.peer_id] == least])


# Message fields besides role and content that cross the wire (tool turns), all strings.
MESSAGE_EXTRAS = ("tool_calls", "tool_call_id", "name")
# GenerateRequest fields newer than the first wire version: sent only when not at their
# defaults, so a node from before they existed (it refuses unknown fields) still serves
# requests that do not use them. Those in _OPTIONAL go beside the request, where an older
# node does not look.
_ADDED = ("min_p", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
          "top_logprobs", "tools", "grammar")
_OPTIONAL = ("fit_max_tokens",)
_DEFAULTS = {f.name: f.default for f in fields(GenerateRequest)}
MAX_STOPS = 16


def request_frame(model: str, request: GenerateRequest) -> bytes:
    raw = asdict(request)
    optional = {name: raw.pop(name) for name in _OPTIONAL}
    for name in _ADDED:
        if raw[name] == _DEFAULTS[name]:
            del raw[name]
    return json.dumps({"version": WIRE_VERSION, "model": model, "request": raw,
                       "optional": optional}).encode()


def parse_request_frame(data: bytes) -> tuple[str, GenerateRequest]:
    body = json.loads(data)
    if not isinstance(body, dict) or body.get("version") != WIRE_VERSION:
        raise ValueError("not a version 1 federated request")
    model, raw = body.get("model"), body.get("request")
    if not isinstance(model, str) or not isinstance(raw, dict):
        raise ValueError("request without a model")
    messages = raw.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("bad messages")
        raw["messages"] = tuple(
            {k: m[k] for k in ("role", "content", *MESSAGE_EXTRAS) if isinstance(m.get(k), str)}
            for m in messages)
    for name in ("tools", "grammar"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise ValueError(f"bad {name}")
    raw["stop"] = tuple(str(s) for s in raw.get("stop", ()))[:MAX_STOPS]
    optional = body.get("optional")
    if isinstance(optional, dict):
        raw.update({k: bool(optional[k]) for k in _OPTIONAL if k in optional})
    request = request_from_raw(raw)  # TypeError on unknown fields
    if not 1 <= request.max_tokens <= 32768:
        raise ValueError("max_tokens out of range")
    if len(request.logit_bias) > 1024 or not 0 <= request.top_logprobs <= 20:
        raise ValueError("logit_bias or top_logprobs out of range")
    return model, request


def token_frame(event: Token) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "token", "text": event.text}
    if event.logprob is not None:
        frame["logprob"] = asdict(event.logprob)
    if event.max_tokens_lowered_to is not None:
        frame["max_tokens_lowered_to"] = event.max_tokens_lowered_to
    return frame


def done_frame(event: Done) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "done", "finish_reason": event.finish_reason,
                             "text": event.text, "prompt_tokens": event.prompt_tokens,
                             "completion_tokens": len(event.tokens)}
    if event.max_tokens_lowered_to is not None:
        frame["max_tokens_lowered_to"] = event.max_tokens_lowered_to
    return frame


def _lowered(frame: dict[str, Any]) -> int | None:
    """A token or done frame's `max_tokens_lowered_to`, if it has one."""
    lowered = frame.get("max_tokens_lowered_to")
    return int(lowered) if lowered is not None else None


def parse_reply_frame(data: bytes) -> dict[str, Any]:
    """A reply frame as a JSON object with a known type; ValueError for anything else."""
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or reply.get("type") not in ("token", "done", "error"):
        raise ValueError("not a federated reply frame")
    return reply


class ReplyTally:
    """One attempt's reply as it streams in: its tokens' text, and the bytes it took."""

    def __init__(self, limits: ReplyLimits, max_tokens: int) -> None:
        self.limits = limits
        self.max_tokens = max_tokens
        self.texts: list[str] = []
        self.bytes = 0

    def take(self, data: bytes) -> dict[str, Any]:
        """Count one frame and parse it; ValueError if it breaks a limit or is not a reply."""
        self.bytes += len(data)
        if self.bytes > self.limits.max_reply_bytes:
            raise ValueError(f"the reply is over the {self.limits.max_reply_bytes}-byte limit")
        reply = parse_reply_frame(data)
        if reply["type"] == "token":
            self.texts.append(str(reply.get("text", "")))
        return reply

    @property
    def full(self) -> bool:
        """The reply has `max_tokens` tokens: only a done frame may follow."""
        return len(self.texts) >= self.max_tokens

    def cut(self, request_id: str) -> Done:
        """The reply ended here at `max_tokens`, whatever the node sends next."""
        texts = self.texts[:self.max_tokens]
        return Done(request_id, "length", "".join(texts), 0, (-1,) * len(texts), Timings())


def error_frame(exc: RouteError) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": exc.code, "message": str(exc)}
    if isinstance(exc, Busy):
        frame["retry_after_s"] = exc.retry_after_s
    return frame


class FederatedService:
    """This node's side: whether it serves, and the serving protocol's handler."""

    def __init__(self, local: LocalRoute, on_change: Callable[[], None],
                 bundled: BundledModels | None = None,
                 embedder: LocalEmbedder | None = None) -> None:
        self.local = local
        self.embedder = embedder
        self.models: list[str] = []
        self.in_flight = 0
        self._on_change = on_change
        self._bundled = bundled

    @property
    def enabled(self) -> bool:
        return bool(self.models)

    def ledger_value(self) -> dict[str, Any]:
        return FederatedEntry(tuple(self.models), self.in_flight,
                              self.local.gate.max_waiting).to_value()

    async def run_local(self, request: GenerateRequest, model: str
                        ) -> AsyncGenerator[Token | Done, None]:
        async with self._serving(model), aclosing(self.local.generate(request, model)) as events:
            async for event in events:
                yield event

    @asynccontextmanager
    async def _serving(self, model: str) -> AsyncIterator[None]:
        """Counts a request in flight while it runs, once `model` is ready to serve."""
        self.in_flight += 1
        self._on_change()
        try:
            if self._bundled is not None:
                await self._bundled.ready(model)
            yield
        finally:
            self.in_flight -= 1
            self._on_change()

    async def embed_local(self, call: EmbedCall) -> Embeddings:
        """`call`'s vectors from this node's own embedding engine; RouteError or EngineError
        as `LocalEmbedder.embed` raises them."""
        if self.embedder is None or call.model not in self.models:
            raise ModelUnknown(f"this node does not embed with {call.model!r}")
        async with self._serving(call.model):
            return await self.embedder.embed(call.model, call.inputs, call.max_total_tokens)

    async def _handle_embed(self, stream: INetStream, body: dict[str, Any]) -> None:
        try:
            call = parse_embed_frame(body)
        except EmbedRefused as exc:
            await write_json_frame(stream, {"type": "error", "code": "invalid_request",
                                            "message": str(exc)})
            return
        try:
            await write_json_frame(stream, embeddings_frame(await self.embed_local(call)))
        except RouteError as exc:
            await write_json_frame(stream, error_frame(exc))
        except EngineError as exc:
            await write_json_frame(stream, {"type": "error", "code": "engine", "message": str(exc)})

    async def handle(self, stream: INetStream) -> None:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            data = await read_frame(stream, MAX_REQUEST_BYTES)
        body = parse_versioned(data, WIRE_VERSION, "federated request")
        if body.get("embed") is not None:
            await self._handle_embed(stream, body)
            return
        model, request = parse_request_frame(data)
        if model not in self.models:
            await write_json_frame(stream, {"type": "error", "code": "model_not_found",
                                            "message": f"this node does not serve {model!r}"})
            return
        events = self.run_local(request, model)
        try:
            async for event in events:
                await write_json_frame(stream, token_frame(event) if isinstance(event, Token)
                                       else done_frame(event))
        except RouteError as exc:
            await write_json_frame(stream, error_frame(exc))
        except EngineError as exc:
            await write_json_frame(stream, {"type": "error", "code": "engine", "message": str(exc)})
        finally:
            await events.aclose()


class _Failed(Exception):
    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


def _give_up(causes: Sequence[BaseException]) -> RouteError:
    if any(isinstance(c, _Failed) and c.busy for c in causes):
        return Busy("every federated node serving this model is busy", 5)
    last = f" (last: {causes[-1]})" if causes and str(causes[-1]) else ""
    return RouteError(f"every federated node serving this model failed{last}")


class FederatedRoute:
    """The client side: any node can send its requests to the swarm's federated nodes."""

    name = "federated"

    def __init__(self, host: IHost, service: FederatedService,
                 found: Callable[[str], list[Candidate]], all_models: Callable[[], list[str]],
                 rng: random.Random | None = None, limits: ReplyLimits | None = None) -> None:
        self.host = host
        self.limits = limits or ReplyLimits()
        self.service = service
        self._found = found
        self._all_models = all_models
        self._dispatched: dict[str, int] = {}
        self._rng = rng or random.Random()

    def model_ids(self) -> list[str]:
        return self._all_models()

    def machines(self, model: str) -> list[str]:
        """The federated nodes serving `model`; a reply names the ones that served it."""
        return sorted(c.name for c in self._found(model))

    def generate(self, request: GenerateRequest, model: str
                 ) -> AsyncGenerator[Token | Done | Served, None]:
        failed: set[str] = set()  # peer ids that failed this reply
        return with_failover(
            request, lambda part, progress: self._attempt(part, model, progress, failed),
            MAX_ATTEMPTS, _give_up)

    async def _attempt(self, request: GenerateRequest, model: str, progress: Progress,
                       failed: set[str]) -> Events:
        """One try on the least loaded node that has not failed this reply."""
        found = self._found(model)
        if not found:
            raise ModelUnknown(f"no federated node serves {model!r}")
        target = pick(found, self._dispatched, failed, self._rng)
        if target is None:
            raise OutOfOptions
        yield Served(target.name, progress.lost)
        self._dispatched[target.peer_id] = self._dispatched.get(target.peer_id, 0) + 1
        try:
            async with aclosing(self._events(target, request, model)) as events:
                async for event in events:
                    yield event
                    if isinstance(event, Done):
                        return
            raise _Failed("the reply ended without finishing")
        except Exception as exc:  # noqa: BLE001 - a vanished node fails in many ways
            failed.add(target.peer_id)
            log.warning("federated node %s failed (%r); trying another", target.name, exc)
            raise AttemptFailed(
                f"{target.name} failed mid-reply; continuing on another machine"
                if progress.produced else f"{target.name} could not serve; trying another"
            ) from exc
        finally:
            self._dispatched[target.peer_id] -= 1

    async def _events(self, target: Candidate, request: GenerateRequest, model: str
                      ) -> AsyncGenerator[Token | Done, None]:
        if target.peer_id == self.host.get_id().to_base58():
            try:
                async with aclosing(self.service.run_local(request, model)) as events:
                    async for event in events:
                        yield event
            except Busy as exc:
                raise _Failed(str(exc), busy=True) from None
            return
        budget_s = self.limits.deadline_s(request.max_tokens)
        started = trio.current_time()
        deadline = started + budget_s
        with trio.fail_at(min(deadline, started + CONNECT_TIMEOUT_S)):
            stream = await self.host.new_stream(ID.from_base58(target.peer_id),
                                                [TProtocol(PROTOCOL)])
        try:
            await write_frame(stream, request_frame(model, request))
            tally = ReplyTally(self.limits, request.max_tokens)
            while True:
                try:
                    data = await self._next_frame(stream, tally, deadline)
                except trio.TooSlowError:
                    if tally.full:  # the done frame never came: the reply is whole anyway
                        yield tally.cut(request.id)
                        return
                    if trio.current_time() >= deadline:
                        raise _Failed(f"{target.name} did not finish the reply within "
                                      f"{budget_s:.0f} s") from None
                    raise
                reply = tally.take(data)
                kind = reply["type"]
                if kind == "token" and len(tally.texts) > request.max_tokens:
                    # A node that streams past max_tokens is cut: the reply has them all.
                    log.warning("federated node %s sent more than max_tokens", target.name)
                    yield tally.cut(request.id)
                    return
                lowered = _lowered(reply)
                if kind == "token":
                    logprob = reply.get("logprob")
                    yield Token(request.id, -1, tally.texts[-1],
                                logprob_from_raw(logprob) if logprob is not None else None,
                                lowered)
                elif kind == "done":
                    # A token's id is the serving node's; what counts is how many came.
                    yield Done(request.id, str(reply.get("finish_reason", "stop")),
                               str(reply.get("text", "")), int(reply.get("prompt_tokens", 0)),
                               (-1,) * len(tally.texts), Timings(), lowered)
                    return
                else:
                    raise _Failed(str(reply.get("message", "error")),
                                  busy=reply.get("code") == "busy")
        except MessageTooLarge as exc:
            raise _Failed(f"{target.name} sent a reply frame over the "
                          f"{self.limits.max_frame_bytes}-byte limit") from exc
        except (ValueError, TypeError, ParseError) as exc:  # over the reply's limit, or garbage
            raise _Failed(f"{target.name} sent a bad reply: {exc}") from exc
        finally:
            await reset_quietly(stream)

    async def embed(self, call: EmbedCall) -> tuple[Embeddings, str]:
        """`call`'s vectors from the least loaded federated node serving its model, and that
        node's name; another node if it fails, up to MAX_ATTEMPTS. RequestRefused when a
        node refuses the request itself (over a limit), which no other node would take."""
        failed: set[str] = set()
        causes: list[BaseException] = []
        for _ in range(MAX_ATTEMPTS):
            found = self._found(call.model)
            if not found:
                raise ModelUnknown(f"no federated node serves {call.model!r}")
            target = pick(found, self._dispatched, failed, self._rng)
            if target is None:
                break
            self._dispatched[target.peer_id] = self._dispatched.get(target.peer_id, 0) + 1
            try:
                return await self._embed_on(target, call), target.name
            except _Failed as exc:
                failed.add(target.peer_id)
                causes.append(exc)
                log.warning("federated node %s could not embed (%s)", target.name, exc)
            finally:
                self._dispatched[target.peer_id] -= 1
        raise _give_up(causes)

    async def _embed_on(self, target: Candidate, call: EmbedCall) -> Embeddings:
        if target.peer_id == self.host.get_id().to_base58():
            try:
                return await self.service.embed_local(call)
            except Busy as exc:
                raise _Failed(str(exc), busy=True) from None
        try:
            with trio.fail_after(self.limits.embed_deadline_s):
                reply = await self._embed_reply(target, call)
        except trio.TooSlowError:
            raise _Failed(f"{target.name} did not embed within "
                          f"{self.limits.embed_deadline_s:.0f} s") from None
        except (ValueError, TypeError, ParseError, MessageTooLarge) as exc:
            raise _Failed(f"{target.name} sent a bad reply: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a vanished node fails in many ways
            # A node from before embeddings crossed the wire closes the stream unanswered.
            raise _Failed(f"{target.name} closed the stream without embedding (a version "
                          f"that cannot embed for the swarm?): {exc!r}") from exc
        if reply["type"] == "error":
            message, code = str(reply.get("message", "error")), reply.get("code")
            if code in EMBED_REFUSED_CODES:
                raise RequestRefused(f"{target.name} refused the request: {message}")
            raise _Failed(message, busy=code == "busy")
        if reply["type"] != "embeddings":
            raise _Failed(f"{target.name} sent a bad reply: not an embeddings frame")
        try:
            return parse_embeddings_reply(reply, call, f"federated-embed-{target.name}")
        except ValueError as exc:
            raise _Failed(f"{target.name} sent a bad reply: {exc}") from exc

    async def _embed_reply(self, target: Candidate, call: EmbedCall) -> dict[str, Any]:
        """The one reply frame a node sends to `call`, as a JSON object with a type."""
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await self.host.new_stream(ID.from_base58(target.peer_id),
                                                [TProtocol(PROTOCOL)])
        try:
            await write_frame(stream, embed_frame(call))
            reply = json.loads(await read_frame(stream, self.limits.max_reply_bytes))
        finally:
            await reset_quietly(stream)
        if not isinstance(reply, dict) or not isinstance(reply.get("type"), str):
            raise ValueError("not a federated reply frame")
        return reply

    async def _next_frame(self, stream: INetStream, tally: ReplyTally, deadline: float
                          ) -> bytes:
        """The next frame within the silence timeout and the attempt's deadline; once the
        reply is full, only a short wait for its done frame."""
        wait_s = DONE_GRACE_S if tally.full else TOKEN_TIMEOUT_S
        with trio.fail_at(min(deadline, trio.current_time() + wait_s)):
            return await read_frame(stream, self.limits.max_frame_bytes)
