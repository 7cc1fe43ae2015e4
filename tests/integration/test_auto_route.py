"""`auto` routing with real nodes in a network namespace: a client that has the model, a free
worker that could hold all of it and a federated node that serves it. The model fits the client,
so `auto` runs it there and says why, in the API reply, `/v1/models` (the app's picker) and the
`covey chat` footer; a node with "send prompts to other machines" off refuses the remote routes
by name of the setting."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm.trust.token import new_token
from tests.integration.test_sharded import ShardSwarm
from tests.support.netns import Netns, netns_skip_reason
from tests.support.node_harness import REPO, RunningNode, wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]


class Swarm(ShardSwarm):
    def cli_chat(self, node: RunningNode, route: str) -> Any:
        return self.netns.run(self.ns, [
            sys.executable, "-m", "app.cli", "chat", "Tell me a story", "--route", route,
            "--model", "tiny", "--max-tokens", "8", "--data-dir", str(node.data_dir)],
            cwd=REPO, timeout=120, check=False)


@pytest.fixture
def swarm(tiny_model: Path, tmp_path: Path) -> Iterator[Swarm]:
    with Netns() as netns:
        swarm = Swarm(netns, netns.add("auto"), new_token().encode(), tmp_path, {})
        swarm.start("w1", "--worker", "--share-mib", "200")
        swarm.start("f1", "--federated", "--model", "tiny", model=tiny_model)
        swarm.start("client", model=tiny_model)
        swarm.start("private", "--no-remote-prompts", model=tiny_model)

        def every_route(node: RunningNode) -> bool:
            models = {m["id"]: m["covey"] for m in node.api("/v1/models")["data"]}
            return models.get("tiny", {}).get("routes") == ["local", "federated", "sharded"]

        nodes = swarm.nodes
        wait_until(lambda: every_route(nodes["client"]) and every_route(nodes["private"]), 30,
                   "the worker and the federated node", list(nodes.values()))
        yield swarm


def test_auto_runs_a_model_that_fits_here_and_says_why(swarm: Swarm) -> None:
    client = swarm.nodes["client"]
    status, reply = swarm.chat(client, "auto")
    assert status == 200, reply
    covey = reply["covey"]
    assert covey["route"] == "local" and covey["machines"] == ["client"], covey
    assert covey["route_reason"].startswith("fits this machine (needs "), covey
    # The picker reads the same decision from /v1/models.
    tiny = next(m for m in client.api("/v1/models")["data"] if m["id"] == "tiny")
    assert tiny["covey"]["auto"]["route"] == "local", tiny
    assert tiny["covey"]["auto"]["reason"].startswith("fits this machine"), tiny
    # Nothing was leased or sent: the worker is idle, the federated node served nothing.
    assert swarm.nodes["w1"].api("/api/status")["worker"]["leased_by"] is None
    assert "engine loaded" not in swarm.nodes["f1"].log()
    # `covey chat` says it under the reply.
    result = swarm.cli_chat(client, "auto")
    assert result.returncode == 0, result.stderr
    assert "via the local route on client: fits this machine (needs " in result.stderr, (
        result.stderr)
    # The remote routes still answer when asked for by name.
    for route in ("federated", "sharded"):
        status, reply = swarm.chat(client, route)
        assert status == 200 and reply["covey"]["route"] == route, reply
        assert reply["covey"]["route_reason"] == f"asked for the {route} route", reply


def test_with_remote_prompts_off_the_remote_routes_are_refused_by_name(swarm: Swarm) -> None:
    private = swarm.nodes["private"]
    for route in ("federated", "sharded"):
        status, reply = swarm.chat(private, route)
        assert status == 403, reply
        error = reply["error"]
        assert error["code"] == "route_forbidden" and error["param"] == "covey_route", error
        assert f"the {route} route sends prompts to other machines" in error["message"], error
        assert "remote_prompts is off" in error["message"], error
    result = swarm.cli_chat(private, "federated")
    assert result.returncode == 1, result
    assert "covey: error: Covey node answered 403: the federated route sends prompts" in (
        result.stderr)
    assert "`covey node --remote-prompts` turns it on" in result.stderr
    status, reply = swarm.chat(private, "auto")
    assert status == 200 and reply["covey"]["route"] == "local", reply
    # Its own setting is remembered for the next start.
    saved = json.loads((private.data_dir / "swarm.json").read_text())
    assert saved["remote_prompts"] is False
