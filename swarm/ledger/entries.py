"""The schemas of every ledger entry a node publishes, one frozen dataclass per key.

"node" (NodeInfo), "worker" (WorkerEntry; WorkerOffer adds who published it), "federated"
(FederatedEntry), "models" (ModelsEntry) and "reach" (ReachEntry). `to_value()` gives the
JSON value a node publishes; `from_value()` reads a peer's, which arrives from the network,
so it checks every field's type and size and raises ValueError for anything a well-behaved
node would not send.
Keys a value does not name are ignored, so a later version may add some. Pure: no I/O.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from backends.store.model_store import check_name

log = logging.getLogger(__name__)

NODE_KEY = "node"
WORKER_KEY = "worker"
FEDERATED_KEY = "federated"
MODELS_KEY = "models"
REACH_KEY = "reach"

INFO_VERSION = 1
WORKER_VALUE_VERSION = 1
FEDERATED_VERSION = 1
MODELS_VERSION = 1
REACH_VERSION = 1

ROLES = ("client", "worker", "federated")
WORKER_STATES = ("idle", "leased")
MAX_NAME_CHARS = 64
MAX_ROLES = 8
MAX_SHORT_CHARS = 32  # versions and role names
MAX_TEXT_CHARS = 128  # protocol versions, peer ids, model names
MAX_SHARED = 200  # keeps a "models" entry well under the ledger's value limit
MAX_CACHED = 16  # models a worker says its tensor cache holds
MAX_ADDRS = 8
MAX_ADDR_CHARS = 256
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

E = TypeVar("E")


def read(parse: Callable[[Any], E], value: Any) -> E | None:
    """`parse(value)` (an entry's from_value), or None for a value it refuses."""
    try:
        return parse(value)
    except ValueError as exc:
        log.debug("ignoring a ledger value: %s", exc)
        return None


# -- checks shared by every entry ---------------------------------------------------------------

def _fields(value: Any, version: int, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"a {what} value must be an object")
    got = value.get("version")
    # bool is an int subclass: True must not pass for version 1
    if isinstance(got, bool) or got != version:
        raise ValueError(f"{what} version {got!r} is not {version}")
    return value


def _text(value: dict[str, Any], name: str, limit: int, *, empty: bool = False) -> str:
    return _checked_text(value.get(name), name, limit, empty=empty)


def _checked_text(v: Any, what: str, limit: int, *, empty: bool = False) -> str:
    if not isinstance(v, str) or len(v) > limit or (not v and not empty):
        raise ValueError(f"{what} must be text of {0 if empty else 1} to {limit} characters")
    return v


def _count(value: dict[str, Any], name: str) -> int:
    v = value.get(name)
    # bool is an int subclass: True must not pass for 1 byte or 1 core
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer")
    return v


def _list(value: dict[str, Any], name: str, limit: int) -> list[Any]:
    v = value.get(name)
    if not isinstance(v, list) or len(v) > limit:
        raise ValueError(f"{name} must be a list of at most {limit} items")
    return v


# -- "node" -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeInfo:
    """What each node publishes about itself: shown in `covey peers` and the GUI."""

    name: str
    os: str
    covey_version: str
    rpc_protocol: str
    cores: int
    ram_total: int
    ram_free: int
    roles: tuple[str, ...]
    version: int = INFO_VERSION

    def to_value(self) -> dict[str, Any]:
        return {"name": self.name, "os": self.os, "covey_version": self.covey_version,
                "rpc_protocol": self.rpc_protocol, "cores": self.cores,
                "ram_total": self.ram_total, "ram_free": self.ram_free,
                "roles": list(self.roles), "version": self.version}

    @classmethod
    def from_value(cls, value: Any) -> NodeInfo:
        value = _fields(value, INFO_VERSION, "node info")
        # Role names outside ROLES pass: a later version may add one.
        roles = tuple(_checked_text(r, "a role", MAX_SHORT_CHARS)
                      for r in _list(value, "roles", MAX_ROLES))
        return cls(
            name=_text(value, "name", MAX_NAME_CHARS, empty=True),
            os=_text(value, "os", MAX_NAME_CHARS, empty=True),
            covey_version=_text(value, "covey_version", MAX_SHORT_CHARS, empty=True),
            rpc_protocol=_text(value, "rpc_protocol", MAX_SHORT_CHARS, empty=True),
            cores=_count(value, "cores"),
            ram_total=_count(value, "ram_total"),
            ram_free=_count(value, "ram_free"),
            roles=roles,
        )


# -- "worker" -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerEntry:
    """What a worker publishes: memory it donates and whether someone holds its lease."""

    donated_bytes: int
    free_bytes: int
    cores: int
    rpc_protocol: str
    state: str
    leased_by: str | None = None
    # The direct TLS fast path (swarm/workers/direct_tls.py): its port on the worker's address,
    # and the SHA-256 of the certificate the client pins. None when the worker offers none.
    direct_port: int | None = None
    direct_sha256: str | None = None
    # GGML_OP_COUNT of the worker's libggml: a graph's op numbers mean the same ops on both
    # ends only when the counts agree. None: an older worker that does not say (unknown).
    ggml_op_count: int | None = None
    # Fair hand-over (swarm/workers/lease.py): how many other members wait for the lease, and
    # within how many seconds of publishing the holder must have handed it over (None: nobody
    # waits, or an older worker that does not say).
    waiting: int = 0
    free_within_s: int | None = None
    # SHA-256s of the models whose large tensors the worker's tensor cache holds, so a load
    # there sends hashes instead of weights: placement prefers it over an equal worker.
    cached: tuple[str, ...] = ()
    version: int = WORKER_VALUE_VERSION

    def to_value(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "version": self.version, "donated_bytes": self.donated_bytes,
            "free_bytes": self.free_bytes, "cores": self.cores,
            "rpc_protocol": self.rpc_protocol, "state": self.state, "leased_by": self.leased_by}
        if self.direct_port is not None:
            value["direct"] = {"port": self.direct_port, "cert_sha256": self.direct_sha256}
        if self.ggml_op_count is not None:  # absent, not null: older readers never see it
            value["ggml_op_count"] = self.ggml_op_count
        if self.waiting and self.free_within_s is not None:  # absent too while nobody waits
            value["handover"] = {"waiting": self.waiting, "free_within_s": self.free_within_s}
        if self.cached:  # absent while empty, as older workers publish
            value["cached"] = list(self.cached)
        return value

    @classmethod
    def from_value(cls, value: Any) -> WorkerEntry:
        value = _fields(value, WORKER_VALUE_VERSION, "worker")
        state, leased_by = value.get("state"), value.get("leased_by")
        if state not in WORKER_STATES or "leased_by" not in value:
            raise ValueError(f"state must be one of {WORKER_STATES}, with leased_by")
        # A lease always names its holder, and an idle worker has none.
        if (state == "leased") != (leased_by is not None):
            raise ValueError("leased_by must name the holder exactly when leased")
        if leased_by is not None:
            _text(value, "leased_by", MAX_TEXT_CHARS)
        port, sha256 = _direct(value.get("direct"))
        waiting, free_within_s = _handover(value.get("handover"))
        return cls(
            donated_bytes=_count(value, "donated_bytes"),
            free_bytes=_count(value, "free_bytes"),
            cores=_count(value, "cores"),
            rpc_protocol=_text(value, "rpc_protocol", MAX_TEXT_CHARS),
            state=state,
            leased_by=leased_by,
            direct_port=port,
            direct_sha256=sha256,
            ggml_op_count=_count(value, "ggml_op_count") if "ggml_op_count" in value else None,
            waiting=waiting,
            free_within_s=free_within_s,
            cached=_cached(value.get("cached")),
        )


def _direct(value: Any) -> tuple[int | None, str | None]:
    """(port, certificate sha256) of a well-formed direct offer; (None, None) otherwise.

    Unlike the rest of an entry, a bad direct offer is dropped rather than refused: the worker
    is still usable through the libp2p tunnel."""
    if not isinstance(value, dict):
        return None, None
    port, sha256 = value.get("port"), value.get("cert_sha256")
    if (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
            or not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256)):
        return None, None
    return port, sha256


