"""`covey chat`, `covey chat --route ...` and the desktop app ask for a reply alike: the same
request body, honoured by the node as the same sampling the in-process engine gets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from app.cli import chat as chat_cli
from app.cli import node_chat
from app.cli.command import build_parser
from app.common.chat_request import (
    CHAT_PATH,
    ROUTE_PREFERENCES,
    ChatPanel,
    ChatReply,
    ChatSettings,
    node_route,
    panel_request,
)
from app.gui.controller import Controller
from swarm.api.openai_api import parse_completion
from swarm.api.openapi import ROUTE_NAMES

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
TUNED = ChatSettings(max_tokens=64, temperature=0.2, top_p=0.9, repeat_penalty=1.3, seed=7,
                     deterministic=True)
TUNED_ARGV = ["--max-tokens", "64", "--temperature", "0.2", "--top-p", "0.9",
              "--repeat-penalty", "1.3", "--seed", "7", "--deterministic"]


class RecordingLink:
    """Stands in for the app's NodeLink: keeps what the chat page would post."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, Any]] = []

    def stream(self, path: str, body: Any) -> Any:
        self.posted.append((path, body))
        return iter(())


def cli_body(*argv: str) -> dict[str, Any]:
    args = build_parser().parse_args(["chat", "--route", "auto", "--model", "tiny", *argv])
    return node_chat.request_body(args, MESSAGES)


def app_body(tmp_path: Path, settings: ChatSettings | None) -> dict[str, Any]:
    controller = Controller(tmp_path)
    try:
        if settings is not None:
            controller.chat_settings = settings
        link = RecordingLink()
        controller.supervisor.link = link  # type: ignore[assignment]
        controller.chat("tiny", MESSAGES)
        [(path, body)] = link.posted
        assert path == CHAT_PATH
        return body
    finally:
        controller.conversations.close()


@pytest.mark.parametrize(("argv", "settings"), [([], None), (TUNED_ARGV, TUNED)],
                         ids=["defaults", "tuned"])
def test_covey_chat_route_sends_what_the_app_sends(
        tmp_path: Path, argv: list[str], settings: ChatSettings | None) -> None:
    cli = cli_body(*argv)
    assert cli == app_body(tmp_path, settings)
    expected = settings or ChatSettings()
    assert cli["repeat_penalty"] == expected.repeat_penalty  # once dropped by --route
    assert cli["max_tokens"] == expected.max_tokens


@pytest.mark.parametrize("argv", [[], TUNED_ARGV], ids=["defaults", "tuned"])
def test_the_node_samples_a_route_chat_as_the_in_process_engine_does(argv: list[str]) -> None:
    via_node = parse_completion(cli_body(*argv), "chat").generate
    args = build_parser().parse_args(["chat", "--model", "tiny", *argv])
    in_process = chat_cli.engine_request(args, MESSAGES)
    assert dataclasses.replace(via_node, id="") == in_process
    if argv:
        assert (in_process.repeat_penalty, in_process.seed) == (1.3, 7)


def test_a_reply_keeps_why_its_route_was_chosen() -> None:
    reply = ChatReply()
    reply.add({"choices": [], "covey": {"route": "local", "machines": ["vm"],
                                        "route_reason": "fits this machine"}})
    assert reply.served() == {"route": "local", "route_reason": "fits this machine",
                              "machines": ["vm"]}


def test_a_streamed_reply_folds_into_text_route_usage_and_speed() -> None:
    covey = {"route": "local", "machines": ["vm"]}
    events: list[dict[str, Any]] = [
        {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}], "covey": covey},
        {"choices": [{"delta": {"content": "Hel"}, "finish_reason": None}], "covey": covey},
        {"choices": [{"delta": None, "finish_reason": None}],
         "covey": {**covey, "notice": "w1 left; w2 carries on"}},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": None}], "covey": covey},
        {"choices": [{"delta": {}, "finish_reason": "length"}], "covey": covey, "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5,
                                  "total_tokens": 8}, "covey": covey},
    ]
    reply = ChatReply()
    added = [reply.add(event, now=10.0 + i) for i, event in enumerate(events)]
    assert added == ["", "Hel", "", "lo", "", ""]
    assert reply.text == "Hello" and reply.finish_reason == "length"
    assert reply.served() == {"route": "local", "machines": ["vm"],
                              "notice": "w1 left; w2 carries on"}
    assert reply.tokens_per_s(now=13.0) == 2.0  # 4 tokens after the first, in 2 s
    assert reply.summary() == {
        "version": 1, "text": "Hello", "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        "covey": {**covey, "notice": "w1 left; w2 carries on"}}


def test_no_speed_before_two_tokens() -> None:
    reply = ChatReply()
    assert reply.tokens_per_s(now=1.0) is None
    reply.add({"choices": [{"delta": {"content": "a"}}], "usage": {"completion_tokens": 1}},
              now=0.5)
    assert reply.tokens_per_s(now=1.0) is None


def test_a_chats_panel_shapes_the_body_the_app_posts(tmp_path: Path) -> None:
    """The side panel's values reach the node: the system prompt as the first message, its
    sampling, and its route preference as a route the node knows; as `covey chat` would ask."""
    panel = ChatPanel(system_prompt="  Be brief.  ", temperature=0.0, max_tokens=64,
                      route="here")
    settings, messages, route = panel_request(panel, MESSAGES[1:], ["local", "sharded"])
    assert messages == MESSAGES and route == "local"
    controller = Controller(tmp_path)
    try:
        link = RecordingLink()
        controller.supervisor.link = link  # type: ignore[assignment]
        controller.chat("tiny", messages, settings, route)
        [(_path, body)] = link.posted
    finally:
        controller.conversations.close()
    assert (body["temperature"], body["max_tokens"], body["covey_route"]) == (0.0, 64, "local")
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body == cli_body("--temperature", "0", "--max-tokens", "64") | {
        "covey_route": "local"}


def test_route_preferences_map_to_routes_the_node_knows() -> None:
    assert node_route("auto", ["local", "federated"]) == "auto"
    assert node_route("here", []) == "local"
    assert node_route("swarm", ["local", "sharded", "federated"]) == "federated"
    assert node_route("swarm", ["local", "sharded"]) == "sharded"
    assert {node_route(p, ["federated"]) for p in ROUTE_PREFERENCES} <= set(ROUTE_NAMES)


def test_a_panel_left_alone_asks_as_covey_chat_does() -> None:
    settings, messages, route = panel_request(ChatPanel(), MESSAGES[1:])
    assert (settings, messages, route) == (ChatSettings(), MESSAGES[1:], "auto")
