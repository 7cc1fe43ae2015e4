"""How much RAM this machine has, and how much of it is free: the one reader.

Linux's /proc/meminfo gives "available" memory (free plus what the kernel can reclaim at
once), the number to plan with; elsewhere the free pages stand in for it.
"""

from __future__ import annotations

import os
from typing import NamedTuple


class Memory(NamedTuple):
    total: int  # bytes
    available: int  # bytes


def memory_bytes() -> Memory:
    """(total, available) RAM in bytes; available falls back to free pages off Linux."""
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
        return Memory(fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0)))
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return Memory(os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page)
