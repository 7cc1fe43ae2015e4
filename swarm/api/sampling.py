"""The OpenAI sampling fields of a completion request, checked the way OpenAI checks them, and
the `logprobs` objects of a reply.

`sampling_fields` turns `top_k`, `min_p`, the penalties, `logit_bias`, `logprobs`,
`top_logprobs`, `echo` and `suffix` into `GenerateRequest` fields; what Covey cannot honour is
a 400 naming the field, never a silent drop. `chat_logprobs` and `text_logprobs` shape the
per-token log probabilities for /v1/chat/completions and (the legacy shape)
/v1/completions. All pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from backends.engine_protocol import MAX_TOP_LOGPROBS, TokenLogprob
from swarm.api.server import HttpError

MAX_LOGIT_BIAS = 1024
MAX_STOPS = 16
# The legacy completions `logprobs` counts alternatives; OpenAI allows at most 5 there.
MAX_TEXT_LOGPROBS = 5
DEFAULT_TOP_K = 40  # what the engine always used; OpenAI has no top_k
# Accepted by OpenAI, meaningless here: present and not null they are a 400, not ignored.
UNSUPPORTED = {"chat": ("audio", "prediction", "web_search_options")}
STRICT_MAX_TOKENS_HEADER = "x-covey-strict-max-tokens"


class BadRequest(HttpError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(400, message, "invalid_request_error", param=param)


def number(body: Mapping[str, Any], name: str, default: float, low: float, high: float
           ) -> float:
    """A number field within [low, high]; BadRequest naming it otherwise."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number", name)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}", name)
    return float(value)


def integer(body: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer", name)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}", name)
    return value


def logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias from -100 to 100} as (id, bias) pairs, sorted by id."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise BadRequest("logit_bias must be an object mapping token ids to numbers",
                         "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise BadRequest(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens", "logit_bias")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise BadRequest(f"logit_bias: {key!r} is not a token id", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) \
                or not -100 <= bias <= 100:
            raise BadRequest(f"logit_bias: the bias of {key} must be a number from -100 "
                             "to 100", "logit_bias")
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


def stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    found = [value] if isinstance(value, str) else value
    if not isinstance(found, list) or not all(isinstance(s, str) and s for s in found):
        raise BadRequest("stop must be a non-empty string or a list of them", "stop")
    if len(found) > MAX_STOPS:
        raise BadRequest(f"stop takes at most {MAX_STOPS} sequences", "stop")
    return tuple(found)


def _logprobs(body: Mapping[str, Any], kind: str) -> tuple[bool, int]:
    """(logprobs wanted, how many alternatives per token). On chat, top_logprobs above 0
    asks for logprobs too."""
    if kind == "text":  # legacy: `logprobs` is the number of alternatives
        n = integer(body, "logprobs", -1, 0, MAX_TEXT_LOGPROBS)
        return n >= 0, max(n, 0)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise BadRequest("logprobs must be a boolean", "logprobs")
    top = integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    return bool(wanted) or top > 0, top


def _text_only(body: Mapping[str, Any], kind: str, wants_logprobs: bool) -> bool:
    """Whether to echo the prompt; a 400 for what /v1/completions cannot do."""
    if kind != "text":
        return False
    if body.get("suffix"):  # fill-in-the-middle needs a model trained for it
        raise BadRequest("suffix (fill-in-the-middle) is not supported", "suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise BadRequest("only best_of=1 is supported", "best_of")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise BadRequest("echo must be a boolean", "echo")
    if echo and wants_logprobs:
        raise BadRequest("echo with logprobs (the prompt's logprobs) is not supported", "echo")
    return bool(echo)


def sampling_fields(body: Mapping[str, Any], kind: str) -> tuple[dict[str, Any], bool]:
    """The GenerateRequest fields for the sampling options of `body` ("chat" or "text"),
    and whether to echo the prompt (completions only)."""
    for name in UNSUPPORTED.get(kind, ()):
        if body.get(name) is not None:
            raise BadRequest(f"{name} is not supported", name)
    wanted, top = _logprobs(body, kind)
    echo = _text_only(body, kind, wanted)
    fields = dict(
        top_k=integer(body, "top_k", DEFAULT_TOP_K, 0, 1 << 20),
        min_p=number(body, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=logit_bias(body.get("logit_bias")),
        logprobs=wanted,
        top_logprobs=top,
        stop=stops(body.get("stop")),
    )
    return fields, echo


# Fields the engine itself checks (against the model); its refusal starts with the name.
ENGINE_CHECKED = ("logit_bias",)


def refused_field(message: str) -> str | None:
    """The field an engine's refusal names, if it is one of ENGINE_CHECKED."""
    return next((f for f in ENGINE_CHECKED if message.startswith(f"{f}:")), None)


def strict_max_tokens(headers: Mapping[str, str], body: Mapping[str, Any]) -> bool:
    """The client wants a 400 rather than a lowered max_tokens: header
    `x-covey-strict-max-tokens: 1` or body `"covey_strict_max_tokens": true`."""
    flag = body.get("covey_strict_max_tokens")
    if flag is not None and not isinstance(flag, bool):
        raise BadRequest("covey_strict_max_tokens must be a boolean", "covey_strict_max_tokens")
    header = headers.get(STRICT_MAX_TOKENS_HEADER, "").strip().lower()
    return bool(flag) or header in ("1", "true", "yes")


# -- replies ----------------------------------------------------------------------------------


def _chat_entry(lp: TokenLogprob) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes)}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """`choices[].logprobs` of a chat completion (or one chunk of it)."""
    return {"content": [{**_chat_entry(lp), "top_logprobs": [_chat_entry(t) for t in lp.top]}
                        for lp in entries],
            "refusal": None}


def text_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy `choices[].logprobs` of /v1/completions; `offset` is where the first
    token's text starts in the reply's text."""
    offsets = []
    for lp in entries:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in entries],
            "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in entries],
            "text_offset": offsets}
