"""The node's /api handlers, driven in process: a Node that is built but not run (no sockets),
and requests handed to the handlers its local API registered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from swarm.api.openapi import openapi_document
from swarm.api.server import HttpError, Request
from swarm.node.daemon import Node, NodeConfig
from swarm.trust.token import new_token


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(NodeConfig(data_dir=tmp_path, token=new_token(), name="study-mac",
                           roles=("client",)))


def call(node: Node, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """The handler's JSON answer; HttpError as the handler raised it."""
    raw = b"" if body is None else json.dumps(body).encode()
    handler = node.api.routes[path][method]

    async def run() -> Any:
        return await handler(Request(method, path, {}, {}, raw))

    response = trio.run(run)
    assert response.status == 200
    return json.loads(response.body)


def refused(node: Node, path: str, body: Any) -> HttpError:
    with pytest.raises(HttpError) as caught:
        call(node, "POST", path, body)
    return caught.value


def test_rename_and_new_roles_apply_together(node: Node) -> None:
    status = call(node, "POST", "/api/node", {"name": "  den-pc ", "roles": ["worker"] * 2})
    assert (status["name"], status["roles"]) == ("den-pc", ["worker"])
    assert node.local_route.machine == "den-pc"  # replies name the machine by its new name


@pytest.mark.parametrize(("body", "field"), [
    ({"roles": [{}]}, "roles"),  # answered 500 once, after renaming
    ({"name": "den-pc", "roles": [{}]}, "roles"),
    ({"name": "den-pc", "roles": ["admin"]}, "roles"),
    ({"name": "den-pc", "roles": "worker"}, "roles"),
    ({"name": "   ", "roles": ["worker"]}, "name"),
    ({"name": "x" * 65, "roles": ["worker"]}, "name"),
    ({"name": None}, "name"),
    ({"name": "den-pc", "colour": "red"}, "colour"),
])
def test_a_bad_update_is_400_naming_the_field_and_changes_nothing(
        node: Node, body: dict[str, Any], field: str) -> None:
    error = refused(node, "/api/node", body)
    assert (error.status, error.param) == (400, field)
    assert field in error.message
    status = call(node, "GET", "/api/status")
    assert (status["name"], status["roles"]) == ("study-mac", ["client"])
    assert node.local_route.machine == "study-mac"


def test_worker_switch_is_checked_whole_before_anything_happens(node: Node) -> None:
    accepting = node.worker.desk.accepting
    for body, field in (({"enabled": True, "share_mib": "lots"}, "share_mib"),
                        ({"enabled": False, "share_percent": "half"}, "share_percent"),
                        ({"enabled": "on"}, "enabled"),
                        ({"share_mib": 512}, "enabled"),
                        ({"enabled": True, "share_gib": 1}, "share_gib")):
        error = refused(node, "/api/worker", body)
        assert (error.status, error.param) == (400, field), body
    assert node.worker.desk.accepting == accepting and not node.worker.enabled


def test_federated_switch(node: Node) -> None:
    error = refused(node, "/api/federated", {"enabled": True, "model": 5})
    assert (error.status, error.param) == (400, "model")
    # Fields it does not know are ignored here; a model the store lacks is a 404.
    error = refused(node, "/api/federated", {"enabled": True, "model": "nope", "why": "x"})
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    assert node.federated.models == []


def test_copy_request(node: Node) -> None:
    error = refused(node, "/api/models/copy", {"model": "tiny", "cancel": "yes"})
    assert (error.status, error.param) == (400, "cancel")
    error = refused(node, "/api/models/copy", {"model": "tiny", "cancel": True})
    assert (error.status, error.param) == (404, "model")
    assert node.copier.jobs == {}


def test_status_is_what_the_openapi_document_says(node: Node) -> None:
    schemas = openapi_document()["components"]["schemas"]
    status = call(node, "GET", "/api/status")
    node_status = schemas["NodeStatus"]
    assert set(status) == set(node_status["properties"]) == set(node_status["required"])
    worker = node_status["properties"]["worker"]
    assert set(status["worker"]) == set(worker["properties"]) == set(worker["required"])
    traffic = status["worker"]["rpc_traffic"]
    assert set(traffic["tunnel"]) == set(schemas["LinkCounters"]["properties"])
    assert traffic["direct"] is None  # worker mode is off: there is no direct path
    assert status["sharded_links"] == {}
    # No copy yet, and no direct copy path until a peer asks for one.
    assert (status["copies"], status["copy_direct"]) == ([], None)


def test_status_shows_the_tunnel_counters(node: Node) -> None:
    node.tunnels.stats.refused = 2
    node.tunnels.stats.bytes_up = 4096
    tunnel = call(node, "GET", "/api/status")["worker"]["rpc_traffic"]["tunnel"]
    assert (tunnel["refused"], tunnel["bytes_up"], tunnel["failed"]) == (2, 4096, 0)
