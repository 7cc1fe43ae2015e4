"""`covey token`, `covey node` and `covey peers` as a user meets them, without a network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.swarm import format_peers
from swarm.trust.token import parse_token

pytestmark = pytest.mark.processes

COVEY = str(Path(sys.executable).parent / "covey")


def covey(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([COVEY, *args], capture_output=True, text=True, timeout=60)


def test_token_new_prints_one_parseable_line() -> None:
    out = covey("token", "new")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    assert parse_token(lines[0]).bootstrap == ()
    assert covey("token", "new").stdout != out.stdout


def test_token_new_with_a_bad_bootstrap_address_says_why() -> None:
    out = covey("token", "new", "--bootstrap", "/ip4/10.0.0.1/tcp/4001")
    assert out.returncode == 2 and out.stdout == ""
    assert "must end with /p2p/" in out.stderr


def test_node_without_a_token_explains_what_to_do(tmp_path: Path) -> None:
    out = covey("node", "--data-dir", str(tmp_path))
    assert out.returncode == 2
    assert "no swarm token yet" in out.stderr and "covey token new" in out.stderr
    assert not (tmp_path / "swarm.json").exists()


def test_node_with_a_damaged_token_changes_nothing(tmp_path: Path) -> None:
    good = covey("token", "new").stdout.strip()
    assert covey("node", "--data-dir", str(tmp_path), "--token", good[:-5]).returncode == 2
    assert not (tmp_path / "swarm.json").exists()
    out = covey("node", "--data-dir", str(tmp_path), "--token", good[:-5])
    assert "truncated" in out.stderr


def test_node_with_a_listen_address_it_cannot_use(tmp_path: Path) -> None:
    token = covey("token", "new").stdout.strip()
    for listen, words in (("garbage", "garbage"), ("/ip6/::1/tcp/0", "IPv4 TCP only"),
                          ("/ip4/127.0.0.1/udp/5", "IPv4 TCP only")):
        out = covey("node", "--data-dir", str(tmp_path), "--token", token, "--listen", listen)
        assert out.returncode == 2 and words in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_peers_without_a_running_node(tmp_path: Path) -> None:
    out = covey("peers", "--data-dir", str(tmp_path))
    assert out.returncode == 1
    assert "No Covey node is running" in out.stderr and "covey node --token" in out.stderr


def test_peers_with_an_unreadable_api_secret_says_which_file(tmp_path: Path) -> None:
    """A node that looks alive (its pid runs) but whose secret is gone: a message, no traceback."""
    (tmp_path / "api.json").write_text(json.dumps({"version": 1, "port": 9, "pid": os.getpid()}))
    out = covey("peers", "--data-dir", str(tmp_path))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and str(tmp_path / "api-secret") in out.stderr


def test_peers_table_lists_this_node_first_then_online_then_offline() -> None:
    gib = 2**30
    base = {"os": "Linux 6", "cores": 8, "ram_total": 32 * gib, "ram_free": 16 * gib,
            "roles": [], "connected": True, "last_seen": 1000.0}
    peers = [
        {**base, "peer_id": "12D3KooWaaaaaaaaOFFLINE1", "name": "attic", "online": False,
         "self": False, "last_seen": 700.0, "connected": False},
        {**base, "peer_id": "12D3KooWbbbbbbbbONLINE01", "name": "desk", "online": True,
         "self": False, "roles": ["worker"]},
        {**base, "peer_id": "12D3KooWccccccccTHISNODE", "name": "laptop", "online": True,
         "self": True},
    ]
    table = format_peers(peers, now=1003.0).splitlines()
    assert table[0].split()[:3] == ["NAME", "PEER", "STATUS"]
    assert table[1].startswith("laptop") and "this node" in table[1]
    assert table[2].startswith("desk") and "online" in table[2] and "worker" in table[2]
    assert "3s ago" in table[2] and "16.0/32.0 GiB" in table[2]
    assert table[3].startswith("attic") and "offline" in table[3] and "5m ago" in table[3]
    alone = format_peers(peers[2:], now=1003.0)
    assert "no other machines yet" in alone
    json.dumps(peers)  # what --json prints is this list as is


def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    from swarm.node.main import AlreadyRunning, lock_data_dir

    held = lock_data_dir(tmp_path)
    try:
        token = covey("token", "new").stdout.strip()
        out = covey("node", "--data-dir", str(tmp_path), "--token", token)
        assert out.returncode == 1 and "already running" in out.stderr
        try:
            lock_data_dir(tmp_path)
            raise AssertionError("a second lock was granted")
        except AlreadyRunning:
            pass
    finally:
        held.close()
    lock_data_dir(tmp_path).close()  # free again once the first holder is gone


def test_node_whose_port_is_taken_says_so(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        token = covey("token", "new").stdout.strip()
        out = covey("node", "--data-dir", str(tmp_path), "--token", token, "--lan-only",
                    "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert out.returncode == 1, out.stderr
    assert "could not listen on" in out.stderr and "in use" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "api.json").exists()
