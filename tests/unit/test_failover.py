"""Failover with continuation, in-process: the shared driver, and the sharded and federated
routes on top of it with their network replaced by fakes (no engine process, no peers)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from backends import ggml
from backends.engine import EngineError, WorkerLost
from backends.engine_protocol import Done, EngineConfig, GenerateRequest, Timings, Token
from backends.gguf_info import estimate_memory, read_gguf_info
from backends.store.model_store import ModelStore
from swarm.api.openai_api import usage
from swarm.ledger.entries import WorkerOffer
from swarm.routes.failover import (
    AttemptFailed,
    Events,
    OutOfOptions,
    Progress,
    continue_request,
    stitch,
    with_failover,
)
from swarm.routes.federated import Candidate, FederatedRoute, _Failed
from swarm.routes.local import LocalRoute
from swarm.routes.placement import Placement, slot_bytes
from swarm.routes.route import Busy, RouteError, Served
from swarm.routes.sharded import Session, ShardedRoute
from swarm.workers.lease import Lease
from tests.support.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.timeout(30)

REQUEST = GenerateRequest(id="r1", prompt="Once", max_tokens=10, continuation="upon")
PROMPT_TOKENS = 7  # what each fake engine counts for the request's prompt


def tokens(text: str) -> list[Token]:
    """One token a character, its id the character's code."""
    return [Token(REQUEST.id, ord(c), c) for c in text]


def done_for(request: GenerateRequest, text: str) -> Done:
    """What an engine that produced `text` for `request` reports: its prompt ended with the
    continuation, but it counts the request's own prompt only, as the first attempt did."""
    return Done(request.id, "length", text, PROMPT_TOKENS,
                tuple(ord(c) for c in text), Timings(generation_s=1.5))


def run(events: AsyncIterator[Token | Done | Served]) -> list[Token | Done | Served]:
    async def main() -> list[Token | Done | Served]:
        async with aclosing(cast(Any, events)) as it:
            return [event async for event in it]
    return trio.run(main)


def reply_text(events: Sequence[Token | Done | Served]) -> str:
    return "".join(e.text for e in events if isinstance(e, Token))


def assert_exact_usage(events: Sequence[Token | Done | Served]) -> None:
    """The usage the client is told: the original prompt, and every token it was streamed."""
    done, streamed = events[-1], sum(isinstance(e, Token) for e in events)
    assert isinstance(done, Done)
    assert usage(done) == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": streamed,
                           "total_tokens": PROMPT_TOKENS + streamed}


def notices(events: Sequence[Token | Done | Served]) -> list[str]:
    return [e.notice for e in events if isinstance(e, Served) and e.notice]


# -- the pure part ---------------------------------------------------------------------------


def test_the_continued_request_ends_with_the_text_so_far_and_asks_only_for_the_rest() -> None:
    part = continue_request(REQUEST, tokens("abc"))
    assert part.continuation == "uponabc"
    assert part.max_tokens == 7
    assert part.prompt == REQUEST.prompt and part.id == REQUEST.id
    assert continue_request(REQUEST, tokens("x" * 12)).max_tokens == 1  # never zero
    assert continue_request(REQUEST, []) == REQUEST


def test_a_reply_that_never_moved_keeps_its_done() -> None:
    done = done_for(REQUEST, "abc")
    assert stitch(REQUEST, [], done) == done


def test_a_stitched_done_counts_every_token_once() -> None:
    carried = tokens("abc")
    last = done_for(continue_request(REQUEST, carried), "de")
    whole = stitch(REQUEST, carried, last)
    assert whole.text == "abcde"
    assert whole.tokens == tuple(ord(c) for c in "abcde")
    assert whole.prompt_tokens == PROMPT_TOKENS  # the original request's
    assert (whole.finish_reason, whole.timings) == ("length", last.timings)


# -- the driver ------------------------------------------------------------------------------


@dataclass
class Script:
    """Attempts that each stream part of `text` and then fail, until the one that finishes."""

    text: str
    fail_after: list[int]  # tokens each failing attempt streams before it dies
    seen: list[GenerateRequest] = field(default_factory=list)
    produced_when_failing: list[bool] = field(default_factory=list)

    async def attempt(self, request: GenerateRequest, progress: Progress) -> Events:
        n = len(self.seen)
        self.seen.append(request)
        yield Served(f"m{n}", progress.lost)
        start = len(request.continuation) - len(REQUEST.continuation)
        if n < len(self.fail_after):
            for t in tokens(self.text[start:start + self.fail_after[n]]):
                yield t
            self.produced_when_failing.append(progress.produced)
            raise AttemptFailed(f"m{n} died") from ConnectionError("gone")
        rest = self.text[start:]
        for t in tokens(rest):
            yield t
        yield done_for(request, rest)


