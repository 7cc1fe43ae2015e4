"""Byte sizes as people read them: the one way Covey writes a number of bytes.

Binary units with one decimal, the largest that keeps the number at 1 or more, so a small
model or a gap of a few megabytes never reads "0.0 GiB"; under 1 KiB, the count of bytes.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
_UNITS = ("KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """E.g. 12 bytes, 250.0 MiB, 3.2 GiB; a negative amount (a shortfall) keeps its sign."""
    if abs(n) < KiB:
        return f"{n:.0f} bytes"
    for unit in _UNITS:
        n /= KiB
        # Compare what is printed, so 1023.97 MiB reads "1.0 GiB" rather than "1024.0 MiB".
        if round(abs(n), 1) < KiB or unit == _UNITS[-1]:
            break
    return f"{n:.1f} {unit}"