def _cached(value: Any) -> tuple[str, ...]:
    """The model SHA-256s of a well-formed cache list; none otherwise (dropped like a bad
    direct offer: the worker is still usable, only without the preference)."""
    if (not isinstance(value, list) or len(value) > MAX_CACHED
            or not all(isinstance(v, str) and _SHA256_RE.fullmatch(v) for v in value)):
        return ()
    return tuple(value)


def _handover(value: Any) -> tuple[int, int | None]:
    """(members waiting, seconds until free) of a well-formed hand-over; (0, None) otherwise:
    like a bad direct offer, it is dropped rather than the entry refused."""
    if not isinstance(value, dict):
        return 0, None
    try:
        return _count(value, "waiting"), _count(value, "free_within_s")
    except ValueError:
        return 0, None


@dataclass(frozen=True)
class WorkerOffer(WorkerEntry):
    """A peer's worker entry together with who published it: what placement plans over."""

    peer_id: str = field(kw_only=True)
    name: str = field(kw_only=True)

    @classmethod
    def of(cls, entry: WorkerEntry, peer_id: str, name: str) -> WorkerOffer:
        return cls(**{f.name: getattr(entry, f.name) for f in fields(WorkerEntry)},
                   peer_id=peer_id, name=name)

    @classmethod
    def from_ledger(cls, owner: str, name: str, value: Any) -> WorkerOffer | None:
        """The offer in `owner`'s "worker" value, or None when the value is refused."""
        entry = read(WorkerEntry.from_value, value)
        return None if entry is None else cls.of(entry, owner, name)


# -- "federated" --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FederatedEntry:
    """What a federated node publishes: the models it serves and how busy it is."""

    models: tuple[str, ...]
    in_flight: int
    max_queue: int
    version: int = FEDERATED_VERSION

    def to_value(self) -> dict[str, Any]:
        return {"version": self.version, "models": list(self.models),
                "in_flight": self.in_flight, "max_queue": self.max_queue}

    @classmethod
    def from_value(cls, value: Any) -> FederatedEntry:
        value = _fields(value, FEDERATED_VERSION, "federated")
        models = tuple(_checked_text(m, "a model", MAX_TEXT_CHARS)
                       for m in _list(value, "models", MAX_SHARED))
        return cls(models, _count(value, "in_flight"), _count(value, "max_queue"))


# -- "models" -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SharedModel:
    """One file a peer offers: copies with the same sha256 are the same file."""

    name: str
    size: int
    sha256: str

    @classmethod
    def from_value(cls, value: Any) -> SharedModel:
        if not isinstance(value, dict):
            raise ValueError("a shared model must be an object")
        name, size, sha256 = value.get("name"), value.get("size"), value.get("sha256")
        if not isinstance(name, str) or not _valid_name(name):
            raise ValueError(f"{name!r} is not a model name")
        if type(size) is not int or size <= 0:
            raise ValueError("size must be a positive integer")
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return cls(name, size, sha256)


def _valid_name(name: str) -> bool:
    try:
        check_name(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ModelsEntry:
    """What every node publishes: the models in its store that others may copy."""

    models: tuple[SharedModel, ...]
    version: int = MODELS_VERSION

    def to_value(self) -> dict[str, Any]:
        return {"version": self.version,
                "models": [{"name": m.name, "size": m.size, "sha256": m.sha256}
                           for m in self.models]}

    @classmethod
    def from_value(cls, value: Any) -> ModelsEntry:
        value = _fields(value, MODELS_VERSION, "models")
        return cls(tuple(SharedModel.from_value(m) for m in _list(value, "models", MAX_SHARED)))


def parse_shared(value: Any) -> list[SharedModel]:
    """The models a peer's "models" value offers; none when the value is refused."""
    entry = read(ModelsEntry.from_value, value)
    return [] if entry is None else list(entry.models)


# -- "reach" ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReachEntry:
    """How to reach a node: its direct addresses, the relay circuits it holds a slot on
    (`…/p2p/RELAY/p2p-circuit`), and whether it relays for the swarm itself. `upnp`: those of
    its addresses its router maps by UPnP (also in `addrs`; optional, for older nodes)."""

    addrs: tuple[str, ...]
    circuits: tuple[str, ...]
    relay: bool
    upnp: tuple[str, ...] = ()
    version: int = REACH_VERSION

    def to_value(self) -> dict[str, Any]:
        value = {"version": self.version, "addrs": list(self.addrs),
                 "circuits": list(self.circuits), "relay": self.relay}
        return value | {"upnp": list(self.upnp)} if self.upnp else value

    @classmethod
    def from_value(cls, value: Any) -> ReachEntry:
        value = _fields(value, REACH_VERSION, "reach")
        relay = value.get("relay")
        if not isinstance(relay, bool):
            raise ValueError("relay must be true or false")
        value = {"upnp": [], **value}  # an older node's entry has none
        addrs, circuits, upnp = (tuple(_checked_text(a, "an address", MAX_ADDR_CHARS)
                                       for a in _list(value, name, MAX_ADDRS))
                                 for name in ("addrs", "circuits", "upnp"))
        return cls(addrs, circuits, relay, upnp)
