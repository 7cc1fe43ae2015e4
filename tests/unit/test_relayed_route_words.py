"""A reply served by a machine reached through a relay says so: the node's `covey.relayed`,
the chat footer ("Ran on fed1, reached through office, …") and `covey chat --route`'s line."""

from __future__ import annotations

import pytest

from app.cli import node_chat
from app.common.chat_request import ChatReply
from app.common.reached import reached_through
from app.gui.transcript.route_words import served_line
from swarm.api.openai_api import note_relayed

REASON = "fed1 serves it (needs 12.0 GiB, 3.0 GiB free here); served by fed1"


def test_the_words_name_the_relay_only_for_machines_reached_through_one() -> None:
    assert reached_through(["fed1"], {"fed1": "office"}) == ", reached through office"
    assert reached_through(["w1", "home2"], {"home2": "office"}) == \
        " (home2 reached through office)"
    assert reached_through(["fed1"], {"desk": "office"}) == ""
    assert reached_through(["fed1"], None) == ""


def test_the_node_notes_only_the_serving_machines_that_are_relayed() -> None:
    covey = {"route": "sharded", "route_reason": "",
             "machines": ["w1 (12 layers)", "home2 (12 layers)"]}
    note_relayed(covey, {"home2": "office", "elsewhere": "office"})
    assert covey["relayed"] == {"home2 (12 layers)": "office"}
    direct = {"route": "federated", "route_reason": "", "machines": ["fed1"]}
    note_relayed(direct, {"home2": "office"})
    assert "relayed" not in direct


def test_the_chat_footer_says_the_route_ran_through_a_relay() -> None:
    reply = ChatReply()
    reply.add({"covey": {"route": "federated", "route_reason": REASON, "machines": ["fed1"],
                         "relayed": {"fed1": "office"}}})
    footer = served_line(reply.served())
    assert footer.startswith("Ran on fed1, reached through office, because it is too big for "
                             "the free memory here"), footer
    assert "reached through" not in served_line({**reply.served(), "relayed": {}})


def test_covey_chat_prints_the_relayed_route(capsys: pytest.CaptureFixture[str]) -> None:
    machines = ["w1 (12 layers)", "home2 (12 layers)"]
    node_chat._served({"covey": {"route": "sharded", "route_reason": "spread over w1, home2",
                                 "machines": machines, "relayed": {machines[1]: "office"}},
                       "usage": {"completion_tokens": 5}})
    assert "[5 tokens via the sharded route on w1 (12 layers), home2 (12 layers) (home2 " \
           "reached through office): spread over w1, home2]" in capsys.readouterr().err
