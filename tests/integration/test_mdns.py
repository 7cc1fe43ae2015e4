"""LAN discovery: the pure TXT/type/interface helpers, then real zeroconf nodes in throwaway
network namespaces (never on this machine's own interfaces), one subprocess per node."""

from __future__ import annotations

import json
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from zeroconf import BadTypeInNameException
from zeroconf._utils.name import service_type_name

from swarm.net.mdns import (
    MAX_PAYLOAD_BYTES,
    MdnsService,
    decode_txt,
    encode_txt,
    expand_listen_ip,
    ifindex_filter,
    mdns_interfaces_for,
    service_type_from_tag,
    split_txt,
)
from tests.support.netns import Netns, netns_skip_reason

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
SWARM = service_type_from_tag(b"swarm-one")
OTHER_SWARM = service_type_from_tag(b"swarm-two")
FOUND_WITHIN_S = 3.0
# How long a negative check listens after the positive ones have passed.
QUIET_S = 1.5

# A node: advertises argv payload, prints JSON lines (started / found / closed); stdin lines
# "update <hex>" re-announce, EOF closes.
NODE_SCRIPT = """
import time
t_proc = time.monotonic()
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
logging.getLogger("swarm.net.mdns").setLevel(sys.argv[5])
from swarm.net.mdns import MdnsService

def emit(**kw):
    print(json.dumps({**kw, "t": time.monotonic()}), flush=True)

stype, name, payload, ips = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4]
svc = MdnsService(stype, name, payload, ips.split(","), 4242,
                  lambda p: emit(event="found", payload=p.hex()))
t_start = time.monotonic()
ok = svc.start()
emit(event="started", ok=ok, t_proc=t_proc, t_start=t_start)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "update":
        svc.update(bytes.fromhex(arg))
        emit(event="updated")
svc.close()
emit(event="closed")
"""

# Raw zeroconf advertising instances with hand-made TXT rdata (argv: type, ip, name=hex ...).
RAW_SCRIPT = """
import json, sys
from zeroconf import IPVersion, ServiceInfo, Zeroconf
stype, ip = sys.argv[1], sys.argv[2]
zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
for spec in sys.argv[3:]:
    name, text = spec.split("=")
    info = ServiceInfo(stype, f"{name}.{stype}", port=1, properties=bytes.fromhex(text),
                       server=f"{name}.local.", parsed_addresses=[ip])
    zc.register_service(info, cooperating_responders=True)
print(json.dumps({"event": "started"}), flush=True)
sys.stdin.read()
zc.close()
"""


# --- pure helpers -------------------------------------------------------------------------


@pytest.mark.parametrize("tag", [b"", b"\x00", bytes(8), os.urandom(8), os.urandom(300)])
def test_service_type_from_tag_is_a_valid_short_type(tag: bytes) -> None:
    stype = service_type_from_tag(tag)
    assert service_type_name(stype, strict=True) == stype
    assert stype.endswith("._tcp.local.")
    assert len(stype.split(".")[0]) - 1 <= 15  # RFC 6763: service name at most 15 chars
    assert service_type_from_tag(tag) == stype


def test_service_type_differs_per_tag_and_hides_it() -> None:
    tag = bytes.fromhex("c3f9a1b2c4d5e6f7")
    assert service_type_from_tag(tag) != service_type_from_tag(tag[:-1] + b"\xf6")
    assert "c3f9" not in service_type_from_tag(tag)


@pytest.mark.parametrize("size", [0, 1, 251, 252, 253, 400, 504, 505, MAX_PAYLOAD_BYTES])
def test_txt_round_trip(size: int) -> None:
    payload = os.urandom(size)
    text = encode_txt(payload)
    strings = split_txt(text)
    assert strings is not None
    assert all(len(s) <= 255 for s in strings)
    assert decode_txt(text) == payload


def test_txt_survives_zeroconf_property_order_and_unknown_keys() -> None:
    payload = os.urandom(400)
    strings = split_txt(encode_txt(payload))
    assert strings is not None
    shuffled = [strings[2], b"future=1", strings[0], b"flag", strings[1]]
    assert decode_txt(b"".join(bytes((len(s),)) + s for s in shuffled)) == payload


def test_encode_txt_refuses_oversized_payload() -> None:
    with pytest.raises(ValueError):
        encode_txt(bytes(MAX_PAYLOAD_BYTES + 1))


def _txt(*strings: bytes) -> bytes:
    return b"".join(bytes((len(s),)) + s for s in strings)


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"\xff\x01",  # length runs past the end
        _txt(b"p0=abc"),  # no version
        _txt(b"cv=2", b"p0=abc"),  # another version
        _txt(b"cv=1", b"p1=abc"),  # missing p0
        _txt(b"cv=1", b"p0=a", b"p0=b"),  # duplicate chunk
        _txt(b"cv=1", *(b"p%d=" % i + bytes(252) for i in range(5))),  # 1260 bytes
        _txt(b"cv=1", b"p0=a", b"p7=b"),  # gap, and beyond the chunk limit
    ],
)
def test_decode_txt_rejects_malformed(text: bytes) -> None:
    assert decode_txt(text) is None


