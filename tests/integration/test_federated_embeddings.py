"""Embeddings through the federated protocol between two real libp2p hosts on loopback: the
serving host embeds with its own engine (the tiny model) and the client gets the same vectors;
a member sending oversized batches gets clear refusals and the node keeps serving; a node from
before embeddings crossed the wire refuses the request instead of ignoring it."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo
from libp2p.utils.varint import encode_uvarint

from backends.engine_protocol import Embeddings
from backends.store.model_store import ModelStore
from swarm.net.host import isolate, read_frame, write_frame
from swarm.routes.embeddings import EMBED_CTX, MAX_INPUTS, MAX_TOTAL_TOKENS, LocalEmbedder
from swarm.routes.federated import (
    MAX_REQUEST_BYTES,
    PROTOCOL,
    Candidate,
    FederatedRoute,
    FederatedService,
    parse_request_frame,
)
from swarm.routes.federated_embeddings import EmbedCall, embed_frame
from swarm.routes.route import RequestRefused, RouteError
from tests.integration.test_tunnel import run, running_host

pytestmark = pytest.mark.processes

INPUTS: tuple[str | tuple[int, ...], ...] = ("The cat sat on the mat.", "A kitten sat.",
                                             (1, 2, 3, 300))


@dataclass
class Pair:
    server: IHost
    client: IHost
    embedder: LocalEmbedder  # the serving node's own
    route: FederatedRoute  # the client's

    async def raw(self, frame: bytes) -> dict[str, Any]:
        """What the serving node answers a member that sends `frame` by hand."""
        stream = await self.client.new_stream(self.server.get_id(), [TProtocol(PROTOCOL)])
        await write_frame(stream, frame)
        reply = json.loads(await read_frame(stream, 16 << 20))
        await stream.close()
        assert isinstance(reply, dict)
        return reply


def with_pair(tiny_model: Path, tmp_path: Path, test: Callable[[Pair], Awaitable[None]],
              handler: Callable[[FederatedService], Any] | None = None) -> None:
    store = ModelStore(tmp_path / "models")
    store.import_file(tiny_model, "tiny")

    async def main() -> None:
        embedder = LocalEmbedder(store, "f1")
        service = FederatedService(cast(Any, None), lambda: None, embedder=embedder)
        service.models = ["tiny"]
        async with running_host() as server, running_host() as client:
            handle = service.handle if handler is None else handler(service)
            server.set_stream_handler(TProtocol(PROTOCOL), isolate("federated", handle))
            await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
            serving = [Candidate(server.get_id().to_base58(), "f1", 0)]
            route = FederatedRoute(client, cast(Any, None),
                                   lambda model: serving if model == "tiny" else [],
                                   lambda: ["tiny"])
            try:
                await test(Pair(server, client, embedder, route))
            finally:
                await embedder.close()

    run(main)


def assert_same(got: Embeddings, expected: Embeddings) -> None:
    assert got.prompt_tokens == expected.prompt_tokens
    assert len(got.vectors) == len(expected.vectors) == len(INPUTS)
    for a, b in zip(got.vectors, expected.vectors, strict=True):
        assert len(a) == len(b) > 0
        assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) for x, y in zip(a, b,
                                                                                  strict=True))


def test_federated_embeddings_equal_the_serving_nodes_own(tiny_model: Path,
                                                          tmp_path: Path) -> None:
    async def test(pair: Pair) -> None:
        remote, machine = await pair.route.embed(EmbedCall("tiny", INPUTS))
        assert machine == "f1"
        local = await pair.embedder.embed("tiny", INPUTS, MAX_TOTAL_TOKENS)
        assert_same(remote, local)
        with pytest.raises(RouteError, match="no federated node serves 'other'"):
            await pair.route.embed(EmbedCall("other", INPUTS))

    with_pair(tiny_model, tmp_path, test)


def test_oversized_batches_are_refused_clearly_and_the_node_keeps_serving(
        tiny_model: Path, tmp_path: Path) -> None:
    async def test(pair: Pair) -> None:
        too_many = await pair.raw(embed_frame(EmbedCall("tiny", ("x",) * (MAX_INPUTS + 1))))
        assert too_many["type"] == "error" and too_many["code"] == "invalid_request"
        assert f"at most {MAX_INPUTS} per request" in too_many["message"]
        limit = await pair.raw(embed_frame(EmbedCall("tiny", ("x",), 10**6)))
        assert limit["type"] == "error" and str(MAX_TOTAL_TOKENS) in limit["message"]
        over_total = ((300,) * EMBED_CTX,) * (MAX_TOTAL_TOKENS // EMBED_CTX + 1)
        total = await pair.raw(embed_frame(EmbedCall("tiny", over_total)))
        assert total["type"] == "error", total
        assert f"at most {MAX_TOTAL_TOKENS} per request" in total["message"]
        long = await pair.raw(embed_frame(EmbedCall("tiny", ((300,) * (EMBED_CTX + 1),))))
        assert long["type"] == "error" and "per input" in long["message"], long
        # Through the route the client gets a refusal naming the limit, not a retry.
        with pytest.raises(RequestRefused, match="f1 refused the request: the batch has 129"):
            await pair.route.embed(EmbedCall("tiny", ("x",) * (MAX_INPUTS + 1)))
        # A frame over the request cap: the stream is cut, the node does not read it all.
        stream = await pair.client.new_stream(pair.server.get_id(), [TProtocol(PROTOCOL)])
        await stream.write(encode_uvarint(MAX_REQUEST_BYTES + 1) + b"x" * 1024)
        with pytest.raises(Exception):  # noqa: B017, PT011 - reset or EOF, as libp2p has it
            await read_frame(stream, 1024)
        # The node is still up and embeds as before.
        remote, _ = await pair.route.embed(EmbedCall("tiny", INPUTS))
        assert_same(remote, await pair.embedder.embed("tiny", INPUTS, MAX_TOTAL_TOKENS))

    with_pair(tiny_model, tmp_path, test)


def test_a_node_from_before_embeddings_refuses_them(tiny_model: Path, tmp_path: Path) -> None:
    served: list[str] = []

    def older(service: FederatedService) -> Callable[[INetStream], Awaitable[None]]:
        async def handle(stream: INetStream) -> None:  # what a node before this release did
            model, request = parse_request_frame(await read_frame(stream, MAX_REQUEST_BYTES))
            served.append(model)

        return handle

    async def test(pair: Pair) -> None:
        with trio.fail_after(20), pytest.raises(RouteError) as caught:
            await pair.route.embed(EmbedCall("tiny", INPUTS))
        assert "every federated node serving this model failed" in str(caught.value)
        assert "closed the stream without embedding" in str(caught.value)
        assert served == []  # it ran nothing

    with_pair(tiny_model, tmp_path, test, older)
