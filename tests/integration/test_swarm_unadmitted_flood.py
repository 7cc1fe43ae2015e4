"""An outsider floods a node's libp2p port with idle TCP connections while a new member joins.

Real nodes in network namespaces: `a` (the target) sits between member `b` (on a link of its
own) and a router; behind the router is the newcomer `c`, given only `a`'s address, so `c`
can join only through an inbound connection to `a` (mDNS does not cross the router, and
nothing routes between `b` and `c`). The attacker runs on the router: from one address it
keeps 400 connections to `a`'s port open, opening new ones as fast as `a` closes them, for a
bounded time. Without caps on unadmitted connections, py-libp2p's 250 inbound slots fill up
and `c` cannot get in.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from swarm.net.unadmitted import PER_SOURCE
from swarm.trust.token import new_token
from tests.support.netns import Netns, netns_skip_reason
from tests.support.node_harness import RunningNode, start_node, wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]

PORT = 4001
HOLD = 400  # idle connections the attacker keeps open (or tries to)
RATE = 200  # new connections a second at most, once the first HOLD are out
ATTACK_S = 40.0  # it stops by itself after this

# The attacker: keeps HOLD connections to the target open, replacing each one the target
# closes (within RATE a second), for ATTACK_S; prints a JSON line of counts every second.
_ATTACK = """
import json, selectors, socket, sys, time
host, port, hold, rate, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
    float(sys.argv[4]), float(sys.argv[5])
sel = selectors.DefaultSelector()
live = set()
stats = {"opened": 0, "closed_by_node": 0, "open_now": 0}
allowance, last, end, report = float(hold), time.monotonic(), time.monotonic() + duration, 0.0
while (now := time.monotonic()) < end:
    allowance = min(float(hold), allowance + (now - last) * rate)
    last = now
    while len(live) < hold and allowance >= 1:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, port))
        sel.register(s, selectors.EVENT_READ)
        live.add(s)
        allowance -= 1
        stats["opened"] += 1
    for key, _ in sel.select(timeout=0.05):
        s = key.fileobj
        try:
            if s.recv(4096):
                continue
        except BlockingIOError:
            continue
        except OSError:
            pass
        sel.unregister(s)
        s.close()
        live.remove(s)
        stats["closed_by_node"] += 1
    stats["open_now"] = len(live)
    if now - report >= 1:
        report = now
        print(json.dumps(stats), flush=True)
print(json.dumps(stats), flush=True)
"""


class FdWatch:
    """The most file descriptors a process had open, sampled every 50 ms on a thread: each
    connection the node accepted and keeps takes one."""

    def __init__(self, pid: int) -> None:
        self.most = 0
        self._path = Path(f"/proc/{pid}/fd")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):
                self.most = max(self.most, len(os.listdir(self._path)))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.most


def names_listed(node: RunningNode) -> set[str]:
    return {p["name"] for p in node.peers() if p["online"] and not p["self"]}


def test_idle_flood_from_an_outsider_does_not_keep_a_new_member_out(tmp_path: Path) -> None:
    token = new_token().encode()
    with Netns() as netns:
        ns_a, ns_b, ns_c = netns.add("a"), netns.add("b"), netns.add("c")
        router = netns.router(ns_a, ns_c, "10.61.0.0/24", "10.62.0.0/24")
        netns.veth_pair(ns_a, ns_b, "10.63.0.1", "10.63.0.2")
        a = start_node(netns, ns_a, token, "a", tmp_path, "--listen", f"/ip4/0.0.0.0/tcp/{PORT}")
        b = start_node(netns, ns_b, token, "b", tmp_path,
                       "--bootstrap", f"/ip4/10.63.0.1/tcp/{PORT}/p2p/{a.peer_id}")
        wait_until(lambda: names_listed(a) == {"b"}, 20, "a to list b", [a, b])
        calm = FdWatch(a.proc.pid)
        time.sleep(2)
        before = calm.stop()
        fds = FdWatch(a.proc.pid)

        attack_log = tmp_path / "attack.log"
        with attack_log.open("w") as out:
            attacker = netns.popen(
                router.ns,
                [sys.executable, "-c", _ATTACK, router.ip_a, str(PORT), str(HOLD), str(RATE),
                 str(ATTACK_S)],
                stdout=out, stderr=out)
        attack_started = time.monotonic()
        time.sleep(3)  # the flood is on: without caps, every inbound slot would be taken now

        c = start_node(netns, ns_c, token, "c", tmp_path,
                       "--bootstrap", f"/ip4/{router.ip_a}/tcp/{PORT}/p2p/{a.peer_id}")
        joining = time.monotonic()
        nodes = [a, b, c]
        wait_until(lambda: {"a", "b"} <= names_listed(c), 10, "c to list a and b", nodes)
        joined_after = time.monotonic() - joining
        assert attacker.poll() is None, "the attack ended before the member joined"
        wait_until(lambda: names_listed(a) == {"b", "c"}, 5, "a to list b and c", nodes)
        assert c.peer_id in a.api("/api/status")["connected_peers"]

        # The attack runs its course; the node stays up and keeps its members.
        attacker.wait(timeout=ATTACK_S + 30 - (time.monotonic() - attack_started))
        most = fds.stop()
        stats = json.loads(attack_log.read_text().strip().splitlines()[-1])
        for node in nodes:
            assert node.proc.poll() is None, f"node {node.name} died:\n{node.log()}"
        assert names_listed(a) == {"b", "c"} and names_listed(c) >= {"a", "b"}
        # It really flooded, and the node kept only a handful of its connections at once
        # (py-libp2p alone keeps 250), whatever the attacker's side believed was open.
        assert stats["opened"] > 2 * HOLD, stats
        assert stats["closed_by_node"] > stats["opened"] - HOLD, stats
        print(f"\nc joined {joined_after:.1f} s after its API came up, under a flood: {stats};"
              f" a's open files: {before} before, at most {most} during")
        assert most - before <= 2 * PER_SOURCE + 16, (before, most)
