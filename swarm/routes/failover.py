"""Failover with continuation: one reply that outlives the machine serving it.

A route serves a reply in attempts. When an attempt fails, the next one gets the same request
with the text produced so far as its `continuation` (the prompt ends with it, so generation
carries on) and what is left of `max_tokens`. The user sees one stream: every attempt's
tokens, then one `Done` stitched from all of them. `continue_request` and `stitch` are pure;
`with_failover` drives a route's attempts; the route decides where each attempt runs and what
its failure notice says.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from backends.engine_protocol import Done, GenerateRequest, Token
from swarm.routes.route import Served


class AttemptFailed(Exception):
    """An attempt failed in a way another attempt may get past (raise it `from` the cause).

    `lost` says what the reply lost, for the next attempt's notice; None keeps what an earlier
    failure said."""

    def __init__(self, lost: str | None) -> None:
        super().__init__(lost or "the attempt failed")
        self.lost = lost


class OutOfOptions(Exception):
    """An attempt found nowhere left to run: the reply fails as if every attempt had."""


@dataclass
class Progress:
    """A reply across its attempts, as its attempts may read it."""

    carried: list[Token] = field(default_factory=list)  # from the attempts that failed
    current: list[Token] = field(default_factory=list)  # from the attempt running now
    lost: str | None = None  # what the last failure lost (None: nothing yet)
    failures: list[BaseException] = field(default_factory=list)  # each failed attempt's cause

    @property
    def produced(self) -> bool:
        """The user has been sent part of the reply already."""
        return bool(self.carried or self.current)


# An attempt streams the (continued) request on one machine or plan: `Served` notes, tokens,
# and a `Done` if it gets that far. It raises AttemptFailed to let the next attempt go on,
# OutOfOptions when there is nowhere left to try, anything else to end the reply.
Events = AsyncGenerator[Token | Done | Served, None]
Attempt = Callable[[GenerateRequest, Progress], Events]


def continue_request(request: GenerateRequest, carried: Sequence[Token]) -> GenerateRequest:
    """`request` for an attempt that carries on after the `carried` tokens."""
    return replace(request, continuation=request.continuation + "".join(t.text for t in carried),
                   max_tokens=max(request.max_tokens - len(carried), 1))


def stitch(request: GenerateRequest, carried: Sequence[Token], done: Done) -> Done:
    """The reply's one `Done`: the text and tokens of the failed attempts, then the last one's.

    Usage counts the original prompt and every token streamed: an engine counts a request's
    prompt without its continuation (the carried text, which is completion), and the tokens
    are every attempt's, each once."""
    lowered = done.max_tokens_lowered_to
    return Done(request.id, done.finish_reason, "".join(t.text for t in carried) + done.text,
                done.prompt_tokens, (*(t.token for t in carried), *done.tokens), done.timings,
                lowered + len(carried) if lowered is not None else None)


async def with_failover(request: GenerateRequest, attempt: Attempt, max_attempts: int,
                        give_up: Callable[[Sequence[BaseException]], Exception]) -> Events:
    """The events of one reply over at most `max_attempts` attempts; when they all fail (or
    one runs out of options), raises `give_up(causes of the failures)`."""
    progress = Progress()
    for _ in range(max_attempts):
        progress.current = []
        try:
            async with aclosing(attempt(continue_request(request, progress.carried),
                                        progress)) as events:
                async for event in events:
                    if isinstance(event, Done):
                        yield stitch(request, progress.carried, event)
                        return
                    if isinstance(event, Token):
                        progress.current.append(event)
                    yield event
            raise AttemptFailed(None) from RuntimeError("the reply ended without finishing")
        except AttemptFailed as failed:
            progress.carried += progress.current
            progress.lost = failed.lost or progress.lost
            progress.failures.append(failed.__cause__ or failed)
        except OutOfOptions:
            break
    raise give_up(progress.failures)
