"""The federated embedding frames without a network: what a serving node accepts, what a
client believes of a reply, and that a node from before them refuses the request."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from backends.engine_protocol import Embeddings
from swarm.routes import federated_embeddings as wire
from swarm.routes.embeddings import MAX_INPUTS, MAX_TOTAL_TOKENS
from swarm.routes.federated import parse_request_frame
from swarm.routes.federated_embeddings import EmbedCall

CALL = EmbedCall("tiny", ("a text", (1, 2, 3)))


def test_an_embed_frame_round_trips() -> None:
    body = json.loads(wire.embed_frame(CALL))
    assert wire.parse_embed_frame(body) == CALL


def test_an_older_node_refuses_an_embed_frame() -> None:
    # Its parser wants a generation request; it must not serve something else in its place.
    with pytest.raises(ValueError, match="request without a model"):
        parse_request_frame(wire.embed_frame(CALL))


@pytest.mark.parametrize(("embed", "words"), [
    ({"inputs": ["x"] * (MAX_INPUTS + 1)}, f"at most {MAX_INPUTS}"),
    ({"inputs": []}, "non-empty list"),
    ({"inputs": "x"}, "non-empty list"),
    ({"inputs": [""]}, "non-empty string"),
    ({"inputs": [[1, -2]]}, "non-negative"),
    ({"inputs": [[True]]}, "non-negative"),
    ({"inputs": [{"x": 1}]}, "non-empty string"),
    ({"inputs": ["x"], "max_total_tokens": MAX_TOTAL_TOKENS + 1}, str(MAX_TOTAL_TOKENS)),
    ({"inputs": ["x"], "max_total_tokens": 0}, str(MAX_TOTAL_TOKENS)),
    ([], "needs a model"),
])
def test_a_serving_node_refuses_what_breaks_a_limit(embed: Any, words: str) -> None:
    with pytest.raises(wire.EmbedRefused, match=words):
        wire.parse_embed_frame({"version": 1, "model": "tiny", "embed": embed})


def reply_to(call: EmbedCall, vectors: list[tuple[float, ...]], tokens: int = 7
             ) -> dict[str, Any]:
    return json.loads(json.dumps(wire.embeddings_frame(Embeddings("x", tuple(vectors), tokens))))


def test_a_reply_carries_float32_vectors_exactly() -> None:
    vectors = [(0.6, 0.8), (1.0, 0.0)]
    got = wire.parse_embeddings_reply(reply_to(CALL, vectors), CALL, "r")
    assert got.prompt_tokens == 7 and got.id == "r"
    expected = [struct.unpack("<2f", struct.pack("<2f", *v)) for v in vectors]
    assert [list(v) for v in got.vectors] == [list(v) for v in expected]


@pytest.mark.parametrize(("reply", "words"), [
    (reply_to(CALL, [(1.0,)]), "one vector per input"),
    (reply_to(CALL, [(1.0,), (1.0, 0.0)]), "differ in size"),
    (reply_to(CALL, [(1.0,), (1.0,)], tokens=MAX_TOTAL_TOKENS + 1), "prompt_tokens"),
    ({"vectors": ["!!", "!!"], "prompt_tokens": 1}, "not base64"),
    ({"vectors": [1, 2], "prompt_tokens": 1}, "not base64"),
    ({"vectors": ["AAA=", "AAA="], "prompt_tokens": 1}, "partial"),
    (reply_to(CALL, [(0.0,) * (wire.MAX_DIMENSIONS + 1)] * 2), "too many"),
    (reply_to(CALL, [(1.0,), (1.0,)]) | {"prompt_tokens": "7"}, "prompt_tokens"),
])
def test_a_client_refuses_a_reply_of_the_wrong_shape(reply: dict[str, Any], words: str
                                                     ) -> None:
    with pytest.raises(ValueError, match=words):
        wire.parse_embeddings_reply(reply, CALL, "r")