def test_decode_txt_ignores_unrelated_keys() -> None:
    assert decode_txt(_txt(b"cv=1", b"px=zz", b"p0=ok", b"p=", b"q0=no")) == b"ok"


def test_mdns_interfaces_for() -> None:
    host = ["192.168.1.5", "10.0.0.7"]
    assert mdns_interfaces_for(["127.0.0.1"], host) == ["127.0.0.1"]
    assert mdns_interfaces_for(["192.168.1.5"], host) == ["192.168.1.5"]
    assert mdns_interfaces_for(["0.0.0.0"], host) == host
    assert mdns_interfaces_for(["0.0.0.0", "127.0.0.1", "10.0.0.7"], host) == [*host, "127.0.0.1"]
    assert mdns_interfaces_for(["::1", "fe80::1"], host) == []
    assert mdns_interfaces_for(["::"], host) == host


def test_expand_listen_ip_never_gives_a_wildcard() -> None:
    assert expand_listen_ip("0.0.0.0", ["192.168.1.5"]) == ["192.168.1.5"]
    assert expand_listen_ip("0.0.0.0", []) == ["127.0.0.1"]  # offline host: local nodes only
    assert expand_listen_ip("10.1.2.3", ["192.168.1.5"]) == ["10.1.2.3"]
    assert "0.0.0.0" not in expand_listen_ip("0.0.0.0")


