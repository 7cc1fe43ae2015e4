"""The client endpoints' gate: matching a process's sockets to the far end of an accepted
connection, and admitting the engine alone (this process aside), waiting for its PID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

from swarm.workers.engine_only import Address, EngineOnly, owns_far_end, process_owns

SERVER = ("127.0.0.1", 5000)  # the endpoint's own address
CLIENT = ("127.0.0.1", 41000)  # the connecting socket's


def test_the_far_end_is_the_socket_with_our_addresses_swapped() -> None:
    mine = [(CLIENT, SERVER)]
    assert owns_far_end(mine, SERVER, CLIENT)
    # our own accepted socket is not the far end, nor is another connection to the endpoint
    assert not owns_far_end([(SERVER, CLIENT)], SERVER, CLIENT)
    assert not owns_far_end([(("127.0.0.1", 41001), SERVER)], SERVER, CLIENT)
    assert not owns_far_end([(CLIENT, ("127.0.0.1", 5001))], SERVER, CLIENT)
    assert not owns_far_end([(CLIENT, ())], SERVER, CLIENT)  # listening: no remote address
    assert not owns_far_end([], SERVER, CLIENT)


def test_an_ipv4_mapped_socket_is_the_same_address() -> None:
    mapped = [(("::ffff:127.0.0.1", 41000, 0, 0), ("::ffff:127.0.0.1", 5000, 0, 0))]
    assert owns_far_end(mapped, SERVER, CLIENT)
    assert not owns_far_end([(("::1", 41000, 0, 0), ("::1", 5000, 0, 0))], SERVER, CLIENT)


ENGINE = 4242


class Owners:
    """Stands in for the process lookup: which pids own the far end."""

    def __init__(self, *pids: int) -> None:
        self.pids = set(pids)

    def __call__(self, pid: int, local: Address, peer: Address) -> bool:
        return pid in self.pids


def test_before_the_engine_is_known_only_this_process_is_decided() -> None:
    assert EngineOnly(Owners(os.getpid())).admits_now(SERVER, CLIENT) is True
    assert EngineOnly(Owners(ENGINE)).admits_now(SERVER, CLIENT) is None  # wait, then ask
    gate = EngineOnly(Owners(ENGINE))
    gate.expect_pid(ENGINE)
    assert gate.admits_now(SERVER, CLIENT) is True
    other = EngineOnly(Owners(ENGINE + 1))  # a process that is neither
    other.expect_pid(ENGINE)
    assert other.admits_now(SERVER, CLIENT) is False


def test_an_early_connection_waits_for_the_engine_and_is_judged_then() -> None:
    for owner, admitted in ((ENGINE, True), (ENGINE + 1, False)):
        gate = EngineOnly(Owners(owner))
        timer = threading.Timer(0.2, gate.expect_pid, (ENGINE,))
        timer.start()
        start = time.monotonic()
        assert gate.admits(SERVER, CLIENT, wait_s=5) is admitted
        assert 0.15 < time.monotonic() - start < 4
        timer.join()


def test_without_an_engine_a_stranger_is_refused_after_the_wait_or_a_stop() -> None:
    gate = EngineOnly(Owners(ENGINE))
    start = time.monotonic()
    assert not gate.admits(SERVER, CLIENT, wait_s=0.3)
    assert 0.25 < time.monotonic() - start < 3
    start = time.monotonic()
    assert not gate.admits(SERVER, CLIENT, wait_s=30, stop=lambda: True)
    assert time.monotonic() - start < 3


def test_the_real_lookup_finds_the_process_that_connected() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys, time\n"
            f"s = socket.create_connection(('127.0.0.1', {port}))\n"
            "sys.stdin.read()\n")], stdin=subprocess.PIPE)
        try:
            accepted, _ = listener.accept()
            with accepted:
                local, peer = accepted.getsockname(), accepted.getpeername()
                assert process_owns(child.pid, local, peer)
                assert not process_owns(os.getpid(), local, peer)
                assert not process_owns(child.pid, peer, local)  # the addresses swapped
        finally:
            child.kill()
            child.wait()
        assert not process_owns(child.pid, local, peer)  # gone
