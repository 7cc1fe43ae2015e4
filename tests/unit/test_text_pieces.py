"""Pure pieces of generation: stop strings, chat templates, the engine protocol, and the
layer split rule."""

from __future__ import annotations

import pytest

from backends import engine_protocol as proto
from backends.layer_split import layer_devices, layers_per_device
from backends.text.chat_template import FALLBACK_STOPS, ChatTemplateError, render_chat
from backends.text.stop_strings import StopMatcher

USER_X = {"role": "user", "content": "x"}


def stream(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    shown = "".join(m.feed(p) for p in pieces) + m.flush()
    return shown, m.stopped


def test_stop_string_split_across_pieces_is_never_shown() -> None:
    assert stream(["\nUser:"], ["Paris.", "\nUs", "er:", " more"]) == ("Paris.", True)


def test_partial_stop_that_does_not_complete_is_shown() -> None:
    assert stream(["\nUser:"], ["a\nUs", "ually fine"]) == ("a\nUsually fine", False)


def test_earliest_of_several_stops_wins() -> None:
    assert stream(["END", "STOP"], ["one STOP two END"]) == ("one ", True)


def test_no_stops_passes_everything() -> None:
    assert stream([], ["a", "b"]) == ("ab", False)


def test_model_template_is_used_with_special_tokens() -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    chat = render_chat([{"role": "user", "content": "hi"}], template, bos_token="<s>",
                       eos_token="</s>")
    assert chat.text == "<s><user>hi</s><assistant>"
    assert chat.stop == ()


def test_fallback_template_for_base_models_stops_at_the_next_turn() -> None:
    chat = render_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None
    )
    assert chat.text == "System: Be brief.\nUser: Hi\nAssistant:"
    assert chat.stop == FALLBACK_STOPS


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}], ["hi"]],
)
def test_malformed_messages_are_refused(messages: list) -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(messages, None)


def test_template_raise_exception_becomes_a_clear_error() -> None:
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat([USER_X], "{{ raise_exception('roles must alternate') }}")


def test_template_cannot_escape_the_sandbox() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat([USER_X], "{{ ''.__class__.__mro__[1].__subclasses__() }}")


def test_protocol_round_trips_every_message() -> None:
    messages = [
        proto.EngineConfig(model_path="/m.gguf", rpc_endpoints=("127.0.0.1:5",),
                           tensor_split=(1.0, 2.0)),
        proto.GenerateRequest(id="a", messages=({"role": "user", "content": "hé"},), stop=("x",)),
        proto.Loaded(load_s=1.0, n_ctx=5, n_layers=2,
                     devices=(proto.DeviceLayers("RPC0", "127.0.0.1:5", 2, True),)),
        proto.Token(id="a", token=5, text="hé"),
        proto.Done(id="a", finish_reason="stop", text="x", prompt_tokens=3, tokens=(1, 2),
                   timings=proto.Timings(load_s=1.0)),
        proto.Failed(kind="load", message="no"),
        proto.Connecting(endpoint="127.0.0.1:5"),
        proto.Connected(endpoint="127.0.0.1:5"),
        proto.LoadProgress(fraction=0.5),
        proto.Stop(id="a"),
        proto.Shutdown(),
    ]
    for m in messages:
        assert proto.decode(proto.encode(m)) == m


@pytest.mark.parametrize(
    "line",
    [
        "garbage",
        b"\xff\xfe",
        "[1, 2]",
        '{"type": "Token", "id": "a", "token": 1, "text": "x"}',
        '{"v": 99, "type": "Token", "id": "a", "token": 1, "text": "x"}',
        '{"v": 1, "type": "Rm", "path": "/"}',
        '{"v": 1, "type": "Token", "id": "a"}',
        '{"v": 1, "type": "Loaded", "load_s": 1, "n_ctx": 1, "n_layers": 1, "devices": [5]}',
        '{"v": 1, "type": "Loaded", "load_s": 1, "n_ctx": 1, "n_layers": 1}',
        '{"v": 1, "type": "Done", "id": "a", "finish_reason": "stop", "text": "", '
        '"prompt_tokens": 1, "tokens": [], "timings": "x"}',
    ],
)
def test_protocol_garbage_is_a_protocol_error(line: str | bytes) -> None:
    with pytest.raises(proto.ProtocolError):
        proto.decode(line)


def test_layer_split_follows_the_shares() -> None:
    assert layers_per_device(18, [1, 2]) == [7, 11]
    assert layers_per_device(4, [1, 1]) == [3, 1]  # the output layer takes the 5th slot
    assert layers_per_device(4, [0, 1]) == [0, 4]
    assert layer_devices(4, [1, 1])[-1] == 1
    assert sum(layers_per_device(61, [3, 5, 8])) == 61
    with pytest.raises(ValueError):
        layers_per_device(4, [])
    with pytest.raises(ValueError):
        layers_per_device(4, [0, 0])
