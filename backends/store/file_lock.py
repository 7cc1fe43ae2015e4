"""An exclusive lock on an open file, shared between processes.

fcntl.flock on POSIX, msvcrt.locking (first byte) on Windows. The lock belongs to the open file,
so it also excludes the other threads of the holder's process that open the file themselves,
and the operating system drops it when the holder dies: a crash never leaves it held.
"""

from __future__ import annotations

import os
import sys
import time

_RETRY_S = 0.005  # msvcrt cannot wait without a timeout of its own: poll

if sys.platform == "win32":
    import msvcrt

    def _try(fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _wait(fd: int) -> None:
        while not _try(fd):
            time.sleep(_RETRY_S)

    def unlock(fd: int) -> None:
        """Drop the lock taken on `fd` (before closing it)."""
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _wait(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def unlock(fd: int) -> None:
        """Drop the lock taken on `fd` (before closing it)."""
        fcntl.flock(fd, fcntl.LOCK_UN)


def lock(fd: int, wait: bool = True) -> bool:
    """Take the exclusive lock on the open file `fd`: True once held; with wait=False, False
    at once if another open file (this process's or another's) holds it."""
    if wait:
        _wait(fd)
        return True
    return _try(fd)