def give_up(causes: Sequence[BaseException]) -> RouteError:
    return RouteError(f"all {len(causes)} failed: {', '.join(map(repr, causes))}")


def test_an_attempt_that_dies_after_some_tokens_the_next_one_continues_the_reply() -> None:
    script = Script("abcdefgh", fail_after=[3, 0, 2])
    events = run(with_failover(REQUEST, script.attempt, 4, give_up))
    # The user sees one reply: every character once, in order, then one Done that says so.
    assert reply_text(events) == "abcdefgh"
    done = events[-1]
    assert isinstance(done, Done)
    assert done.text == "abcdefgh" and len(done.tokens) == 8
    assert_exact_usage(events)
    # Each attempt was asked to go on from where the reply stood, for what was left.
    assert [r.continuation for r in script.seen] == ["upon", "uponabc", "uponabc", "uponabcde"]
    assert [r.max_tokens for r in script.seen] == [10, 7, 7, 5]
    assert notices(events) == ["m0 died", "m1 died", "m2 died"]
    assert script.produced_when_failing == [True, True, True]


def test_every_attempt_failing_raises_the_routes_error_with_every_cause() -> None:
    script = Script("abcdefgh", fail_after=[1, 1, 1])
    with pytest.raises(RouteError, match=r"^all 3 failed: (ConnectionError\('gone'\)(, )?){3}$"):
        run(with_failover(REQUEST, script.attempt, 3, give_up))
    assert len(script.seen) == 3


def test_an_attempt_with_nowhere_to_go_ends_the_reply_at_once() -> None:
    calls: list[GenerateRequest] = []

    async def attempt(request: GenerateRequest, progress: Progress) -> Events:
        calls.append(request)
        if len(calls) == 2:
            raise OutOfOptions
        yield Token(request.id, 1, "a")
        raise AttemptFailed("m0 died") from EOFError()

    with pytest.raises(RouteError, match=r"^all 1 failed: EOFError\(\)$"):
        run(with_failover(REQUEST, attempt, 5, give_up))
    assert len(calls) == 2


def test_a_reply_that_ends_without_a_done_is_a_failure_not_a_reply() -> None:
    async def attempt(request: GenerateRequest, progress: Progress) -> Events:
        yield Token(request.id, 1, "a")

    with pytest.raises(RouteError, match="ended without finishing"):
        run(with_failover(REQUEST, attempt, 2, give_up))


# -- the sharded route, with a fake session opener -------------------------------------------


class FakeHost:
    class _Id:
        def to_base58(self) -> str:
            return "peer-me"

    def get_id(self) -> _Id:
        return self._Id()


class FakeEngine:
    """An engine whose generation streams `text` (a token a character); with `die_after`, it
    dies after that many tokens, taking the workers in `dies_with` along."""

    def __init__(self, text: str, dead: set[str], die_after: int | None = None,
                 dies_with: Sequence[str] = ()) -> None:
        self.text, self.dead, self.die_after, self.dies_with = text, dead, die_after, dies_with
        self.seen: list[GenerateRequest] = []
        self.closed = False

    def wait_loaded(self) -> None:
        pass

    def generate(self, request: GenerateRequest) -> Iterator[Token | Done]:
        self.seen.append(request)
        text = self.text[:request.max_tokens]
        for i, c in enumerate(text):
            if i == self.die_after:
                self.dead.update(self.dies_with)
                raise WorkerLost("a worker stopped answering", ())
            yield Token(request.id, ord(c), c)
        yield done_for(request, text)

    def stop(self, request_id: str) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeLease(Lease):
    """A lease whose worker is gone once the test says so (the real one learns by renewing)."""

    dead: set[str] = field(default_factory=set)

    def check_now(self) -> None:
        if self.peer_id in self.dead:
            self.lost.set()


@dataclass
class Shards:
    route: ShardedRoute
    engines: list[FakeEngine | EngineError]  # each session opened takes one (or raises it)
    opened: list[Placement]
    dead: set[str]
    fallback_engine: FakeEngine
    offers: list[WorkerOffer]


def offer(name: str, donated: int, cores: int) -> WorkerOffer:
    return WorkerOffer(donated, donated, cores, ggml.RPC_PROTOCOL_VERSION, "idle",
                       peer_id=f"peer-{name}", name=name)


