"""Write-behind: threads that write and hash received pieces while the next one is read.

Owns a few fixed buffers that go round between one reading thread and a pipeline of stages,
each a thread of its own (the file write, then the sha256): the reader fills a free buffer and
queues it, each stage passes it on in order, the last frees it. File writes and sha256 release
the GIL, as decryption does, so receiving, writing and hashing overlap instead of taking turns.
Nothing is allocated per piece, and at most `depth` pieces wait: a slow disk slows the reader
down rather than filling memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from types import TracebackType

Stage = Callable[[memoryview], None]
Piece = tuple[memoryview, int] | None  # a buffer and how much of it to use; None: the end


class WriteBehind:
    """`with WriteBehind(stages, size) as w:` take `w.buffer()`, fill it, `w.put(buffer, n)`.

    Leaving the block normally waits until every stage has had every piece and raises what a
    stage raised, if anything. Leaving it with an exception drops the pieces the first stage
    has not started on; a piece it did take goes through the later stages too, so that after
    a failure (or a cancelled copy) what was written is also hashed, and nothing more.
    """

    def __init__(self, stages: Sequence[Stage], size: int, depth: int = 4) -> None:
        self._stages = stages
        self._queues: list[queue.SimpleQueue[Piece]] = [queue.SimpleQueue() for _ in stages]
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(memoryview(bytearray(size)))
        self._error: BaseException | None = None
        self._dropping = False
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"covey-write-behind-{i}")
                         for i in range(len(stages))]

    def __enter__(self) -> WriteBehind:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None:
            self._dropping = True
        self._queues[0].put(None)
        for thread in self._threads:
            thread.join()
        if kind is None:
            self._raise()

    def buffer(self) -> memoryview:
        """A free buffer, once one is; raises what a stage raised, if one failed."""
        buf = self._free.get()
        self._raise()
        return buf

    def put(self, buf: memoryview, n: int) -> None:
        """Queue the first `n` bytes of `buf` (from `buffer()`) for the stages, in order."""
        self._queues[0].put((buf, n))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self, i: int) -> None:
        stage, inbox = self._stages[i], self._queues[i]
        last = i + 1 == len(self._stages)
        failed = False
        while (piece := inbox.get()) is not None:
            buf, n = piece
            # A failure or a break stops the first stage; what it did goes through the rest.
            if not (failed or i == 0 and (self._dropping or self._error is not None)):
                try:
                    stage(buf[:n])
                except BaseException as exc:  # handed to the reader, which raises it
                    failed = True
                    self._error = self._error or exc
                else:
                    if not last:
                        self._queues[i + 1].put(piece)
                        continue
            self._free.put(buf)
        if not last:
            self._queues[i + 1].put(None)
