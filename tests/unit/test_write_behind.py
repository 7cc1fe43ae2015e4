"""Write-behind: pieces reach every stage whole and in order; a failure stops the copy, and
what was written when it stopped is also hashed."""

from __future__ import annotations

import threading

import pytest

from swarm.node.write_behind import WriteBehind


def test_pieces_arrive_in_order_and_buffers_go_round() -> None:
    written, hashed = bytearray(), bytearray()
    with WriteBehind([written.extend, hashed.extend], 8, depth=2) as pieces:
        for i in range(50):  # far more pieces than buffers
            buf = pieces.buffer()
            buf[:3] = bytes([i, i, i])
            pieces.put(buf, 3)
    assert written == hashed == b"".join(bytes([i, i, i]) for i in range(50))


def test_a_failed_write_is_raised_to_the_reader() -> None:
    def write(data: memoryview) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"), WriteBehind([write], 4) as pieces:
        for _ in range(10):
            pieces.put(pieces.buffer(), 4)


def test_a_break_drops_what_is_not_written_and_hashes_what_is() -> None:
    written: list[bytes] = []
    hashed: list[bytes] = []
    started, go = threading.Event(), threading.Event()

    def write(data: memoryview) -> None:
        started.set()
        go.wait(5)
        written.append(bytes(data))

    def hash_slowly(data: memoryview) -> None:
        go.wait(5)
        hashed.append(bytes(data))

    with pytest.raises(EOFError), WriteBehind([write, hash_slowly], 4, depth=3) as pieces:
        for i in range(3):
            buf = pieces.buffer()
            buf[:1] = bytes([i])
            pieces.put(buf, 1)
        started.wait(5)
        threading.Timer(0.2, go.set).start()  # the first write goes on after the break
        raise EOFError("the peer left")
    assert written == hashed == [b"\x00"]  # the piece being written when it broke, no more
