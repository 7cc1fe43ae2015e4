"""A newcomer's first sharded chat, with real nodes in a network namespace: a fresh client (an
empty data directory) and one free worker. The client registers the bundled model as it
starts, `/api/status` shows how far it got, and `covey chat --route sharded` works on the very
first request, without anything having used the local route before."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.store.model_store import DEFAULT_MODEL
from swarm.trust.token import new_token
from tests.integration.test_sharded import ShardSwarm
from tests.support.netns import Netns, netns_skip_reason
from tests.support.node_harness import REPO, wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]

BUNDLED_BYTES = 253_113_024


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[ShardSwarm]:
    with Netns() as netns:
        yield ShardSwarm(netns, netns.add("first"), new_token().encode(), tmp_path, {})


def test_a_fresh_client_shards_the_bundled_model_on_its_first_request(
        fresh: ShardSwarm) -> None:
    # The suite names Gemma the default, which leaves registration to first use; a user's
    # node registers its default at start, as --prepare-at-start asks.
    worker = fresh.start("w1", "--worker", "--share-mib", "500", "--prepare-at-start")
    client = fresh.start("client", "--prepare-at-start")
    registering = client.status["default_models"][DEFAULT_MODEL]
    assert registering["state"] in ("registering", "ready"), registering
    assert registering["error"] is None, registering

    def worker_seen() -> bool:
        peers = client.api("/api/peers")["peers"]
        return any(p["name"] == "w1" and p["online"] and p["worker"] for p in peers)

    wait_until(worker_seen, 30, "the worker's offer", [worker, client])
    result = fresh.netns.run(fresh.ns, [
        sys.executable, "-m", "app.cli", "chat", "Once upon a time", "--route", "sharded",
        "--max-tokens", "8", "--json", "--data-dir", str(client.data_dir)],
        cwd=REPO, timeout=180, check=False)
    assert result.returncode == 0, f"{result.stderr}\n{client.log()}"
    reply = json.loads(result.stdout)
    assert reply["covey"]["route"] == "sharded", reply
    assert reply["covey"]["machines"] == ["w1 (18 layers)"], reply
    assert reply["usage"]["completion_tokens"] > 0, reply
    ready = client.api("/api/status")["default_models"][DEFAULT_MODEL]
    assert ready == {"state": "ready", "done_bytes": BUNDLED_BYTES,
                     "total_bytes": BUNDLED_BYTES, "error": None, "version": 1}
    assert ": engine loaded" not in client.log()  # nothing ran on the client's own engine
