"""This machine's facts for the heartbeat (swarm.node.local_facts)."""

from __future__ import annotations

import errno
import importlib.metadata

import pytest

from swarm.node import local_facts


def test_the_version_is_read_once_so_a_heartbeat_never_needs_a_file_for_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    local_facts.covey_version.cache_clear()
    calls: list[str] = []

    def version(name: str) -> str:
        calls.append(name)
        if len(calls) > 1:  # out of file descriptors, as under a flood of connections
            raise OSError(errno.EMFILE, "Too many open files")
        return "1.2.3"

    monkeypatch.setattr(importlib.metadata, "version", version)
    try:
        for _ in range(3):
            assert local_facts.collect_node_info("den", ()).covey_version == "1.2.3"
        assert calls == ["covey"]
    finally:
        local_facts.covey_version.cache_clear()
