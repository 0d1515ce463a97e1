"""The process's resident memory, for logs and memory tests (Linux and macOS report the peak)."""

from __future__ import annotations

import sys

import psutil

MIB = 2**20


def resident_bytes() -> int:
    """Resident set size now."""
    return psutil.Process().memory_info().rss


def peak_resident_bytes() -> int | None:
    """Largest resident set size of this process so far; None where the OS does not report it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB
