"""A hostile federated node cannot make a client read without end: a real libp2p host on
loopback speaks the federated protocol to a real client host and breaks each limit in turn
(tokens past max_tokens forever, a frame over the cap, garbage, a reply over the byte cap, a
reply that never finishes). The client's request always ends, bounded, with a clear reason."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.peerinfo import PeerInfo
from libp2p.utils.varint import encode_uvarint

from backends.engine_protocol import Done, GenerateRequest, Token
from swarm.net.host import isolate, read_frame, write_frame, write_json_frame
from swarm.routes.federated import (
    MAX_REQUEST_BYTES,
    PROTOCOL,
    Candidate,
    FederatedRoute,
    ReplyLimits,
)
from swarm.routes.route import RouteError, Served
from tests.integration.test_tunnel import run, running_host

pytestmark = pytest.mark.processes

SMALL = ReplyLimits(max_frame_bytes=4096, max_reply_bytes=256 << 10, deadline_base_s=2.0,
                    deadline_per_token_s=0.0, deadline_max_s=2.0)


@dataclass
class Hostile:
    """What the hostile node managed to send before the client cut it off."""

    frames: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    cut: trio.Event = field(default_factory=trio.Event)


Behaviour = Callable[[Any, Hostile], Awaitable[None]]


async def endless_tokens(stream: Any, hostile: Hostile) -> None:
    while True:
        await write_json_frame(stream, {"type": "token", "text": "ab"})
        hostile.frames += 1


async def big_tokens(stream: Any, hostile: Hostile) -> None:
    while True:  # each frame under the frame cap; together over the reply cap
        await write_json_frame(stream, {"type": "token", "text": "x" * 4000})
        hostile.frames += 1


async def slow_tokens(stream: Any, hostile: Hostile) -> None:
    while True:
        await write_json_frame(stream, {"type": "token", "text": "a"})
        hostile.frames += 1
        await trio.sleep(0.1)


async def oversized_frame(stream: Any, hostile: Hostile) -> None:
    await write_json_frame(stream, {"type": "token", "text": "fine"})
    await stream.write(encode_uvarint(SMALL.max_frame_bytes + 1) + b"x" * 1024)
    hostile.frames += 2
    await trio.sleep_forever()  # never sends the rest: the client must not wait for it


def garbage(payload: bytes) -> Behaviour:
    async def send(stream: Any, hostile: Hostile) -> None:
        await write_frame(stream, payload)
        hostile.frames += 1
        await trio.sleep_forever()
    return send


@dataclass
class Outcome:
    events: list[Token | Done | Served]
    error: RouteError | None
    hostile: Hostile
    elapsed_s: float

    @property
    def tokens(self) -> list[Token]:
        return [e for e in self.events if isinstance(e, Token)]


def ask(behaviour: Behaviour, max_tokens: int, limits: ReplyLimits = SMALL) -> Outcome:
    """One request from a client host to the hostile host; what came back and how fast."""
    result: list[Outcome] = []

    async def main() -> None:
        hostile = Hostile()

        async def handle(stream: Any) -> None:
            hostile.requests.append(json.loads(await read_frame(stream, MAX_REQUEST_BYTES)))
            try:
                await behaviour(stream, hostile)
            except StreamError:
                hostile.cut.set()  # the client closed or reset the stream
                raise

        async with running_host() as evil, running_host() as client:
            evil.set_stream_handler(TProtocol(PROTOCOL), isolate("federated", handle))
            await client.connect(PeerInfo(evil.get_id(), evil.get_addrs()))
            route = FederatedRoute(client, cast(Any, None),
                                   lambda model: [Candidate(evil.get_id().to_base58(), "evil",
                                                            0)],
                                   lambda: ["tiny"], limits=limits)
            request = GenerateRequest(id="r1", prompt="Once", max_tokens=max_tokens)
            events: list[Token | Done | Served] = []
            error = None
            started = trio.current_time()
            try:
                async for event in route.generate(request, "tiny"):
                    events.append(event)
            except RouteError as exc:
                error = exc
            elapsed_s = trio.current_time() - started
            with trio.move_on_after(2):  # the hosts still up: only the client can cut it
                await hostile.cut.wait()
            result.append(Outcome(events, error, hostile, elapsed_s))

    run(main)
    return result[0]


def test_a_node_streaming_forever_is_cut_at_max_tokens() -> None:
    out = ask(endless_tokens, max_tokens=50, limits=ReplyLimits())
    assert out.error is None
    assert [t.text for t in out.tokens] == ["ab"] * 50
    done = out.events[-1]
    assert isinstance(done, Done) and done.finish_reason == "length", done
    assert done.text == "ab" * 50 and len(done.tokens) == 50
    assert out.elapsed_s < 5
    assert out.hostile.requests[0]["request"]["max_tokens"] == 50
    assert out.hostile.cut.is_set()  # the stream was closed: nothing more can pile up


def test_a_frame_over_the_cap_is_refused_with_a_clear_error() -> None:
    out = ask(oversized_frame, max_tokens=50)
    assert out.error is not None
    assert f"evil sent a reply frame over the {SMALL.max_frame_bytes}-byte limit" in str(
        out.error), out.error
    assert [t.text for t in out.tokens] == ["fine"]
    assert out.elapsed_s < 5  # not waiting for the frame's body


@pytest.mark.parametrize("payload", [b"\xff\x00not json", b"[1, 2]", b'{"type": "poem"}',
                                     b'{"type": "done", "prompt_tokens": [1]}'])
def test_garbage_frames_are_a_clear_error(payload: bytes) -> None:
    out = ask(garbage(payload), max_tokens=50)
    assert out.error is not None and "evil sent a bad reply" in str(out.error), out.error
    assert out.elapsed_s < 5


def test_a_reply_over_the_byte_cap_is_cut() -> None:
    out = ask(big_tokens, max_tokens=32768)
    assert out.error is not None
    assert f"over the {SMALL.max_reply_bytes}-byte limit" in str(out.error), out.error
    received = sum(len(t.text) for t in out.tokens)
    assert 0 < received <= SMALL.max_reply_bytes  # the client kept no more than the cap
    assert out.elapsed_s < 5


def test_a_reply_that_never_finishes_ends_at_the_deadline() -> None:
    out = ask(slow_tokens, max_tokens=10_000)
    assert out.error is not None
    assert "evil did not finish the reply within 2 s" in str(out.error), out.error
    assert 1.9 < out.elapsed_s < 5
    assert 0 < len(out.tokens) < 40
