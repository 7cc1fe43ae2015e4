"""The ledger entries' schemas: what a node publishes reads back the same, the wire format
stays what the last version sends, and values a well-behaved node would not send are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backends.ggml import RPC_PROTOCOL_VERSION
from backends.ggml_rpc_wire import GGML_OP_COUNT
from backends.store.model_store import Manifest
from swarm.ledger.entries import (
    FEDERATED_KEY,
    MAX_SHARED,
    MODELS_KEY,
    NODE_KEY,
    WORKER_KEY,
    WORKER_VALUE_VERSION,
    FederatedEntry,
    ModelsEntry,
    NodeInfo,
    SharedModel,
    WorkerEntry,
    WorkerOffer,
    parse_shared,
)
from swarm.node.model_copy import shared_value
from swarm.routes.federated import FederatedService
from swarm.workers.worker import WorkerService

GiB = 1 << 30
SHA = "c" * 64
INFO = NodeInfo(name="desk", os="Linux 6.1", covey_version="0.1.0", rpc_protocol="3.0.0",
                cores=8, ram_total=16 * GiB, ram_free=9 * GiB, roles=("worker", "federated"))
WORKER = WorkerEntry(4 * GiB, 6 * GiB, 8, "3.0.0", "leased", "peer-carol", 4433, "ab" * 32)
FEDERATED = FederatedEntry(("tiny", "gemma-3-1b"), in_flight=2, max_queue=4)
MODELS = ModelsEntry((SharedModel("tiny", 1234, SHA), SharedModel("gemma.q4", 5 * GiB, "d" * 64)))


def over_the_wire(value: dict[str, Any]) -> Any:
    return json.loads(json.dumps(value))


# --- round trips and the wire format ------------------------------------------------------------


@pytest.mark.parametrize("entry", [INFO, WORKER, WorkerEntry(1, 2, 3, "3.0.0", "idle"),
                                   FEDERATED, FederatedEntry((), 0, 0), MODELS, ModelsEntry(())])
def test_every_entry_reads_back_what_it_published(entry: Any) -> None:
    assert type(entry).from_value(over_the_wire(entry.to_value())) == entry


def test_the_wire_format_is_the_one_the_last_version_sends() -> None:
    assert (NODE_KEY, WORKER_KEY, FEDERATED_KEY, MODELS_KEY) == (
        "node", "worker", "federated", "models")
    assert INFO.to_value() == {
        "name": "desk", "os": "Linux 6.1", "covey_version": "0.1.0", "rpc_protocol": "3.0.0",
        "cores": 8, "ram_total": 16 * GiB, "ram_free": 9 * GiB, "roles": ["worker", "federated"],
        "version": 1}
    assert WORKER.to_value() == {
        "version": 1, "donated_bytes": 4 * GiB, "free_bytes": 6 * GiB, "cores": 8,
        "rpc_protocol": "3.0.0", "state": "leased", "leased_by": "peer-carol",
        "direct": {"port": 4433, "cert_sha256": "ab" * 32}}
    # No direct path: no "direct" key at all, and an idle worker still says leased_by null.
    assert WorkerEntry(1, 2, 3, "3.0.0", "idle").to_value() == {
        "version": 1, "donated_bytes": 1, "free_bytes": 2, "cores": 3, "rpc_protocol": "3.0.0",
        "state": "idle", "leased_by": None}
    assert FEDERATED.to_value() == {"version": 1, "models": ["tiny", "gemma-3-1b"],
                                    "in_flight": 2, "max_queue": 4}
    assert MODELS.to_value() == {"version": 1, "models": [
        {"name": "tiny", "size": 1234, "sha256": SHA},
        {"name": "gemma.q4", "size": 5 * GiB, "sha256": "d" * 64}]}


def test_what_the_services_publish_reads_back(tmp_path: Path) -> None:
    worker = WorkerService(tmp_path, lambda: None, lambda peer: None)
    assert WorkerEntry.from_value(worker.ledger_value(5 * GiB, 4)) == WorkerEntry(
        0, 5 * GiB, 4, RPC_PROTOCOL_VERSION, "idle", ggml_op_count=GGML_OP_COUNT)
    local: Any = SimpleNamespace(gate=SimpleNamespace(max_waiting=4))
    federated = FederatedService(local, lambda: None)
    federated.models, federated.in_flight = ["tiny"], 3
    assert FederatedEntry.from_value(federated.ledger_value()) == FederatedEntry(("tiny",), 3, 4)
    manifests = [Manifest.new(f"m{i}", 10, SHA, "import") for i in range(MAX_SHARED + 5)]
    assert len(parse_shared(shared_value(manifests))) == MAX_SHARED


def test_an_offer_is_its_entry_with_who_published_it() -> None:
    offer = WorkerOffer.from_ledger("peer-desk", "desk", over_the_wire(WORKER.to_value()))
    assert offer == WorkerOffer.of(WORKER, "peer-desk", "desk")
    assert (offer.peer_id, offer.name, offer.donated_bytes, offer.direct_port) == (
        "peer-desk", "desk", 4 * GiB, 4433)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"version": 2}, {"version": True}, {"version": None},
    {"name": 7}, {"name": "x" * 65}, {"os": ["Linux"]}, {"covey_version": "1" * 33},
    {"rpc_protocol": None}, {"cores": -1}, {"cores": True}, {"ram_total": 1.5},
    {"ram_free": "1"}, {"roles": ["worker"] * 9}, {"roles": ["w" * 33]}, {"roles": [None]},
    {"roles": [{"role": "worker"}]}, {"roles": ("worker",)},
])
def test_node_info_refuses_what_no_node_sends(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NodeInfo.from_value({**INFO.to_value(), **changes})


def test_the_ggml_op_count_is_optional_on_the_wire() -> None:
    counted = WorkerEntry(1, 2, 3, "7.0.0", "idle", ggml_op_count=101)
    assert counted.to_value()["ggml_op_count"] == 101
    assert WorkerEntry.from_value(over_the_wire(counted.to_value())) == counted
    # A worker of the previous version says nothing: unknown, not refused.
    older = over_the_wire(WorkerEntry(1, 2, 3, "7.0.0", "idle").to_value())
    assert "ggml_op_count" not in older
    assert WorkerEntry.from_value(older).ggml_op_count is None


def test_the_models_a_worker_caches_are_optional_on_the_wire() -> None:
    caching = WorkerEntry(1, 2, 3, "7.0.0", "idle", cached=(SHA,))
    assert caching.to_value()["cached"] == [SHA]
    assert WorkerEntry.from_value(over_the_wire(caching.to_value())) == caching
    assert "cached" not in WorkerEntry(1, 2, 3, "7.0.0", "idle").to_value()
    # A malformed list costs only the preference, not the worker.
    for bad in ([SHA.upper()], "x", [SHA] * 17, [None]):
        entry = WorkerEntry.from_value({**caching.to_value(), "cached": bad})
        assert entry == WorkerEntry(1, 2, 3, "7.0.0", "idle")


@pytest.mark.parametrize("changes", [
    {"version": 2}, {"version": False}, {"leased_by": "p" * 129}, {"rpc_protocol": None},
    {"free_bytes": None}, {"cores": 2**0.5}, {"ggml_op_count": None},
    {"ggml_op_count": True}, {"ggml_op_count": -1}, {"ggml_op_count": "101"},
])
def test_worker_entry_refuses_what_no_worker_sends(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        WorkerEntry.from_value({**WORKER.to_value(), **changes})


@pytest.mark.parametrize("changes", [
    {"version": 2}, {"version": "1"}, {"models": "tiny"}, {"models": ["tiny", 3]},
    {"models": ["m" * 129]}, {"models": [""]}, {"models": ["m"] * (MAX_SHARED + 1)},
    {"in_flight": -1}, {"in_flight": True}, {"in_flight": None}, {"max_queue": "4"},
])
def test_federated_entry_refuses_what_no_node_sends(changes: dict[str, Any]) -> None:
    value = {**FEDERATED.to_value(), **changes}
    if changes == {"in_flight": None}:
        del value["in_flight"]
    with pytest.raises(ValueError):
        FederatedEntry.from_value(value)


@pytest.mark.parametrize("models", [
    None, "tiny", [{"name": "Tiny", "size": 1, "sha256": SHA}],
    [{"name": "x" * 129, "size": 1, "sha256": SHA}], [{"name": "x", "size": 0, "sha256": SHA}],
    [{"name": "x", "size": 1.0, "sha256": SHA}], [{"name": "x", "size": 1, "sha256": SHA[:-1]}],
    [{"name": "x", "size": 1, "sha256": None}], [["x", 1, SHA]],
    [{"name": "x", "size": 1, "sha256": SHA}] * (MAX_SHARED + 1),
])
def test_models_entry_refuses_what_no_node_sends(models: Any) -> None:
    with pytest.raises(ValueError):
        ModelsEntry.from_value({"version": 1, "models": models})
    assert parse_shared({"version": 1, "models": models}) == []


@pytest.mark.parametrize("kind", [NodeInfo, WorkerEntry, FederatedEntry, ModelsEntry])
@pytest.mark.parametrize("value", [None, [], "node", 1, {}])
def test_a_value_that_is_no_entry_is_refused(kind: Any, value: Any) -> None:
    with pytest.raises(ValueError):
        kind.from_value(value)


def test_reading_the_ledger_for_the_api_does_not_load_libp2p() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, swarm.ledger.peer_view; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] == 'libp2p'))"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]).stdout.strip()
    assert loaded == "[]"


# --- the worker entry as placement reads it (moved from test_placement.py) ------------------------


def ledger_value(**changes: object) -> dict[str, object]:
    value: dict[str, object] = {
        "version": WORKER_VALUE_VERSION, "donated_bytes": 4 * GiB, "free_bytes": 6 * GiB,
        "cores": 8, "rpc_protocol": "7.0.0", "state": "idle", "leased_by": None,
        "endpoint": "/ip4/127.0.0.1/tcp/4001",
    }
    value.update(changes)
    return value


def test_from_ledger_reads_a_well_formed_value() -> None:
    assert WORKER_KEY == "worker"
    w = WorkerOffer.from_ledger("peer-desk", "desk", ledger_value())
    assert w == WorkerOffer(4 * GiB, 6 * GiB, 8, "7.0.0", "idle", None,
                            peer_id="peer-desk", name="desk")
    leased = ledger_value(state="leased", leased_by="peer-carol")
    w = WorkerOffer.from_ledger("peer-desk", "desk", leased)
    assert w is not None and w.state == "leased" and w.leased_by == "peer-carol"
    no_endpoint = ledger_value()
    del no_endpoint["endpoint"]
    assert WorkerOffer.from_ledger("peer-desk", "desk", no_endpoint) is not None


@pytest.mark.parametrize("changes", [
    {"donated_bytes": True},
    {"cores": False},
    {"free_bytes": True},
    {"donated_bytes": -1},
    {"free_bytes": -5},
    {"cores": -2},
    {"donated_bytes": 1.5},
    {"donated_bytes": "4096"},
    {"version": 2},
    {"version": True},
    {"version": "1"},
    {"rpc_protocol": 7},
    {"rpc_protocol": ""},
    {"rpc_protocol": "7" * 500},
    {"state": "busy"},
    {"state": None},
    {"state": "leased", "leased_by": None},
    {"state": "leased", "leased_by": 42},
    {"state": "idle", "leased_by": "peer-carol"},
])
def test_from_ledger_rejects_malformed_values(changes: dict[str, object]) -> None:
    assert WorkerOffer.from_ledger("peer-desk", "desk", ledger_value(**changes)) is None


@pytest.mark.parametrize("key", ["version", "donated_bytes", "free_bytes", "cores",
                                 "rpc_protocol", "state", "leased_by"])
def test_from_ledger_rejects_missing_keys(key: str) -> None:
    value = ledger_value()
    del value[key]
    assert WorkerOffer.from_ledger("peer-desk", "desk", value) is None


def test_direct_offer_is_read_when_well_formed_and_ignored_otherwise() -> None:
    base = {"version": 1, "donated_bytes": 1 << 30, "free_bytes": 2 << 30, "cores": 4,
            "rpc_protocol": "3.0.0", "state": "idle", "leased_by": None}
    good = WorkerOffer.from_ledger("p", "w", {**base, "direct": {"port": 4433,
                                                                 "cert_sha256": "ab" * 32}})
    assert good is not None and (good.direct_port, good.direct_sha256) == (4433, "ab" * 32)
    for bad in ({"port": 0, "cert_sha256": "ab" * 32}, {"port": True, "cert_sha256": "ab" * 32},
                {"port": 4433, "cert_sha256": "AB" * 32}, {"port": 4433, "cert_sha256": "ab"},
                {"port": "4433", "cert_sha256": "ab" * 32}, "4433", None):
        offer = WorkerOffer.from_ledger("p", "w", {**base, "direct": bad})
        assert offer is not None and offer.direct_port is None and offer.direct_sha256 is None
