"""Write-behind: a thread that writes (and hashes) received pieces while the next is read.

Owns a few fixed buffers that go round between one reading thread and one writing thread: the
reader fills a free buffer and queues it, the writer passes it to `write` and frees it again.
File writes and sha256 release the GIL, as decryption does, so receiving, writing and hashing
overlap instead of taking turns. Nothing is allocated per piece, and at most `depth` pieces
wait: a slow disk slows the reader down rather than filling memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

Piece = tuple[memoryview, int] | None  # a buffer and how much of it to write; None: the end


class WriteBehind:
    """`with WriteBehind(write, size) as w:` take `w.buffer()`, fill it, `w.put(buffer, n)`.

    Leaving the block normally waits until every piece is written and raises what `write`
    raised, if anything. Leaving it with an exception drops the pieces not yet written: after
    a failure (or a cancelled copy) nothing more reaches the file than what was written by then.
    """

    def __init__(self, write: Callable[[memoryview], None], size: int, depth: int = 4) -> None:
        self._write = write
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[Piece] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(memoryview(bytearray(size)))
        self._error: BaseException | None = None
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name="covey-write-behind",
                                        daemon=True)

    def __enter__(self) -> WriteBehind:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None:
            self._dropping = True
        self._full.put(None)
        self._thread.join()
        if kind is None:
            self._raise()

    def buffer(self) -> memoryview:
        """A free buffer, once one is; raises what `write` raised, if it failed."""
        buf = self._free.get()
        self._raise()
        return buf

    def put(self, buf: memoryview, n: int) -> None:
        """Queue the first `n` bytes of `buf` (from `buffer()`) for writing, in order."""
        self._full.put((buf, n))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (piece := self._full.get()) is not None:
            buf, n = piece
            if self._error is None and not self._dropping:
                try:
                    self._write(buf[:n])
                except BaseException as exc:  # handed to the reader, which raises it
                    self._error = exc
            self._free.put(buf)
