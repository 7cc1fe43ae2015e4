"""The OpenAI-compatible API every node serves: /v1/models, /v1/chat/completions,
/v1/completions, streamed (server-sent events ending in `data: [DONE]`) or not.

Parsing and response shaping are pure functions; `OpenAiApi` only wires them to a route
chosen by `swarm.routes.router.Router`. The `covey_route` extension field picks a route
(`auto` by default) and every response carries `covey: {route, route_reason, machines}`
(with `relayed`, machine -> relay, for those reached through a relay);
`/v1/models` says per model what `auto` would do (`covey.auto: {route, reason}`) and whether
/v1/embeddings takes it (`covey.embeddings`: on this machine or a federated node).
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from backends.engine import EngineError
from backends.engine_protocol import Done, GenerateRequest, Token, TokenLogprob
from swarm.api import sampling
from swarm.api.sampling import MAX_STOPS as MAX_STOPS  # the limit, for the OpenAPI document
from swarm.api.sampling import BadRequest
from swarm.api.server import HttpError, Request, Response, StreamingResponse
from swarm.api.tools import (
    CallHold,
    ToolCall,
    ToolPlan,
    extract_tool_calls,
    parse_tool_plan,
    tool_calls_json,
    tool_message,
)
from swarm.routes.embeddings import LocalEmbedder
from swarm.routes.route import ROUTE_NAMES, Busy, RouteError, Served
from swarm.routes.router import Router

MAX_TOKENS_LIMIT = 32768
DEFAULT_MAX_TOKENS = 512
MAX_MESSAGES = 1024
LOWERED_HEADER = "x-covey-max-tokens-lowered"
MODELS_PATH = "/v1/models/"
LOWERED_USAGE_KEY = "covey_max_tokens_lowered_to"


@dataclass(frozen=True)
class Completion:
    """A parsed request: what to generate, with which model, over which route."""

    kind: str  # "chat" | "text"
    model: str
    generate: GenerateRequest
    stream: bool
    include_usage: bool
    route: str
    echo: str = ""  # /v1/completions with echo: the prompt, to start the reply's text
    tools: ToolPlan = ToolPlan()  # tools, tool_choice and response_format (`tools.py`)


_ids = itertools.count(1)


def parse_completion(body: Any, kind: str, headers: Mapping[str, str] | None = None
                     ) -> Completion:
    """Check a /v1/chat/completions ("chat") or /v1/completions ("text") body the way
    OpenAI does; raises BadRequest naming the offending parameter. A max_tokens over what
    the context leaves is lowered to fit unless the client asks for strictness (`headers`)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = _field(body, "model", str, required=True)
    if not model:
        raise BadRequest("model must not be empty", "model")
    n = _field(body, "n", int, default=1)
    if n != 1:
        raise BadRequest("only n=1 is supported", "n")
    max_tokens = _field(body, "max_tokens", int, default=None)
    if max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", int, default=DEFAULT_MAX_TOKENS)
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}", "max_tokens")
    temperature = float(_field(body, "temperature", (int, float), default=1.0))
    if not 0 <= temperature <= 2:
        raise BadRequest("temperature must be between 0 and 2", "temperature")
    top_p = float(_field(body, "top_p", (int, float), default=1.0))
    if not 0 < top_p <= 1:
        raise BadRequest("top_p must be greater than 0 and at most 1", "top_p")
    # llama.cpp's server takes repeat_penalty too; small models loop without it.
    repeat_penalty = float(_field(body, "repeat_penalty", (int, float), default=1.0))
    if not 0.5 <= repeat_penalty <= 2:
        raise BadRequest("repeat_penalty must be between 0.5 and 2", "repeat_penalty")
    seed = _field(body, "seed", int, default=None)
    options, echo = sampling.sampling_fields(body, kind)
    stream = _field(body, "stream", bool, default=False)
    stream_options = _field(body, "stream_options", dict, default={}) or {}
    include_usage = bool(stream_options.get("include_usage", False))
    route = _field(body, "covey_route", str, default="auto")
    if route not in ROUTE_NAMES:
        raise BadRequest(f"covey_route must be one of {', '.join(ROUTE_NAMES)}", "covey_route")
    deterministic = _field(body, "covey_deterministic", bool, default=False)
    tools = parse_tool_plan(body, chat=kind == "chat")
    request_id = f"api-{next(_ids)}-{secrets.token_hex(4)}"
    common = dict(id=request_id, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                  seed=seed, repeat_penalty=repeat_penalty,
                  deterministic=bool(deterministic),
                  fit_max_tokens=not sampling.strict_max_tokens(headers or {}, body),
                  tools=tools.tools_json, grammar=tools.grammar, **options)
    if kind == "chat":
        generate = GenerateRequest(messages=_messages(body.get("messages")), **common)
    else:
        generate = GenerateRequest(prompt=_prompt(body.get("prompt")), **common)
    return Completion(kind, model, generate, stream, include_usage, route,
                      echo=(generate.prompt or "") if echo else "", tools=tools)


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *,
           required: bool = False, default: Any = None) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"missing required parameter: {name}", name)
        return default
    value = body[name]
    bool_ok = kind is bool or (isinstance(kind, tuple) and bool in kind)
    if (isinstance(value, bool) and not bool_ok) or not isinstance(value, kind):
        wanted = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRequest(f"{name} must be of type {wanted}", name)
    return value


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    """Chat messages as the engine takes them; tool turns keep their fields as strings."""
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty array", "messages")
    if len(value) > MAX_MESSAGES:
        raise BadRequest(f"at most {MAX_MESSAGES} messages", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object", where)
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise BadRequest(f"{where}.role must be system, user, assistant or tool",
                             f"{where}.role")
        extra = tool_message(message, where)
        if content is None and "tool_calls" in extra:
            content = ""  # an assistant turn that only calls tools
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise BadRequest(f"{where}.content supports text parts only", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content,
                    **extra})
    return tuple(out)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise BadRequest("prompt must be a string (or a list of exactly one string)", "prompt")
    return value


