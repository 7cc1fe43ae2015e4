"""Throwaway Linux network namespaces for tests that need real multicast or several hosts.

`Netns` owns every namespace and process a test creates and removes them all on `close()`
(or leaving its `with` block), even when the test fails. Links are made inside namespaces
(`ip -n A link add ... peer ... netns B`), so nothing is ever created in, or sent on, the
host's own network namespace. Names are `covey-t-<random>-<label>`, so parallel runs don't clash.
Needs root and iproute2; tests call `netns_skip_reason()` and skip when it says why not.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

PREFIX = "covey-t-"
_KILL_WAIT_S = 5.0


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


@functools.cache
def netns_skip_reason() -> str | None:
    """Why namespaces cannot be used here (for pytest.skip), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip`"
    probe = f"{PREFIX}{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"`ip netns add` does not work here: {e}"
    try:
        # Entering a namespace can fail where adding one works (e.g. in a chroot whose root
        # is not a mount point: "mount --make-rslave /" fails).
        _ip("-n", probe, "link", "set", "lo", "up")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"network namespaces cannot be entered here: {e}"
    finally:
        with contextlib.suppress(RuntimeError):
            _ip("netns", "delete", probe)
    return None


def host_address(network: str, host: int) -> str:
    """The `host`-th address of `network`: host_address("10.1.0.0/24", 1) == "10.1.0.1"."""
    return str(ipaddress.ip_network(network)[host])


@dataclass(frozen=True)
class Router:
    """A namespace forwarding between two subnets; `ip_a`/`ip_b` are the leaves' addresses."""

    ns: str
    ip_a: str
    ip_b: str
    gateway_a: str
    gateway_b: str


NAT_KINDS = ("cone", "symmetric")


def masquerade_rule(wan: str, nat: str) -> list[str]:
    """The iptables rule that maps a home's outgoing connections to the router's `wan` address.

    "cone": plain MASQUERADE, which keeps a connection's source port when it is free, so every
    destination sees the same address and port (endpoint-independent mapping): the mapping a
    relay observes is the one a peer can dial, and TCP hole punching can work.
    "symmetric": MASQUERADE --random, a fresh random port for each connection, so what one
    peer observes says nothing about the mapping toward another: hole punching cannot work.
    Filtering is the same for both (`nat_home`): nothing unsolicited comes in."""
    if nat not in NAT_KINDS:
        raise ValueError(f"unknown NAT kind {nat!r}: one of {', '.join(NAT_KINDS)}")
    rule = ["-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE"]
    return rule + (["--random"] if nat == "symmetric" else [])


@dataclass(frozen=True)
class NatHome:
    """A namespace behind a NAT router: `ip` inside, seen as `wan_ip` from the outside."""

    ns: str
    router: str
    ip: str
    wan_ip: str


@dataclass(frozen=True)
class TwoHomes:
    """Two homes behind their own NATs and one reachable namespace, on a "public" segment."""

    public: str
    public_ip: str
    home1: NatHome
    home2: NatHome


def two_homes(netns: Netns, public_net: str = "198.51.100.0/24", nat: str = "cone") -> TwoHomes:
    """The everyday case reach is for: two homes that cannot dial each other (nor be dialled
    from outside) and one machine both can reach; both routers of NAT kind `nat` (see
    `masquerade_rule`). Needs iptables (see `nat_skip_reason`)."""
    bridge = netns.bridge("internet")
    public = netns.add("public")
    public_ip = host_address(public_net, 2)
    netns.attach(bridge, public, public_ip)
    homes = [netns.nat_home(bridge, host_address(public_net, 10 + n), f"192.168.{n}.0/24",
                            f"home{n}", nat=nat) for n in (1, 2)]
    return TwoHomes(public, public_ip, homes[0], homes[1])


def nat_skip_reason() -> str | None:
    """Why NATed namespaces cannot be built here, or None when they can."""
    reason = netns_skip_reason()
    if reason is None and shutil.which("iptables") is None:
        return "NAT routers need iptables (apt-get install iptables)"
    return reason


class Netns:
    """Creates namespaces, links and processes; `close()` undoes all of it."""

    def __init__(self) -> None:
        self.prefix = f"{PREFIX}{secrets.token_hex(3)}"
        self.namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._links: dict[str, int] = {}

    def __enter__(self) -> Netns:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add(self, label: str, lo_up: bool = True) -> str:
        """A new namespace, `lo` up (127.0.0.1 usable, multicast included) unless told not."""
        name = f"{self.prefix}-{label}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        if lo_up:
            _ip("-n", name, "link", "set", "lo", "up")
        return name

    def veth_pair(
        self, ns_a: str, ns_b: str, ip_a: str, ip_b: str, prefix: int = 24
    ) -> tuple[str, str]:
        """Join two namespaces with a veth cable; returns the interface names (a, b)."""
        dev_a, dev_b = self._link_name(ns_a), self._link_name(ns_b)
        _ip("-n", ns_a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        self._configure(ns_a, dev_a, ip_a, prefix)
        self._configure(ns_b, dev_b, ip_b, prefix)
        return dev_a, dev_b

    def bridge(self, label: str = "lan") -> str:
        """A namespace holding bridge `br0`, a switch for `attach` (3+ hosts on one LAN)."""
        ns = self.add(label)
        # Snooping off: flood all multicast, like a dumb switch.
        _ip("-n", ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", ns, "link", "set", "br0", "up")
        return ns

    def attach(self, bridge_ns: str, ns: str, ip: str, prefix: int = 24) -> str:
        """Plug `ns` into the bridge in `bridge_ns` with address `ip`; returns its interface."""
        port, dev = self._link_name(bridge_ns), self._link_name(ns)
        _ip("-n", bridge_ns, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns)
        _ip("-n", bridge_ns, "link", "set", port, "master", "br0", "up")
        self._configure(ns, dev, ip, prefix)
        return dev

    def router(self, ns_a: str, ns_b: str, net_a: str, net_b: str, label: str = "rtr") -> Router:
        """Route between `ns_a` (on net_a) and `ns_b` (on net_b) through a new namespace.

        The router takes .1 of each subnet and forwards; each leaf takes .2 and a route to the
        other subnet via the router. Link-local multicast (mDNS) is not forwarded, as on a LAN.
        """
        ns = self.add(label)
        gw_a, gw_b = host_address(net_a, 1), host_address(net_b, 1)
        ip_a, ip_b = host_address(net_a, 2), host_address(net_b, 2)
        plen_a, plen_b = (
            ipaddress.ip_network(net_a).prefixlen,
            ipaddress.ip_network(net_b).prefixlen,
        )
        self.veth_pair(ns, ns_a, gw_a, ip_a, plen_a)
        self.veth_pair(ns, ns_b, gw_b, ip_b, plen_b)
        # /proc/sys/net is per namespace; no dependency on procps' sysctl.
        self.run(ns, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        _ip("-n", ns_a, "route", "add", net_b, "via", gw_a)
        _ip("-n", ns_b, "route", "add", net_a, "via", gw_b)
        return Router(ns=ns, ip_a=ip_a, ip_b=ip_b, gateway_a=gw_a, gateway_b=gw_b)

    def nat_home(self, public_bridge: str, wan_ip: str, lan: str, label: str,
                 public_prefix: int = 24, nat: str = "cone") -> NatHome:
        """A home network behind its own NAT router: namespace `label` on `lan` (.2), and a
        router (`label`-nat, .1 on `lan`, `wan_ip` on the public bridge) that masquerades
        outgoing connections (`masquerade_rule(nat)`) and drops every inbound one that is not
        a reply.

        The router has no default route: an address outside the public segment is
        unreachable at once, as a private address in another home is from the internet."""
        router, home = self.add(f"{label}-nat"), self.add(label)
        wan = self.attach(public_bridge, router, wan_ip, public_prefix)
        gateway, ip = host_address(lan, 1), host_address(lan, 2)
        self.veth_pair(router, home, gateway, ip, ipaddress.ip_network(lan).prefixlen)
        self.run(router, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        _ip("-n", home, "route", "add", "default", "via", gateway)
        for rule in (masquerade_rule(wan, nat),
                     ["-A", "FORWARD", "-i", wan, "-m", "state", "--state",
                      "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                     ["-A", "FORWARD", "-i", wan, "-j", "DROP"],
                     ["-A", "INPUT", "-i", wan, "-m", "state", "--state",
                      "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                     ["-A", "INPUT", "-i", wan, "-j", "DROP"]):
            self.run(router, ["iptables", "-w", *rule])
        return NatHome(ns=home, router=router, ip=ip, wan_ip=wan_ip)

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside `ns` in its own process group; killed by `close()`."""
        kw["start_new_session"] = True  # so close() can kill the whole group by its id
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self._procs.append(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run `argv` inside `ns` to completion; raises on a non-zero exit unless check=False."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 30)
        kw.setdefault("check", True)
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)

    def close(self) -> None:
        """Kill our processes, then delete our namespaces (their links go with them)."""
        for proc in self._procs:
            _kill(proc)
        self._procs.clear()
        for ns in reversed(self.namespaces):
            # Already gone is fine; keep deleting the rest.
            with contextlib.suppress(RuntimeError):
                _ip("netns", "delete", ns)
        self.namespaces.clear()

    def _link_name(self, ns: str) -> str:
        # Unique within its namespace and under the 15-character interface name limit.
        n = self._links.get(ns, 0)
        self._links[ns] = n + 1
        return f"veth{n}"

    def _configure(self, ns: str, dev: str, ip: str, prefix: int) -> None:
        _ip("-n", ns, "addr", "add", f"{ip}/{prefix}", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "multicast", "on", "up")


def _kill(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=_KILL_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            continue
        finally:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


_CLONE_NEWNET = 0x40000000


def call_in(ns: str, fn: Any, *args: Any, timeout: float = 120.0) -> Any:
    """Run `fn(*args)` on a fresh thread that has joined namespace `ns`, and return its result.

    A network namespace belongs to a thread, so the test process's other threads stay where
    they are; sockets `fn` opens live in `ns` (a client talking to a node's 127.0.0.1 API).
    """
    import ctypes
    import threading

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{ns}") as handle:
                if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
            outcome["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{fn!r} still running in {ns} after {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
