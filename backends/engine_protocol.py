"""Messages between the node (parent) and its engine process, one JSON object per line.

Every message carries the protocol version `v` so a mismatched pair fails clearly instead of
misreading each other. The parent writes commands to the engine's stdin; the engine writes
events to its original stdout (its C libraries' own prints are moved to stderr).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A line that is not a message of this protocol version."""


@dataclass(frozen=True)
class EngineConfig:
    """How to start an engine: which model, where its layers go, and how to run it."""

    model_path: str
    rpc_endpoints: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] | None = None
    n_ctx: int = 4096
    n_threads: int | None = None
    n_batch: int = 512
    deterministic: bool = False
    # Load for embeddings (mean pooling over the last hidden states) instead of generation: a
    # context made for one cannot do the other, so such an engine only embeds.
    embedding: bool = False


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: chat `messages` (the model's chat template is applied) or a raw
    `prompt` used as is.

    Message values are all strings; tool turns carry `tool_calls` (JSON text) or
    `tool_call_id` (see `backends.text.tool_prompt`). Fields added after version 1 default
    to None and are left out of the wire when unset, so older nodes still read the request.
    """

    id: str
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Text the reply already has (from a machine that failed mid-reply): the prompt ends with
    # it, so generation continues it rather than starting over.
    continuation: str = ""
    # Run on an engine without CPU weight repacking, so greedy output is the same however the
    # layers are split (the engine itself ignores it; routes pick the engine by it).
    deterministic: bool = False
    # Added later: every default means what a request without the field always meant, so an
    # older peer reads a request that leaves them at their defaults.
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: bool = False  # each Token carries its TokenLogprob
    top_logprobs: int = 0  # with logprobs: this many most likely alternatives per token
    # A max_tokens longer than what the context leaves after the prompt is lowered to fit
    # (Done says so) rather than refused.
    fit_max_tokens: bool = False
    # OpenAI's `tools` array as JSON text, rendered into the prompt (`tool_prompt`).
    tools: str | None = None
    # A llama.cpp GBNF grammar the reply must follow (`backends.generation.grammar`).
    grammar: str | None = None


@dataclass(frozen=True)
class EmbedRequest:
    """Embed each input, a text or token ids of the model's own vocabulary, into one unit-length
    vector; refused whole if an input is longer than the engine's batch or all of them together
    are over `max_total_tokens`."""

    id: str
    inputs: tuple[str | tuple[int, ...], ...]
    max_total_tokens: int


@dataclass(frozen=True)
class EmbedProgress:
    """Sent after each llama.cpp batch of an EmbedRequest, so that a large request on a slow
    machine reads as alive to the supervisor's watchdog."""

    id: str
    inputs_done: int


@dataclass(frozen=True)
class Embeddings:
    """The vectors of an EmbedRequest, in its inputs' order, and the tokens they took."""

    id: str
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


@dataclass(frozen=True)
class DeviceLayers:
    """Where llama.cpp put the model: a device and the repeating layers it holds."""

    name: str
    endpoint: str | None
    layers: int
    holds_output: bool = False


@dataclass(frozen=True)
class Timings:
    """`prompt_s` is the wall time to the first token. The prompt rate counts only the
    `prompt_eval_tokens` llama.cpp computed: a prefix kept in the KV cache from the previous
    request (the earlier turns of a chat) costs nothing."""

    load_s: float = 0.0
    prompt_s: float = 0.0
    prompt_eval_tokens: int = 0
    prompt_tokens_per_s: float = 0.0
    generation_s: float = 0.0
    generation_tokens_per_s: float = 0.0


@dataclass(frozen=True)
class Loaded:
    load_s: float
    n_ctx: int
    n_layers: int
    devices: tuple[DeviceLayers, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log probability under the model (after `logit_bias`), its text and bytes,
    and in `top` the most likely tokens at its place (each with an empty `top`)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Token:
    id: str
    token: int
    text: str
    logprob: TokenLogprob | None = None  # only when the request asked for logprobs
    # On a reply's first token, as on its Done: a stream's headers can say it before any text.
    max_tokens_lowered_to: int | None = None


@dataclass(frozen=True)
class Done:
    id: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    text: str
    prompt_tokens: int  # the request's prompt, not counting its continuation
    tokens: tuple[int, ...]
    timings: Timings = field(default_factory=Timings)
    # Set when the engine lowered the request's max_tokens to fit the context (fit_max_tokens).
    max_tokens_lowered_to: int | None = None


@dataclass(frozen=True)
class Connecting:
    """Sent before each RPC endpoint is contacted: if ggml aborts next, this names the culprit."""

    endpoint: str


@dataclass(frozen=True)
class Connected:
    """The RPC endpoint answered the handshake and is now a device."""

    endpoint: str


@dataclass(frozen=True)
class LoadProgress:
    """How much of the model is loaded, 0.0 to 1.0 (sent in steps of a few percent)."""

    fraction: float


@dataclass(frozen=True)
class Failed:
    """The engine could not do what was asked; `kind` is "load", "generate", or "protocol"
    (a line it could not read, which it then ignores)."""

    kind: str
    message: str
    id: str | None = None


@dataclass(frozen=True)
class Stop:
    id: str


@dataclass(frozen=True)
class Shutdown:
    pass


_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (EngineConfig, GenerateRequest, Loaded, Token, Done, Connecting, Connected,
                LoadProgress, Failed, Stop, Shutdown, EmbedRequest, EmbedProgress, Embeddings)
}


def encode(message: Any) -> str:
    """One line of JSON for `message`."""
    body = asdict(message)
    return json.dumps({"v": PROTOCOL_VERSION, "type": type(message).__name__, **body}) + "\n"


def decode(line: str | bytes) -> Any:
    """The message on `line`; raises ProtocolError for anything else."""
    try:
        raw = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {line[:80]!r}") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(f"not an object: {line[:80]!r}")
    if raw.pop("v", None) != PROTOCOL_VERSION:
        raise ProtocolError(f"wrong protocol version in {line[:80]!r}")
    cls = _TYPES.get(raw.pop("type", None))
    if cls is None:
        raise ProtocolError(f"unknown message type in {line[:80]!r}")
    try:
        return _build(cls, raw)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"bad {cls.__name__}: {exc}") from exc