def test_ifindex_filter_layout() -> None:
    program = ifindex_filter([1, 7])
    insns = [struct.unpack("HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    assert insns[1] == (0x15, 2, 0, 1) and insns[2] == (0x15, 1, 0, 7)  # both jump to accept
    assert insns[-2] == (0x06, 0, 0, 0) and insns[-1] == (0x06, 0, 0, 0xFFFFFFFF)


@pytest.mark.parametrize(
    ("stype", "name", "payload", "ips"),
    [
        ("_toolongservicename._tcp.local.", "n", b"", ["127.0.0.1"]),
        (SWARM, "x" * 64, b"", ["127.0.0.1"]),
        (SWARM, "n", bytes(MAX_PAYLOAD_BYTES + 1), ["127.0.0.1"]),
        (SWARM, "n", b"", ["0.0.0.0"]),
        (SWARM, "n", b"", ["::1"]),
    ],
)
def test_service_rejects_bad_arguments(
    stype: str, name: str, payload: bytes, ips: list[str]
) -> None:
    with pytest.raises((ValueError, BadTypeInNameException)):
        MdnsService(stype, name, payload, ips, 1, lambda _: None)


def test_service_without_interfaces_does_not_start(caplog: pytest.LogCaptureFixture) -> None:
    svc = MdnsService(SWARM, "n", b"", [], 1, lambda _: None)
    with caplog.at_level("WARNING", logger="swarm.net.mdns"):
        assert svc.start() is False
    assert "LAN discovery off" in caplog.text
    svc.close()


# --- real nodes in network namespaces -----------------------------------------------------


@pytest.fixture
def net() -> Iterator[Netns]:
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    with Netns() as n:
        yield n
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert n.prefix not in leftover


class Node:
    """One subprocess in a namespace; its JSON lines are collected by a reader thread."""

    def __init__(self, net: Netns, ns: str, argv: list[str]) -> None:
        self.proc = net.popen(
            ns,
            [sys.executable, *argv],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_events, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def _read_stderr(self) -> None:
        # Drained continuously so a chatty child never blocks on a full pipe.
        assert self.proc.stderr is not None
        self._stderr.extend(self.proc.stderr)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        for event in self.seen:
            if pred(event):
                return event
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(event)
            if pred(event):
                return event
        raise AssertionError(f"no matching event in {timeout} s; saw {self.seen}")

    def drain(self) -> list[dict[str, Any]]:
        while True:
            try:
                self.seen.append(self.events.get_nowait())
            except queue.Empty:
                return self.seen

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def stop(self) -> str:
        """Close stdin (the node says goodbye and exits); return its stderr."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=15)
        for reader in self._readers:
            reader.join(timeout=5)
        self.drain()
        return self.stderr


class MdnsNode(Node):
    def __init__(
        self,
        net: Netns,
        ns: str,
        stype: str,
        name: str,
        payload: bytes,
        ip: str,
        log_level: str = "WARNING",
    ) -> None:
        super().__init__(net, ns, ["-c", NODE_SCRIPT, stype, name, payload.hex(), ip, log_level])
        self.payload = payload
        self.started = self.wait_for(lambda e: e["event"] == "started", 15)
        assert self.started["ok"], f"mDNS did not start in {ns} on {ip}"

    def wait_found(self, other: MdnsNode, timeout: float = FOUND_WITHIN_S + 2) -> float:
        """Seconds from the later of the two start() calls to this node finding `other`."""
        event = self.wait_for(lambda e: _is_found(e, other.payload), timeout)
        return event["t"] - max(self.started["t_start"], other.started["t_start"])

    def found(self) -> set[bytes]:
        return {bytes.fromhex(e["payload"]) for e in self.drain() if e["event"] == "found"}


def _is_found(event: dict[str, Any], payload: bytes) -> bool:
    return event["event"] == "found" and event["payload"] == payload.hex()


def _assert_clean_exit(*nodes: Node) -> None:
    for node in nodes:
        err = node.stop()
        assert node.proc.returncode == 0, err
        assert "Traceback" not in err and "WARNING" not in err and "ERROR" not in err, err


def _report(label: str, seconds: float) -> None:
    print(f"mdns discovery {label}: {seconds:.3f} s")
    assert seconds < FOUND_WITHIN_S


def test_two_hosts_find_each_other_but_not_another_swarm(net: Netns) -> None:
    a, b = net.add("a"), net.add("b")
    net.veth_pair(a, b, "10.71.0.1", "10.71.0.2")
    first = MdnsNode(net, a, SWARM, "node-a", os.urandom(400), "10.71.0.1")
    stranger = MdnsNode(net, b, OTHER_SWARM, "node-c", os.urandom(400), "10.71.0.2")
    later = MdnsNode(net, b, SWARM, "node-b", os.urandom(400), "10.71.0.2")

    _report("veth, earlier node finds later one", first.wait_found(later))
    _report("veth, later node finds earlier one", later.wait_found(first))
    time.sleep(QUIET_S)
    assert first.found() == {later.payload}
    assert later.found() == {first.payload}
    assert stranger.found() == set()
    _assert_clean_exit(first, later, stranger)


def test_update_reaches_the_other_host(net: Netns) -> None:
    a, b = net.add("a"), net.add("b")
    net.veth_pair(a, b, "10.72.0.1", "10.72.0.2")
    one = MdnsNode(net, a, SWARM, "node-a", b"first", "10.72.0.1")
    two = MdnsNode(net, b, SWARM, "node-b", b"two", "10.72.0.2")
    two.wait_found(one)
    largest = os.urandom(MAX_PAYLOAD_BYTES)  # still one packet on a 1500-byte MTU
    one.send("update " + largest.hex())
    two.wait_for(lambda e: _is_found(e, largest), FOUND_WITHIN_S)
    _assert_clean_exit(one, two)


DEGRADE_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
from swarm.net.mdns import MdnsService
for _ in range(2):
    svc = MdnsService(sys.argv[1], "n", b"p", ["127.0.0.1"], 1, print)
    print(svc.start())
    svc.close()
"""


def test_loopback_without_multicast_degrades_with_one_warning(net: Netns) -> None:
    ns = net.add("down", lo_up=False)  # lo never up: joining the group fails with ENODEV
    result = net.run(ns, [sys.executable, "-c", DEGRADE_SCRIPT, SWARM], cwd=REPO)
    assert result.stdout.split() == ["False", "False"]
    assert result.stderr.count("LAN discovery off") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_txt_records_are_ignored(net: Netns) -> None:
    a, b = net.add("a"), net.add("b")
    net.veth_pair(a, b, "10.73.0.1", "10.73.0.2")
    browser = MdnsNode(net, a, SWARM, "node-a", b"browser", "10.73.0.1", log_level="DEBUG")
    garbage = {
        "past-end": b"\xff\x01",
        "no-version": _txt(b"p0=abc"),
        "gap": _txt(b"cv=1", b"p1=abc"),
        "dup": _txt(b"cv=1", b"p0=a", b"p0=b"),
        "huge": _txt(b"cv=1", *(b"p%d=" % i + bytes(252) for i in range(5))),
        "bare": _txt(b"\xff\xfe\x00=\x00"),
    }
    specs = [f"{name}={text.hex()}" for name, text in garbage.items()]
    raw = Node(net, b, ["-c", RAW_SCRIPT, SWARM, "10.73.0.2", *specs])
    raw.wait_for(lambda e: e["event"] == "started", 15)
    good = MdnsNode(net, b, SWARM, "node-b", b"good", "10.73.0.2")

    browser.wait_found(good)
    time.sleep(QUIET_S)
    assert browser.found() == {b"good"}
    assert browser.proc.poll() is None
    _assert_clean_exit(browser, good, raw)
    for name in garbage:  # each was seen, and dropped quietly
        assert f"ignoring {name}.{SWARM}: no or malformed TXT payload" in browser.stderr


def test_loopback_nodes_meet_each_other_and_stay_off_the_lan(net: Netns) -> None:
    a, b = net.add("a"), net.add("b")
    net.veth_pair(a, b, "10.74.0.1", "10.74.0.2")
    local_1 = MdnsNode(net, a, SWARM, "lo-1", b"lo-1", "127.0.0.1")
    lan_a = MdnsNode(net, a, SWARM, "lan-a", b"lan-a", "10.74.0.1")
    lan_b = MdnsNode(net, b, SWARM, "lan-b", b"lan-b", "10.74.0.2")
    local_2 = MdnsNode(net, a, SWARM, "lo-2", b"lo-2", "127.0.0.1")

    _report("loopback, earlier node finds later one", local_1.wait_found(local_2))
    _report("loopback, later node finds earlier one", local_2.wait_found(local_1))
    lan_a.wait_found(lan_b)
    lan_b.wait_found(lan_a)
    time.sleep(QUIET_S)
    assert local_1.found() == {b"lo-2"}
    assert local_2.found() == {b"lo-1"}
    assert lan_a.found() == {b"lan-b"}
    assert lan_b.found() == {b"lan-a"}
    _assert_clean_exit(local_1, local_2, lan_a, lan_b)


def _ptr_query(name: str) -> bytes:
    """A legacy unicast DNS query (id 0x4242) for the PTR records of `name`."""
    qname = b"".join(bytes((len(p),)) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return struct.pack("!6H", 0x4242, 0, 1, 0, 0, 0) + qname + struct.pack("!2H", 12, 1)


QUERY_SCRIPT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
s.sendto(bytes.fromhex(sys.argv[2]), (sys.argv[1], 5353))
try:
    print(s.recvfrom(9000)[0].hex())
except TimeoutError:
    print("timeout")
"""


def _query(net: Netns, ns: str, ip: str, name: str) -> str:
    argv = [sys.executable, "-c", QUERY_SCRIPT, ip, _ptr_query(name).hex(), "1.0"]
    return net.run(ns, argv).stdout.strip()


def test_loopback_node_does_not_answer_the_lan(net: Netns) -> None:
    a, b = net.add("a"), net.add("b")
    net.veth_pair(a, b, "10.75.0.1", "10.75.0.2")
    node = MdnsNode(net, a, SWARM, "lo-1", b"lo-1", "127.0.0.1")

    answer = _query(net, a, "127.0.0.1", SWARM)  # the query works where the node listens...
    assert answer != "timeout" and b"lo-1".hex() in answer
    # ...but a unicast query to the host's LAN address, which the 0.0.0.0:5353 socket would
    # otherwise receive, gets nothing back; nor does service-type enumeration.
    assert _query(net, b, "10.75.0.1", SWARM) == "timeout"
    assert _query(net, b, "10.75.0.1", "_services._dns-sd._udp.local.") == "timeout"
    _assert_clean_exit(node)


def test_three_hosts_on_a_bridge_all_meet(net: Netns) -> None:
    lan = net.bridge()
    hosts = [net.add(f"h{i}") for i in range(3)]
    ips = [f"10.76.0.{i + 1}" for i in range(3)]
    for ns, ip in zip(hosts, ips, strict=True):
        net.attach(lan, ns, ip)
    nodes = [
        MdnsNode(net, ns, SWARM, f"node-{i}", f"payload-{i}".encode(), ip)
        for i, (ns, ip) in enumerate(zip(hosts, ips, strict=True))
    ]
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.wait_found(other)
    for node in nodes:
        assert node.found() == {o.payload for o in nodes if o is not node}
    _assert_clean_exit(*nodes)


def test_mdns_does_not_cross_a_router(net: Netns) -> None:
    a, b = net.add("a"), net.add("b")
    router = net.router(a, b, "10.77.1.0/24", "10.77.2.0/24")
    one = MdnsNode(net, a, SWARM, "node-a", b"payload-of-a", router.ip_a)
    two = MdnsNode(net, b, SWARM, "node-b", b"payload-of-b", router.ip_b)
    # Unicast is routed: a direct query from the other subnet reaches node b and is answered...
    assert b"payload-of-b".hex() in _query(net, a, router.ip_b, SWARM)
    time.sleep(QUIET_S + 1)
    assert one.found() == set() and two.found() == set()  # ...link-local multicast is not.
    _assert_clean_exit(one, two)


def test_netns_cleanup_removes_namespaces_and_processes() -> None:
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    with Netns() as n:
        ns = n.add("gone")
        proc = n.popen(ns, ["sleep", "60"])
    assert proc.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns not in listed
