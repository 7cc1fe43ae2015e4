"""POST /v1/embeddings in OpenAI's shape: one vector per input, as floats or base64.

`input` is a string, an array of strings, an array of token ids or an array of such arrays;
`encoding_format` is `float` (the default) or `base64` (little-endian float32, as the official
client decodes it). Parsing and response shaping are pure functions; `EmbeddingsApi` hands the
inputs to this machine's embedding engine (`swarm.routes.embeddings`), which also enforces the
limits only it can count: tokens per input and per request. A model that is not on this
machine but that a federated node serves is embedded there, under the same limits
(`FederatedRoute.embed`); `covey.route` says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backends.engine import EngineError
from backends.engine_protocol import Embeddings
from swarm.api.openai_api import BadRequest, _field, _route_error
from swarm.api.server import HttpError, Request, Response
from swarm.routes.embeddings import MAX_INPUTS, MAX_TOTAL_TOKENS, LocalEmbedder
from swarm.routes.federated import FederatedRoute
from swarm.routes.federated_embeddings import EmbedCall, pack_float32
from swarm.routes.route import ModelUnknown, RequestRefused, RouteError

ENCODING_FORMATS = ("float", "base64")
# `auto` embeds on this machine if it has the model, else on a federated node that serves it.
EMBEDDING_ROUTES = ("auto", "local", "federated")
LOCAL_REASON = "embeddings run on this node's own engine"
FEDERATED_REASONS = {"auto": "the model is not on this machine; a federated node serves it",
                     "federated": "covey_route asked for a federated node"}

Input = str | tuple[int, ...]


@dataclass(frozen=True)
class EmbeddingCall:
    """A parsed /v1/embeddings body."""

    model: str
    inputs: tuple[Input, ...]
    encoding_format: str = "float"
    route: str = "auto"


def parse_embeddings(body: Any) -> EmbeddingCall:
    """Check an embeddings body the way OpenAI does; raises BadRequest naming the parameter."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = _field(body, "model", str, required=True)
    if not model:
        raise BadRequest("model must not be empty", "model")
    inputs = _inputs(body.get("input"))
    encoding = _field(body, "encoding_format", str, default="float")
    if encoding not in ENCODING_FORMATS:
        raise BadRequest(f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}",
                         "encoding_format")
    if body.get("dimensions") is not None:
        raise BadRequest("dimensions is not supported: a model's embeddings have the size it "
                         "was trained with", "dimensions")
    _field(body, "user", str)  # accepted, as OpenAI's, and not used
    route = _field(body, "covey_route", str, default="auto")
    if route not in EMBEDDING_ROUTES:
        raise BadRequest("embeddings run on this node's own engine or a federated node's: "
                         f"covey_route must be {', '.join(EMBEDDING_ROUTES)}", "covey_route")
    return EmbeddingCall(model, inputs, encoding, route)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _inputs(value: Any) -> tuple[Input, ...]:
    if value is None:
        raise BadRequest("missing required parameter: input", "input")
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(_is_token(v) for v in value):
        items = [value]  # one array of token ids
    elif isinstance(value, list):
        items = value
    else:
        raise BadRequest("input must be a string, an array of strings, or token ids", "input")
    if not items:
        raise BadRequest("input must not be empty", "input")
    if len(items) > MAX_INPUTS:
        raise BadRequest(f"input has {len(items)} items; at most {MAX_INPUTS} per request: "
                         "send them in smaller batches", "input")
    return tuple(_one_input(item, i) for i, item in enumerate(items))


def _one_input(item: Any, i: int) -> Input:
    where = f"input[{i}]"
    if isinstance(item, str):
        if not item:
            raise BadRequest(f"{where} must not be an empty string", "input")
        return item
    if isinstance(item, list) and all(_is_token(t) for t in item):
        if not item:
            raise BadRequest(f"{where} must not be an empty array", "input")
        if min(item) < 0:
            raise BadRequest(f"{where} has a negative token id", "input")
        return tuple(item)
    raise BadRequest(f"{where} must be a string or an array of token ids", "input")


def encode_vector(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    """A vector as the response carries it: the floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return pack_float32(vector)
    return list(vector)


def embeddings_response(call: EmbeddingCall, result: Embeddings, covey: dict[str, Any]
                        ) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i,
             "embedding": encode_vector(vector, call.encoding_format)}
            for i, vector in enumerate(result.vectors)]
    tokens = result.prompt_tokens
    return {"object": "list", "data": data, "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "covey": covey}


class EmbeddingsApi:
    def __init__(self, embedder: LocalEmbedder, federated: FederatedRoute | None = None) -> None:
        self._embedder = embedder
        self._federated = federated

    async def embeddings(self, request: Request) -> Response:
        call = parse_embeddings(request.json())
        try:
            result, covey = await self._embed(call)
        except RequestRefused as exc:  # too many tokens, a token id outside the vocabulary
            raise BadRequest(str(exc), "input") from None
        except RouteError as exc:
            raise _route_error(exc) from None
        except EngineError as exc:
            raise HttpError(503, f"the engine failed: {exc}", "server_error") from None
        return Response.json(embeddings_response(call, result, covey))

    async def _embed(self, call: EmbeddingCall) -> tuple[Embeddings, dict[str, Any]]:
        """The vectors, and the response's `covey` saying where they were made."""
        if call.route != "federated":
            try:
                result = await self._embedder.embed(call.model, call.inputs, MAX_TOTAL_TOKENS)
                return result, {"route": self._embedder.route, "route_reason": LOCAL_REASON,
                                "machines": [self._embedder.machine]}
            except ModelUnknown:
                if call.route == "local" or not self._federated_serves(call.model):
                    raise
        if self._federated is None:
            raise ModelUnknown(f"no federated node serves {call.model!r}")
        result, machine = await self._federated.embed(
            EmbedCall(call.model, call.inputs, MAX_TOTAL_TOKENS))
        return result, {"route": self._federated.name,
                        "route_reason": FEDERATED_REASONS[call.route], "machines": [machine]}

    def _federated_serves(self, model: str) -> bool:
        return self._federated is not None and bool(self._federated.machines(model))
