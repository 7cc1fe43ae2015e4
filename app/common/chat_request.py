"""One chat, asked the same way from everywhere: the sampling settings a user chats with and
their defaults (the only place they are defined), the body the node's /v1/chat/completions
takes, the engine's GenerateRequest for the in-process `covey chat`, and `ChatReply`, which
folds a streamed reply back into its text, finish reason, usage, route and speed.

`covey chat`, `covey chat --route ...` and the desktop app all go through here, so a reply
samples alike whichever of them asked. The app's per-conversation choices (`ChatPanel`: system
prompt, temperature, max tokens, where to run) become a request here too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from backends.engine_protocol import GenerateRequest

CHAT_PATH = "/v1/chat/completions"
REPLY_VERSION = 1  # of ChatReply.summary(), the object `covey chat --route --json` prints


@dataclass(frozen=True)
class ChatSettings:
    """How a reply is sampled. The defaults are what every Covey chat uses unless told."""

    max_tokens: int = 512
    temperature: float = 0.5  # small models ramble at OpenAI's 1.0
    top_p: float = 0.95
    repeat_penalty: float = 1.1  # llama.cpp's; small models loop without it; 1.0 is off
    seed: int | None = None
    # No CPU weight repacking: greedy output identical however the layers are split.
    deterministic: bool = False


DEFAULTS = ChatSettings()

# Where a conversation asks its replies to run, as the app offers it: Covey's choice, only
# this machine, or only other machines in the swarm.
ROUTE_PREFERENCES = ("auto", "here", "swarm")
PANEL_VERSION = 1


@dataclass(frozen=True)
class ChatPanel:
    """One conversation's own choices; None keeps Covey's default (`DEFAULTS`)."""

    system_prompt: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    route: str = "auto"  # one of ROUTE_PREFERENCES
    version: int = PANEL_VERSION


def node_route(preference: str, routes: Sequence[str]) -> str:
    """The `covey_route` for a route preference, given the routes that serve the model (its
    `covey.routes` in /v1/models). "swarm" is federated when a federated node serves the
    model, as `auto` would choose, and sharded otherwise."""
    if preference == "here":
        return "local"
    if preference == "swarm":
        return "federated" if "federated" in routes else "sharded"
    return "auto"


def panel_request(panel: ChatPanel, history: Sequence[Mapping[str, str]],
                  routes: Sequence[str] = ()) -> tuple[ChatSettings, list[dict[str, str]], str]:
    """What a conversation with `panel` asks: its sampling, its messages (the system prompt
    first) and its `covey_route`."""
    settings = replace(
        DEFAULTS,
        temperature=DEFAULTS.temperature if panel.temperature is None else panel.temperature,
        max_tokens=DEFAULTS.max_tokens if panel.max_tokens is None else panel.max_tokens)
    prompt = panel.system_prompt.strip()
    system = [{"role": "system", "content": prompt}] if prompt else []
    return settings, system + [dict(m) for m in history], node_route(panel.route, routes)


def chat_body(settings: ChatSettings, model: str, messages: Sequence[Mapping[str, str]],
              route: str = "auto") -> dict[str, Any]:
    """The streamed /v1/chat/completions request for `messages` (`repeat_penalty` is the
    node's llama.cpp extension, `covey_*` its own)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "repeat_penalty": settings.repeat_penalty,
        "stream": True,
        "stream_options": {"include_usage": True},
        "covey_route": route,
    }
    if settings.seed is not None:
        body["seed"] = settings.seed
    if settings.deterministic:
        body["covey_deterministic"] = True
    return body


def generate_request(settings: ChatSettings, messages: Sequence[Mapping[str, str]],
                     request_id: str = "") -> GenerateRequest:
    """The same chat for an engine in this process (the node builds this from the body)."""
    return GenerateRequest(
        id=request_id,
        messages=tuple(dict(m) for m in messages),
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        repeat_penalty=settings.repeat_penalty,
        seed=settings.seed,
        deterministic=settings.deterministic,
        fit_max_tokens=True,  # as the node does for a client that did not ask for strictness
    )


@dataclass
class ChatReply:
    """A reply streamed from /v1/chat/completions, as far as it has come."""

    pieces: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    covey: dict[str, Any] | None = None  # {route, route_reason, machines, relayed?, notice?}
    first_piece_at: float | None = None  # time.monotonic() of the first text

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, event: Mapping[str, Any], now: float | None = None) -> str:
        """Fold one streamed event in; returns the text it added ("" for none)."""
        if event.get("covey"):
            self.covey = {**(self.covey or {}), **event["covey"]}
        self.usage = event.get("usage") or self.usage
        added = []
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece:
                added.append(piece)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if added and self.first_piece_at is None:
            self.first_piece_at = time.monotonic() if now is None else now
        self.pieces += added
        return "".join(added)

    def served(self) -> dict[str, Any]:
        """Where the reply came from, as far as the node has said: route, why that route,
        machines, those reached through a relay, notice."""
        covey = self.covey or {}
        return {k: covey[k] for k in ("route", "route_reason", "machines", "relayed", "notice")
                if covey.get(k)}

    def tokens_per_s(self, now: float) -> float | None:
        """Generation speed from the first text to `now`; None before there is any."""
        tokens = (self.usage or {}).get("completion_tokens", 0)
        if self.first_piece_at is None or tokens <= 1:
            return None
        # The first token's time is prompt processing: count the gaps after it.
        return round((tokens - 1) / max(now - self.first_piece_at, 1e-6), 1)

    def summary(self) -> dict[str, Any]:
        return {"version": REPLY_VERSION, "text": self.text, "finish_reason": self.finish_reason,
                "usage": self.usage, "covey": self.covey}