# -- responses (pure) -----------------------------------------------------------------------


def usage(done: Done) -> dict[str, int]:
    completion = len(done.tokens)
    out = {"prompt_tokens": done.prompt_tokens, "completion_tokens": completion,
           "total_tokens": done.prompt_tokens + completion}
    if done.max_tokens_lowered_to is not None:
        out[LOWERED_USAGE_KEY] = done.max_tokens_lowered_to
    return out


def lowered_headers(event: Token | Done) -> dict[str, str]:
    """The header saying max_tokens was lowered to fit the context: from a whole reply's Done,
    or from a stream's first event (a stream says it in its usage and `covey` too)."""
    if event.max_tokens_lowered_to is None:
        return {}
    return {LOWERED_HEADER: str(event.max_tokens_lowered_to)}


def note_done(covey: dict[str, Any], done: Done) -> None:
    if done.max_tokens_lowered_to is not None:
        covey["max_tokens_lowered_to"] = done.max_tokens_lowered_to


def _logprobs(c: Completion, entries: Sequence[TokenLogprob], offset: int = 0) -> Any:
    if not c.generate.logprobs:
        return None
    if c.kind == "chat":
        return sampling.chat_logprobs(entries)
    return sampling.text_logprobs(entries, offset)


def finish_reason(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def reply_calls(c: Completion, text: str) -> list[ToolCall] | None:
    """The tool calls a chat reply makes, if tools were offered and it makes any."""
    return extract_tool_calls(text, c.tools.names) if c.tools.calls_possible else None


def full_response(c: Completion, done: Done, created: int, covey: dict[str, Any],
                  logprobs: Sequence[TokenLogprob] = ()) -> dict:
    calls = reply_calls(c, done.text) if c.kind == "chat" else None
    if calls:
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls_json(calls)}
        choice = {"index": 0, "message": message, "logprobs": _logprobs(c, logprobs),
                  "finish_reason": "tool_calls"}
        obj = "chat.completion"
    elif c.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                  "logprobs": _logprobs(c, logprobs), "finish_reason": finish_reason(done)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": c.echo + done.text,
                  "logprobs": _logprobs(c, logprobs, len(c.echo)),
                  "finish_reason": finish_reason(done)}
        obj = "text_completion"
    return {"id": c.generate.id, "object": obj, "created": created, "model": c.model,
            "choices": [choice], "usage": usage(done), "covey": covey}


