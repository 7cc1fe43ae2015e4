"""Yamux that holds every peer to the receive window it granted: the one guard on memory that
works before admission.

py-libp2p 0.8.1's Yamux buffers whatever a peer sends on a stream and only logs a warning when
the bytes exceed the stream's receive window, so a peer that ignores flow control (no token
needed) grows the node's memory by hundreds of MB in seconds. `WindowedYamux` drops the first
DATA frame over a stream's window unbuffered, resets that stream and closes the connection
with a GO_AWAY protocol error, as the yamux spec asks; nothing more from the connection is
buffered meanwhile.

How, and what it depends on (tests/integration/test_yamux_limits.py fails if it changes):
the library keeps one bytearray per stream in `Yamux.stream_buffers`, created by assignment
(`stream_buffers[sid] = bytearray()`) and fed with `.extend(data)` for every DATA frame (with
SYN, with ACK or plain) before it lowers the stream's `recv_window`. Here the dict wraps each
new buffer in one that asks the muxer first. The library's `MuxerMultistream` builds plain
`Yamux` by name, so `WindowedMuxers` (installed by `install`) builds ours instead.
"""

from __future__ import annotations

import logging
from typing import cast

import trio
from libp2p.abc import IHost, IMuxedConn, ISecureConn
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import GO_AWAY_PROTOCOL_ERROR, Yamux, YamuxStream

log = logging.getLogger(__name__)


class WindowedYamux(Yamux):
    """Yamux that resets a stream, and closes the connection, at the first byte over the
    stream's receive window."""

    def __init__(self, secured_conn: ISecureConn, peer_id: ID,
                 is_initiator: bool | None = None) -> None:
        super().__init__(secured_conn, peer_id, is_initiator=is_initiator)
        self.stream_buffers = _WindowedBuffers(self)
        self.window_violated = False

    def admits(self, stream_id: int, size: int) -> bool:
        """Whether `size` more bytes fit `stream_id`'s window; the first that do not start the
        drop. Runs synchronously inside the library's frame loop, under its streams lock."""
        if self.window_violated:
            return False
        stream = self.streams.get(stream_id)
        if stream is None or size <= stream.recv_window:
            return True
        self.window_violated = True
        log.warning("peer %s sent %d bytes on yamux stream %d, over its %d-byte window: "
                    "resetting the stream and closing the connection",
                    self.peer_id, size, stream_id, stream.recv_window)
        if self._nursery is not None:  # None only before the frame loop runs, i.e. never here
            self._nursery.start_soon(self._drop, stream)
        return False

    async def _drop(self, stream: YamuxStream) -> None:
        # Shielded: the muxer's nursery is cancelled as soon as its frame loop sees the
        # connection end, and the close must still reach the swarm (on_close).
        with trio.CancelScope(shield=True):
            try:
                await stream.reset()
            except Exception as exc:  # noqa: BLE001 - the connection may be gone already
                log.debug("reset of flooded stream %d: %r", stream.stream_id, exc)
            await self.close(GO_AWAY_PROTOCOL_ERROR)


class _WindowedBuffers(dict[int, bytearray]):
    """`Yamux.stream_buffers` whose buffers take in only what their stream's window allows."""

    def __init__(self, muxer: WindowedYamux) -> None:
        super().__init__()
        self._muxer = muxer

    def __setitem__(self, stream_id: int, buffer: bytearray) -> None:
        super().__setitem__(stream_id, _WindowedBuffer(buffer, stream_id, self._muxer))


class _WindowedBuffer(bytearray):
    __slots__ = ("_stream_id", "_muxer")

    def __init__(self, data: bytearray, stream_id: int, muxer: WindowedYamux) -> None:
        super().__init__(data)
        self._stream_id = stream_id
        self._muxer = muxer

    def extend(self, data: object) -> None:
        chunk = cast(bytes, data)
        if self._muxer.admits(self._stream_id, len(chunk)):
            super().extend(chunk)


class WindowedMuxers(MuxerMultistream):
    """The host's muxer negotiation, building `WindowedYamux` for every connection (yamux is
    the only muxer Covey offers)."""

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, _ = await self._selector.select(conn, conn.is_initiator,
                                                  self.negotiate_timeout)
        muxed = WindowedYamux(conn, peer_id, is_initiator=conn.is_initiator)
        return self._annotate_connection(muxed, conn, protocol)


def install(host: IHost) -> None:
    """Make `host` (built with yamux as its only muxer) use `WindowedYamux`."""
    upgrader = cast(Swarm, host.get_network()).upgrader
    current = upgrader.muxer_multistream
    upgrader.muxer_multistream = WindowedMuxers(current.transports,
                                                current.negotiate_timeout)