@pytest.fixture
def shards(tmp_path: Path) -> Shards:
    """w1, w2 and w3 each donate 60% of the tiny model: any two of them hold it."""
    model = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=8)
    store = ModelStore(tmp_path / "models")
    store.import_file(model, "tiny")
    info = read_gguf_info(model)
    need = sum(slot_bytes(estimate_memory(info, 4096), info.n_layers))
    offers = [offer("w1", need * 6 // 10, 8), offer("w2", need * 6 // 10, 4),
              offer("w3", need * 6 // 10, 2)]
    dead: set[str] = set()
    engines: list[FakeEngine | EngineError] = []
    opened: list[Placement] = []
    fallback_engine = FakeEngine("", dead)

    async def open_session(model: str, deterministic: bool, placement: Placement) -> Session:
        opened.append(placement)
        engine = engines.pop(0)
        if isinstance(engine, EngineError):
            raise engine
        leases: dict[str, Lease] = {w.peer_id: FakeLease(w.peer_id, dead=dead)
                                    for w in placement.workers}
        return Session(model, deterministic, placement, leases, engine=cast(Any, engine))

    def local_engine(config: EngineConfig) -> Any:
        assert not config.rpc_endpoints
        return fallback_engine

    fallback = LocalRoute(store, "client", engine_factory=local_engine)
    route = ShardedRoute(cast(Any, FakeHost()), store, lambda: offers, lambda: {}, fallback,
                         open_session=open_session)
    return Shards(route, engines, opened, dead, fallback_engine, offers)


def names(placement: Placement) -> list[str]:
    return [w.name for w in placement.workers]


def test_a_worker_lost_mid_reply_the_sharded_route_replans_and_continues(shards: Shards) -> None:
    first = FakeEngine("abcdefgh", shards.dead, die_after=3, dies_with=["peer-w2"])
    second = FakeEngine("defgh", shards.dead)
    shards.engines += [first, second]
    events = run(shards.route.generate(REQUEST, "tiny"))

    assert [names(p) for p in shards.opened] == [["w1", "w2"], ["w1", "w3"]]
    assert second.seen[0].continuation == "uponabc" and second.seen[0].max_tokens == 7
    assert first.closed and not second.closed  # the broken session was closed, not the new one
    assert reply_text(events) == "abcdefgh"
    assert notices(events) == ["w2 left mid-reply; continuing on w1, w3"]
    served = [e.machine for e in events if isinstance(e, Served)]
    assert served == ["w1 (4 layers)", "w2 (4 layers)", "w1 (4 layers)", "w3 (4 layers)"]
    done = events[-1]
    assert isinstance(done, Done)
    assert done.text == "abcdefgh" and len(done.tokens) == 8
    assert_exact_usage(events)
    # w2 stays out of plans for a while; the session on w1 and w3 is kept for the next reply.
    assert "w2" not in shards.route.machines("tiny")[0]
    assert shards.route.session is not None and names(shards.route.session.placement) == [
        "w1", "w3"]


def test_a_stronger_worker_joining_does_not_reload_the_loaded_session(shards: Shards) -> None:
    shards.engines += [FakeEngine("abc", shards.dead), FakeEngine("abc", shards.dead)]
    run(shards.route.generate(REQUEST, "tiny"))
    loaded = shards.route.session
    assert loaded is not None and names(loaded.placement) == ["w1", "w2"]
    # w0 donates as much as each and has the most cores: a fresh plan would start with it.
    shards.offers.append(offer("w0", shards.offers[0].donated_bytes, 16))
    events = run(shards.route.generate(REQUEST, "tiny"))
    assert reply_text(events) == "abc"
    assert len(shards.opened) == 1 and shards.route.session is loaded  # no reload
    assert shards.route.planned("tiny") == (("w1", "w2"), None)
    # Once the session is gone, nothing holds the model: the next plan takes the strongest.
    trio.run(shards.route.close_session)
    assert shards.route.planned("tiny") == (("w0", "w1"), None)


def test_with_nothing_left_to_shard_on_the_reply_goes_on_on_this_machine(
        shards: Shards) -> None:
    shards.engines += [FakeEngine("abcdefgh", shards.dead, die_after=3, dies_with=["peer-w2"]),
                       FakeEngine("defgh", shards.dead, die_after=2, dies_with=["peer-w3"])]
    shards.fallback_engine.text = "fgh"
    events = run(shards.route.generate(REQUEST, "tiny"))

    assert [names(p) for p in shards.opened] == [["w1", "w2"], ["w1", "w3"]]
    assert shards.fallback_engine.seen[0].continuation == "uponabcde"
    assert shards.fallback_engine.seen[0].max_tokens == 5
    assert reply_text(events) == "abcdefgh"
    assert notices(events) == ["w2 left mid-reply; continuing on w1, w3",
                               "w3 left mid-reply; continuing on this machine"]
    assert [e.machine for e in events if isinstance(e, Served)][-1] == "client"
    done = events[-1]
    assert isinstance(done, Done) and done.text == "abcdefgh" and len(done.tokens) == 8
    assert_exact_usage(events)


def test_a_fallback_that_cannot_fit_this_machine_says_so_instead_of_swapping(
        shards: Shards) -> None:
    shards.route.fallback = LocalRoute(shards.route.store, "client", available=lambda: 1 << 20,
                                       engine_factory=lambda config: shards.fallback_engine)
    shards.engines += [FakeEngine("abcdefgh", shards.dead, die_after=3, dies_with=["peer-w2"]),
                       FakeEngine("defgh", shards.dead, die_after=2, dies_with=["peer-w3"])]
    with pytest.raises(RouteError) as failed:
        run(shards.route.generate(REQUEST, "tiny"))
    message = str(failed.value)
    assert message.startswith("w3 left mid-reply; this machine cannot take over: 'tiny' needs ")
    assert "and 1.0 MiB is free here" in message
    assert message.endswith("w2 (failed recently), w3 (failed recently)"), message
    assert not shards.fallback_engine.seen  # nothing ran here


def test_a_sharded_engine_that_never_starts_is_a_clear_error(shards: Shards) -> None:
    shards.engines += [EngineError(f"load {i} failed") for i in range(4)]
    with pytest.raises(RouteError, match="the sharded engine failed repeatedly"):
        run(shards.route.generate(REQUEST, "tiny"))
    assert len(shards.opened) == 4  # one plan an attempt, then it gives up
    assert shards.route.session is None


# -- the federated route, its nodes faked where the network would be -------------------------


class FirstChoice(random.Random):
    """Ties go to the first node, so a node that failed would be picked again."""

    def choice(self, seq: Any) -> Any:
        return seq[0]


class FakeFederated(FederatedRoute):
    """The federated route over three nodes, whichever it picks answering the next reply in
    `replies`: its text, then "fail", "busy" or "done"."""

    def __init__(self, replies: list[tuple[str, str]]) -> None:
        nodes = [Candidate(peer, name, 0) for peer, name in
                 (("p1", "n1"), ("p2", "n2"), ("p3", "n3"))]
        super().__init__(cast(Any, None), cast(Any, None), lambda model: nodes, lambda: ["m"],
                         rng=FirstChoice())
        self.replies = replies
        self.seen: list[tuple[str, GenerateRequest]] = []

    async def _events(self, target: Candidate, request: GenerateRequest, model: str
                      ) -> AsyncIterator[Token | Done]:
        self.seen.append((target.name, request))
        text, end = self.replies.pop(0)
        for c in text:
            yield Token(request.id, -1, c)
        if end == "busy":
            raise _Failed("busy", busy=True)
        if end == "fail":
            raise ConnectionResetError("the node went away")
        yield Done(request.id, "stop", text, PROMPT_TOKENS,
                   (-1,) * len(text), Timings())


def test_a_federated_node_dying_mid_reply_another_continues_it() -> None:
    route = FakeFederated([("abc", "fail"), ("defg", "done")])
    events = run(route.generate(REQUEST, "m"))
    (first, _), (second, request) = route.seen
    assert (first, second) == ("n1", "n2")
    assert request.continuation == "uponabc" and request.max_tokens == 7
    assert reply_text(events) == "abcdefg"
    assert notices(events) == [f"{first} failed mid-reply; continuing on another machine"]
    done = events[-1]
    assert isinstance(done, Done) and done.text == "abcdefg" and len(done.tokens) == 7
    assert_exact_usage(events)
    assert not any(route._dispatched.values())  # every dispatch was counted back


def test_every_federated_node_failing_or_busy_says_which() -> None:
    failing = FakeFederated([("", "fail")] * 3)
    with pytest.raises(RouteError, match="every federated node serving this model failed") as e:
        run(failing.generate(REQUEST, "m"))
    assert not isinstance(e.value, Busy)
    assert [name for name, _ in failing.seen] == ["n1", "n2", "n3"]  # each node once

    busy = FakeFederated([("", "fail"), ("", "busy"), ("", "fail")])
    with pytest.raises(Busy, match="every federated node serving this model is busy"):
        run(busy.generate(REQUEST, "m"))
