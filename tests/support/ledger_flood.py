"""A swarm member that floods the ledger: the probe side of tests/integration/test_ledger_flood.py.

    python -m tests.support.ledger_flood --target MULTIADDR --token T [--entries N]

Joins as an admitted member (the swarm's own admission, through `tests.support.swarm_probe`),
then writes N small, validly signed and sealed entries of its own: every one served to the
node's pull, and the first few hundred pushed too. Prints one JSON line of what it did and
stays connected until killed, so the node keeps it as a member. Passes no verdicts.
"""

from __future__ import annotations

import argparse
import json
import sys

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.peer.peerinfo import info_from_p2p_addr

from swarm.ledger.sync import MAX_DIGEST_BYTES, MAX_PUSH_ENTRIES
from swarm.net.host import read_frame
from tests.support.swarm_probe import (
    Observations,
    SyncServer,
    Writer,
    join_as_member,
    keys_for,
    new_identity,
    push,
    running_host,
)

PUSHED = 320  # entries also pushed, MAX_PUSH_ENTRIES to a stream


class FloodServer(SyncServer):
    """Serves every frame to each pull, with no deadline of its own: the node's decides."""

    async def handle(self, stream: INetStream) -> None:
        self.pulls += 1
        try:
            json.loads(await read_frame(stream, MAX_DIGEST_BYTES))
            for data in self.frames:
                await stream.write(data)
                self.frames_sent += 1
            await stream.close()
        except Exception as exc:  # noqa: BLE001 - the node may stop reading: an observation
            self.errors.append(type(exc).__name__)
        self.pulled.set()


async def flood(args: argparse.Namespace) -> None:
    target = info_from_p2p_addr(multiaddr.Multiaddr(args.target))
    keys = keys_for(args.token)
    identity = new_identity()
    writer = Writer(identity, keys.ledger_key)
    frames = [writer.sealed(writer.signed(f"flood-{i:05d}", {"i": i}, i))
              for i in range(args.entries)]
    server = FloodServer(frames)
    obs: Observations = {"peer_id": writer.me, "entries": len(frames)}
    async with running_host(identity) as host:
        await join_as_member(host, target, keys.admission_key, server, obs)
        if obs.get("admitted"):
            for start in range(0, min(PUSHED, len(frames)), MAX_PUSH_ENTRIES):
                await push(host, target.peer_id, frames[start:start + MAX_PUSH_ENTRIES])
            with trio.move_on_after(30):
                while server.frames_sent < len(frames) and not server.errors:
                    await trio.sleep(0.1)
        obs.update(pulls=server.pulls, frames_served=server.frames_sent,
                   serve_errors=server.errors, pushed=min(PUSHED, len(frames)))
        print(json.dumps(obs), flush=True)
        await trio.sleep_forever()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.ledger_flood")
    parser.add_argument("--target", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--entries", type=int, default=8200)
    trio.run(flood, parser.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