def chunk(c: Completion, created: int, covey: dict[str, Any], text: str | None = None,
          done: Done | None = None, first: bool = False,
          logprob: TokenLogprob | None = None, calls: list[ToolCall] | None = None) -> dict:
    """One streamed chunk: a piece of text (with its token's logprob when asked for), or
    (with `done`) the closing finish_reason, or the tool calls (a closing chunk with `done`
    and `calls` says "tool_calls")."""
    reason = finish_reason(done) if done is not None else None
    if done is not None and calls:
        reason = "tool_calls"
    logprobs = _logprobs(c, [logprob]) if logprob is not None else None
    if c.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        if calls and done is None:
            delta["tool_calls"] = tool_calls_json(calls, streamed=True)
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs,
                  "finish_reason": reason}
    body = {"id": c.generate.id, "object": _chunk_object(c), "created": created,
            "model": c.model,
            "choices": [choice], "covey": covey}
    if c.include_usage:
        body["usage"] = None
    return body


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def error_event(message: str, kind: str) -> bytes:
    return sse({"error": {"message": message, "type": kind, "param": None, "code": None}})


# -- handlers --------------------------------------------------------------------------------


class OpenAiApi:
    def __init__(self, router: Router,
                 relayed: Callable[[], dict[str, str]] = dict) -> None:
        self._router = router
        self._relayed = relayed  # machine name -> the relay it is reached through

    async def models(self, request: Request) -> Response:
        return Response.json({"object": "list", "data": self._models()})

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{model}: one entry of the list; 404 in OpenAI's shape if none."""
        wanted = unquote(request.path.removeprefix(MODELS_PATH))
        for entry in self._models():
            if entry["id"] == wanted:
                return Response.json(entry)
        raise HttpError(404, f"The model {wanted!r} does not exist", "invalid_request_error",
                        param="model", code="model_not_found")

    def _models(self) -> list[dict[str, Any]]:
        by_model: dict[str, dict[str, Any]] = {}
        for route in self._router.routes():
            for model in route.model_ids():
                entry = by_model.setdefault(model, {"routes": [], "machines": []})
                entry["routes"].append(route.name)
                entry["machines"] += [
                    m for m in route.machines(model) if m not in entry["machines"]
                ]
        for model, entry in by_model.items():
            entry["embeddings"] = bool({LocalEmbedder.route, "federated"} & set(entry["routes"]))
            choice = self._router.preview(model)
            if choice is not None:
                entry["auto"] = {"route": choice.route, "reason": choice.reason}
        return [{"id": m, "object": "model", "created": 0, "owned_by": "covey", "covey": where}
                for m, where in sorted(by_model.items())]

    async def chat_completions(self, request: Request) -> Response | StreamingResponse:
        return await self._complete(request, "chat")

    async def completions(self, request: Request) -> Response | StreamingResponse:
        return await self._complete(request, "text")

    async def _complete(self, request: Request, kind: str) -> Response | StreamingResponse:
        c = parse_completion(request.json(), kind, request.headers)
        try:
            await self._router.ready(c.model)
            route, reason = self._router.choose(c.route, c.model)
        except RouteError as exc:
            raise _route_error(exc) from None
        covey: dict[str, Any] = {"route": route.name, "route_reason": reason, "machines": []}
        created = int(time.time())
        events = route.generate(c.generate, c.model)
        # Start before answering, so that "busy" and load failures get a proper status.
        try:
            first = await events.__anext__()
            while isinstance(first, Served):
                note_served(covey, first)
                first = await events.__anext__()
            if not covey["machines"]:  # a route that names no machine per request
                covey["machines"] = route.machines(c.model)
            note_relayed(covey, self._relayed())
        except RouteError as exc:
            raise _route_error(exc) from None
        except EngineError as exc:
            raise HttpError(503, f"the engine failed: {exc}", "server_error") from None
        if not c.stream:
            logprobs: list[TokenLogprob] = []
            done = await _drain(first, events, covey, logprobs)
            note_done(covey, done)
            return Response.json(full_response(c, done, created, covey, logprobs),
                                 headers=lowered_headers(done))
        # The engine says it lowered max_tokens with the first token: the headers can too.
        return StreamingResponse(_stream(c, first, events, created, covey),
                                 headers=lowered_headers(first))