def _build(cls: type, raw: dict[str, Any]) -> Any:
    if cls is Loaded:
        raw["devices"] = tuple(DeviceLayers(**d) for d in raw["devices"])
    elif cls is Done:
        raw["tokens"] = tuple(raw["tokens"])
        raw["timings"] = Timings(**raw["timings"])
    elif cls is GenerateRequest:
        return request_from_raw(raw)
    elif cls is Token:
        if raw.get("logprob") is not None:
            raw["logprob"] = logprob_from_raw(raw["logprob"])
    elif cls is EmbedRequest:
        raw["inputs"] = tuple(i if isinstance(i, str) else tuple(i) for i in raw["inputs"])
    elif cls is Embeddings:
        raw["vectors"] = tuple(tuple(v) for v in raw["vectors"])
    elif cls is EngineConfig:
        raw["rpc_endpoints"] = tuple(raw.get("rpc_endpoints", ()))
        if raw.get("tensor_split") is not None:
            raw["tensor_split"] = tuple(raw["tensor_split"])
    return cls(**raw)


def request_from_raw(raw: dict[str, Any]) -> GenerateRequest:
    """A GenerateRequest from its `asdict` form after a trip through JSON (lists back into
    tuples); TypeError or ValueError for fields it does not have or cannot take."""
    if raw.get("messages") is not None:
        raw["messages"] = tuple(dict(m) for m in raw["messages"])
    raw["stop"] = tuple(raw.get("stop", ()))
    raw["logit_bias"] = tuple((int(t), float(b)) for t, b in raw.get("logit_bias", ()))
    return GenerateRequest(**raw)


MAX_TOP_LOGPROBS = 20


def logprob_from_raw(raw: Any, nested: bool = False) -> TokenLogprob:
    """A TokenLogprob from its `asdict` form; ValueError unless well formed and bounded."""
    if not isinstance(raw, dict):
        raise ValueError("a logprob must be an object")
    token, logprob, data = raw.get("token"), raw.get("logprob"), raw.get("bytes")
    top = raw.get("top") or []
    if not isinstance(token, str) or isinstance(logprob, bool) \
            or not isinstance(logprob, int | float) or not isinstance(data, list) \
            or not all(isinstance(b, int) and 0 <= b < 256 for b in data) \
            or not isinstance(top, list) or len(top) > (0 if nested else MAX_TOP_LOGPROBS):
        raise ValueError("a malformed logprob")
    return TokenLogprob(token, float(logprob), tuple(data),
                        tuple(logprob_from_raw(t, nested=True) for t in top))
