"""JSON frames on libp2p streams: what one side writes, the other reads; old or foreign
messages are refused by version."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
import trio
from libp2p.abc import INetStream

from swarm.net.host import parse_versioned, read_json_frame, write_json_frame


class _Pipe:
    """A stream's two ends in one buffer: enough for the framing, which only reads and writes."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, data: bytes) -> None:
        self.data += data

    async def read(self, n: int = -1) -> bytes:
        n = len(self.data) if n < 0 else n
        chunk, self.data = bytes(self.data[:n]), self.data[n:]
        return chunk


def _round_trip(messages: list[dict[str, Any]], max_bytes: int) -> list[Any]:
    async def main() -> list[Any]:
        pipe = cast(INetStream, _Pipe())
        for m in messages:
            await write_json_frame(pipe, m)
        return [await read_json_frame(pipe, max_bytes) for _ in messages]

    return trio.run(main)


def test_json_frames_arrive_one_by_one_as_written() -> None:
    sent = [{"ok": True, "ttl_s": 30.0}, {"type": "token", "text": "héllo"}, {}]
    assert _round_trip(sent, 1024) == sent


def test_a_frame_over_the_limit_is_refused() -> None:
    with pytest.raises(Exception, match="exceeds"):
        _round_trip([{"text": "x" * 100}], 50)


def test_a_versioned_body_is_returned_whole() -> None:
    data = json.dumps({"version": 1, "op": "renew"}).encode()
    assert parse_versioned(data, 1, "lease message") == {"version": 1, "op": "renew"}


@pytest.mark.parametrize("body", [{"version": 2, "op": "renew"}, {"op": "renew"},
                                  [1, 2], "text", {"version": "1"}])
def test_another_version_or_shape_is_refused_by_name(body: Any) -> None:
    with pytest.raises(ValueError, match="not a version 1 lease message"):
        parse_versioned(json.dumps(body).encode(), 1, "lease message")


def test_a_frame_that_is_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_versioned(b"\xff{", 1, "copy request")