def _route_error(exc: RouteError) -> HttpError:
    headers = {"retry-after": str(exc.retry_after_s)} if isinstance(exc, Busy) else None
    kind = "rate_limit_error" if isinstance(exc, Busy) else "invalid_request_error"
    param = {"model_not_found": "model", "context_length_exceeded": "max_tokens",
             "route_forbidden": "covey_route"}.get(exc.code)
    code = exc.code
    field = sampling.refused_field(str(exc))
    if field is not None:  # the engine refused a sampling field, not the length
        param, code = field, "invalid_value"
    return HttpError(exc.status, str(exc), kind, param=param, code=code, headers=headers)


def note_served(covey: dict[str, Any], served: Served) -> None:
    """Record in the reply's `covey` metadata which machine serves, and any failover notice."""
    if served.machine not in covey["machines"]:
        covey["machines"].append(served.machine)
    if served.notice:
        covey["notice"] = served.notice


def note_relayed(covey: dict[str, Any], relayed: dict[str, str]) -> None:
    """Record the machines serving the reply that this node reaches through a relay (the
    chat footer says so: "ran on NAME, reached through RELAY")."""
    # A sharded reply names each worker with its layers: "w1 (12 layers)".
    through = {m: relayed[name] for m in covey["machines"]
               if (name := m.partition(" (")[0]) in relayed}
    if through:
        covey["relayed"] = through


async def _drain(first: Token | Done, events: AsyncGenerator[Token | Done | Served, None],
                 covey: dict[str, Any], logprobs: list[TokenLogprob]) -> Done:
    """The reply's Done, collecting its tokens' logprobs on the way."""
    try:
        event: Token | Done | Served = first
        while not isinstance(event, Done):
            if isinstance(event, Token) and event.logprob is not None:
                logprobs.append(event.logprob)
            event = await events.__anext__()
            if isinstance(event, Served):
                note_served(covey, event)
        return event
    except RouteError as exc:
        raise _route_error(exc) from None
    except EngineError as exc:
        raise HttpError(503, f"the engine failed: {exc}", "server_error") from None
    finally:
        await events.aclose()


async def _stream(c: Completion, first: Token | Done,
                  events: AsyncGenerator[Token | Done | Served, None], created: int,
                  covey: dict[str, Any]) -> AsyncGenerator[bytes, None]:
    hold = CallHold(forced=c.tools.choice in ("required", "function")) \
        if c.kind == "chat" and c.tools.calls_possible else None
    try:
        if c.kind == "chat":
            yield sse(chunk(c, created, covey, first=True))
        elif c.echo:
            yield sse(chunk(c, created, covey, text=c.echo))
        event: Token | Done | Served = first
        while True:
            if isinstance(event, Done):
                note_done(covey, event)
                calls = None
                if hold is not None and not hold.released:
                    calls = reply_calls(c, hold.held)
                    if calls or hold.held:
                        yield sse(chunk(c, created, covey, text=None if calls else hold.held,
                                        calls=calls))
                yield sse(chunk(c, created, covey, done=event, calls=calls))
                if c.include_usage:
                    yield sse({"id": c.generate.id, "object": _chunk_object(c),
                               "created": created, "model": c.model, "choices": [],
                               "usage": usage(event), "covey": covey})
                yield sse("[DONE]")
                return
            if isinstance(event, Served):
                note_served(covey, event)
                if event.notice:  # tell the client why the reply now comes from elsewhere
                    yield sse(chunk(c, created, covey))
            elif event.text or event.logprob is not None:
                text = hold.feed(event.text) if hold is not None else event.text
                if text or event.logprob is not None:
                    yield sse(chunk(c, created, covey, text=text, logprob=event.logprob))
            try:
                event = await events.__anext__()
            except RouteError as exc:
                yield error_event(str(exc), "invalid_request_error")
                return
            except EngineError as exc:
                yield error_event(f"the engine failed: {exc}", "server_error")
                return
    finally:
        await events.aclose()


def _chunk_object(c: Completion) -> str:
    return "chat.completion.chunk" if c.kind == "chat" else "text_completion"
