"""The OpenAI sampling fields: checked and carried into the engine request, refused with a 400
naming the field when Covey cannot honour them; logprobs shaped as OpenAI's; max_tokens
fitted to the context; and the federated wire that carries them to another node."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import pytest

from backends.engine_process import fit_max_tokens
from backends.engine_protocol import Done, GenerateRequest, Token, TokenLogprob, decode, encode
from backends.generation import sampling as engine_sampling
from swarm.api.openai_api import (
    LOWERED_HEADER,
    LOWERED_USAGE_KEY,
    chunk,
    full_response,
    lowered_headers,
    parse_completion,
)
from swarm.api.sampling import BadRequest
from swarm.routes import federated
from swarm.routes.failover import stitch

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": "m", "prompt": "Once"}


def chat(**fields: Any) -> GenerateRequest:
    return parse_completion({**CHAT, **fields}, "chat").generate


def refused(body: dict[str, Any], kind: str = "chat") -> str | None:
    with pytest.raises(BadRequest) as caught:
        parse_completion(body, kind)
    return caught.value.param


def test_sampling_fields_reach_the_engine_request() -> None:
    request = chat(top_k=5, min_p=0.1, presence_penalty=0.5, frequency_penalty=-1,
                   logit_bias={"17": -100, "3": 2.5}, logprobs=True, top_logprobs=4,
                   stop=[str(i) for i in range(16)])
    assert (request.top_k, request.min_p) == (5, 0.1)
    assert (request.presence_penalty, request.frequency_penalty) == (0.5, -1.0)
    assert request.logit_bias == ((3, 2.5), (17, -100.0))
    assert (request.logprobs, request.top_logprobs) == (True, 4)
    assert len(request.stop) == 16
    assert request.fit_max_tokens


def test_top_logprobs_asks_for_logprobs() -> None:
    assert (chat(top_logprobs=3).logprobs, chat(top_logprobs=3).top_logprobs) == (True, 3)
    assert not chat(top_logprobs=0).logprobs


def test_an_engine_refusal_of_a_field_names_it() -> None:
    from swarm.api.openai_api import _route_error
    from swarm.routes.route import RequestRefused

    error = _route_error(RequestRefused("logit_bias: token 999999 is not in the model's "
                                        "vocabulary of 32 tokens"))
    assert (error.status, error.param, error.code) == (400, "logit_bias", "invalid_value")
    length = _route_error(RequestRefused("the prompt (9 tokens) plus max_tokens ..."))
    assert (length.param, length.code) == ("max_tokens", "context_length_exceeded")


def test_defaults_are_what_the_engine_always_used() -> None:
    request = chat()
    assert (request.top_k, request.min_p, request.logit_bias, request.logprobs) == \
        (40, 0.0, (), False)
    assert (request.presence_penalty, request.frequency_penalty) == (0.0, 0.0)


def test_legacy_completions_logprobs_and_echo() -> None:
    parsed = parse_completion({**TEXT, "logprobs": 3}, "text")
    assert (parsed.generate.logprobs, parsed.generate.top_logprobs) == (True, 3)
    assert parse_completion({**TEXT, "logprobs": 0}, "text").generate.logprobs
    assert not parse_completion(TEXT, "text").generate.logprobs
    assert parse_completion({**TEXT, "echo": True}, "text").echo == "Once"
    assert parse_completion({**TEXT, "suffix": ""}, "text").echo == ""


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": True}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"logprobs": 1}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"prediction": {"type": "content"}}, "prediction"),
    ({"covey_strict_max_tokens": "yes"}, "covey_strict_max_tokens"),
])
def test_chat_fields_it_cannot_honour_are_a_400_naming_them(fields: dict, param: str) -> None:
    assert refused({**CHAT, **fields}) == param


@pytest.mark.parametrize(("fields", "param"), [
    ({"suffix": "end"}, "suffix"),
    ({"echo": True, "logprobs": 2}, "echo"),
    ({"echo": "yes"}, "echo"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"best_of": 3}, "best_of"),
])
def test_completion_fields_it_cannot_honour_are_a_400_naming_them(fields: dict,
                                                                  param: str) -> None:
    assert refused({**TEXT, **fields}, "text") == param


def test_strictness_by_header_or_body() -> None:
    assert not parse_completion(CHAT, "chat", {"x-covey-strict-max-tokens": "1"}) \
        .generate.fit_max_tokens
    assert parse_completion(CHAT, "chat", {"x-covey-strict-max-tokens": "0"}) \
        .generate.fit_max_tokens
    assert not chat(covey_strict_max_tokens=True).fit_max_tokens


def test_max_tokens_fits_the_context_unless_strict() -> None:
    assert fit_max_tokens(10, 100, 4096, fit=True) == 100
    assert fit_max_tokens(10, 8192, 4096, fit=True) == 4086
    with pytest.raises(ValueError, match="does not fit the context"):
        fit_max_tokens(10, 8192, 4096, fit=False)
    with pytest.raises(ValueError, match="does not fit the context"):
        fit_max_tokens(4096, 1, 4096, fit=True)  # the prompt alone fills it


LP = TokenLogprob(" Hi", -0.5, (32, 72, 105), (TokenLogprob(" Hi", -0.5, (32, 72, 105)),
                                                TokenLogprob(" Hey", -1.5, (32, 72, 101, 121))))


def done(lowered: int | None = None) -> Done:
    return Done("r", "stop", " Hi", 4, (7,), max_tokens_lowered_to=lowered)


def test_chat_logprobs_in_openai_shape() -> None:
    c = parse_completion({**CHAT, "logprobs": True, "top_logprobs": 2}, "chat")
    body = full_response(c, done(), 0, {}, [LP])
    entry = body["choices"][0]["logprobs"]["content"][0]
    assert entry["token"] == " Hi" and entry["logprob"] == -0.5 and entry["bytes"] == [32, 72, 105]
    assert [t["token"] for t in entry["top_logprobs"]] == [" Hi", " Hey"]
    streamed = chunk(c, 0, {}, text=" Hi", logprob=LP)["choices"][0]["logprobs"]
    assert len(streamed["content"][0]["top_logprobs"]) == 2
    plain = parse_completion(CHAT, "chat")
    assert full_response(plain, done(), 0, {})["choices"][0]["logprobs"] is None


def test_completion_logprobs_in_the_legacy_shape_after_an_echo() -> None:
    c = parse_completion({**TEXT, "logprobs": 2}, "text")
    got = full_response(c, done(), 0, {}, [LP, LP])["choices"][0]["logprobs"]
    assert got == {"tokens": [" Hi", " Hi"], "token_logprobs": [-0.5, -0.5],
                   "top_logprobs": [{" Hi": -0.5, " Hey": -1.5}] * 2, "text_offset": [0, 3]}
    echoed = parse_completion({**TEXT, "echo": True}, "text")
    assert full_response(echoed, done(), 0, {})["choices"][0]["text"] == "Once Hi"


def test_a_lowered_max_tokens_is_stated() -> None:
    c = parse_completion(CHAT, "chat")
    assert full_response(c, done(300), 0, {})["usage"][LOWERED_USAGE_KEY] == 300
    assert lowered_headers(done(300)) == {LOWERED_HEADER: "300"}
    assert LOWERED_USAGE_KEY not in full_response(c, done(), 0, {})["usage"]
    assert lowered_headers(done()) == {}
    # A stream's headers go out with its first token, which says it too.
    assert lowered_headers(Token("r", 1, "a", None, 300)) == {LOWERED_HEADER: "300"}
    assert lowered_headers(Token("r", 1, "a")) == {}


def test_failover_keeps_the_lowering_counted_from_the_whole_reply() -> None:
    carried = [Token("r", 1, "a"), Token("r", 2, "b")]
    assert stitch(chat(), carried, done(100)).max_tokens_lowered_to == 102
    assert stitch(chat(), carried, done()).max_tokens_lowered_to is None


def test_the_engine_protocol_carries_the_new_fields() -> None:
    request = chat(logit_bias={"5": -100}, logprobs=True, top_logprobs=2, min_p=0.2)
    assert decode(encode(request)) == request
    token = Token("r", 5, " Hi", LP)
    assert decode(encode(token)) == token
    assert decode(encode(done(9))) == done(9)


def test_a_plain_federated_request_reads_as_the_first_wire_version() -> None:
    frame = json.loads(federated.request_frame("m", chat()))
    assert not set(frame["request"]) - {f for f in asdict(chat()) if f not in (
        *federated._ADDED, *federated._OPTIONAL)}
    assert frame["optional"] == {"fit_max_tokens": True}
    # An older node builds GenerateRequest(**request) with only the fields it knows.
    old_fields = set(frame["request"])
    assert not old_fields & {"logprobs", "logit_bias", "fit_max_tokens"}


def test_a_federated_request_round_trips_with_its_sampling_fields() -> None:
    request = replace(chat(logit_bias={"5": -100}, logprobs=True, top_logprobs=3,
                           presence_penalty=1.0, stop=[str(i) for i in range(16)]))
    frame = json.loads(federated.request_frame("m", request))
    assert {"logit_bias", "logprobs", "top_logprobs", "presence_penalty"} <= set(
        frame["request"])
    assert federated.parse_request_frame(json.dumps(frame).encode()) == ("m", request)
    strict = replace(request, fit_max_tokens=False)
    assert federated.parse_request_frame(federated.request_frame("m", strict))[1] == strict


def test_federated_reply_frames_carry_logprobs_and_lowering() -> None:
    token = federated.token_frame(Token("r", 5, " Hi", LP))
    assert token["logprob"]["top"][1]["token"] == " Hey"
    assert "logprob" not in federated.token_frame(Token("r", 5, " Hi"))
    assert federated.done_frame(done(7))["max_tokens_lowered_to"] == 7
    assert "max_tokens_lowered_to" not in federated.done_frame(done())
    first = federated.token_frame(Token("r", 5, " Hi", None, 7))  # a stream's headers need it
    assert federated._lowered(first) == 7 and federated._lowered(token) is None


@pytest.mark.parametrize("raw", [
    None, {"token": 1, "logprob": 0, "bytes": []}, {"token": "a", "logprob": "x", "bytes": []},
    {"token": "a", "logprob": 0, "bytes": [300]},
    {"token": "a", "logprob": 0, "bytes": [], "top": [{"token": "b", "logprob": 0,
                                                       "bytes": []}] * 21},
])
def test_a_malformed_logprob_from_a_peer_is_refused(raw: Any) -> None:
    from backends.engine_protocol import logprob_from_raw
    with pytest.raises(ValueError):
        logprob_from_raw(raw)


def test_logit_bias_bans_and_checks_the_vocabulary() -> None:
    bias = engine_sampling.bias_vector(((2, -100.0), (1, 3.0)), 4)
    assert bias is not None and bias[2] == -np.inf and bias[1] == 3.0
    assert engine_sampling.bias_vector((), 4) is None
    with pytest.raises(ValueError, match="token 9"):
        engine_sampling.bias_vector(((9, 1.0),), 4)
    logits = np.zeros(4, dtype=np.float32)
    assert np.argmax(engine_sampling.bias_processor(bias)(None, logits)) == 1


def test_token_logprob_ranks_the_alternatives() -> None:
    logits = np.log(np.array([0.1, 0.6, 0.3], dtype=np.float32))
    got = engine_sampling.token_logprob(logits, 2, 2, lambda t: f"t{t}".encode())
    assert got.token == "t2" and got.logprob == pytest.approx(np.log(0.3), abs=1e-5)
    assert [t.token for t in got.top] == ["t1", "t2"]
    banned = engine_sampling.token_logprob(np.array([0, -np.inf], dtype=np.float32), 1, 0,
                                           lambda t: b"x")
    assert banned.logprob == -9999.0 and banned.top == ()
