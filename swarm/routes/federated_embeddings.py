"""Embeddings on the federated protocol: the request and reply frames, and the peer's side.

A client whose model only a federated peer serves sends `{"version": 1, "model", "embed":
{"inputs", "max_total_tokens"}}` on `/covey/federated/1.0.0`. It has no `request` field, so a
node from before embeddings crossed the wire refuses it (it closes the stream) rather than
running something else. The serving node checks the same limits as its own /v1/embeddings
(`MAX_INPUTS`, `MAX_TOTAL_TOKENS`; its engine refuses an input over its batch), embeds with
its own `LocalEmbedder` and answers one frame: `{"type": "embeddings", "vectors"` (base64 of
little-endian float32, which is what the engine computes) `, "prompt_tokens"}`, or an error
frame. The client checks the reply's shape before it believes it (`parse_embeddings_reply`).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backends.engine_protocol import Embeddings
from swarm.routes.embeddings import MAX_INPUTS, MAX_TOTAL_TOKENS

EmbedInput = str | tuple[int, ...]
# A reply's vectors: no model has wider ones, and this bounds what a node may make us decode.
MAX_DIMENSIONS = 16384


class EmbedRefused(ValueError):
    """An embedding frame this node will not run; the message says why, for the client."""


@dataclass(frozen=True)
class EmbedCall:
    """What one embedding frame asks a federated node for."""

    model: str
    inputs: tuple[EmbedInput, ...]
    max_total_tokens: int = MAX_TOTAL_TOKENS
    version: int = 1


def embed_frame(call: EmbedCall) -> bytes:
    inputs = [item if isinstance(item, str) else list(item) for item in call.inputs]
    return json.dumps({"version": call.version, "model": call.model,
                       "embed": {"inputs": inputs,
                                 "max_total_tokens": call.max_total_tokens}}).encode()


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _one_input(item: Any) -> EmbedInput:
    if isinstance(item, str) and item:
        return item
    if isinstance(item, list) and item and all(_is_token(t) for t in item):
        return tuple(item)
    raise EmbedRefused("each input must be a non-empty string or non-negative token ids")


def parse_embed_frame(body: dict[str, Any]) -> EmbedCall:
    """The embedding call in a request frame's JSON; EmbedRefused if it breaks a limit or is
    malformed."""
    embed = body.get("embed")
    model = body.get("model")
    if not isinstance(model, str) or not isinstance(embed, dict):
        raise EmbedRefused("an embedding request needs a model and its inputs")
    inputs = embed.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise EmbedRefused("an embedding request needs a non-empty list of inputs")
    if len(inputs) > MAX_INPUTS:
        raise EmbedRefused(f"the batch has {len(inputs)} inputs; at most {MAX_INPUTS} per "
                           "request")
    limit = embed.get("max_total_tokens", MAX_TOTAL_TOKENS)
    if not _is_token(limit) or not 1 <= limit <= MAX_TOTAL_TOKENS:
        raise EmbedRefused(f"max_total_tokens must be 1 to {MAX_TOTAL_TOKENS}")
    return EmbedCall(model, tuple(_one_input(item) for item in inputs), limit)


def pack_float32(vector: Sequence[float]) -> str:
    """Base64 of the vector as little-endian float32, as OpenAI's client decodes it."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings_frame(result: Embeddings) -> dict[str, Any]:
    return {"type": "embeddings", "vectors": [pack_float32(v) for v in result.vectors],
            "prompt_tokens": result.prompt_tokens}


def _unpack(text: Any) -> tuple[float, ...]:
    if not isinstance(text, str):
        raise ValueError("a vector is not base64 text")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("a vector is not base64 text") from None
    if not raw or len(raw) % 4 or len(raw) // 4 > MAX_DIMENSIONS:
        raise ValueError("a vector has no floats, a partial one, or too many")
    return struct.unpack(f"<{len(raw) // 4}f", raw)


def parse_embeddings_reply(reply: dict[str, Any], call: EmbedCall, request_id: str
                           ) -> Embeddings:
    """The vectors of an "embeddings" reply frame to `call`; ValueError unless there is one
    vector per input, all of one size, and a plausible token count."""
    vectors = reply.get("vectors")
    if not isinstance(vectors, list) or len(vectors) != len(call.inputs):
        raise ValueError("the reply does not have one vector per input")
    unpacked = tuple(_unpack(v) for v in vectors)
    if len({len(v) for v in unpacked}) != 1:
        raise ValueError("the reply's vectors differ in size")
    tokens = reply.get("prompt_tokens")
    if not isinstance(tokens, int) or not _is_token(tokens) or tokens > call.max_total_tokens:
        raise ValueError("the reply's prompt_tokens is out of range")
    return Embeddings(request_id, unpacked, tokens)
