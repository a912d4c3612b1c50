"""Process-wide malloc settings that let large codec outputs reuse memory.

glibc serves every allocation of 32 MiB or more with a fresh ``mmap`` and
gives it back with ``munmap`` when it is freed. An encode or decode that
allocates such an output (a whole model's update, decoded every round) then
faults its pages in on every call: on the development VM a 4-bit decode into
a new 256 MiB tensor takes 47-69 ms, and 8 ms into a reused one.
:func:`reuse_freed_memory` raises glibc's mmap threshold, so that blocks up to
``limit_bytes`` come from its heap and stay there when freed: later rounds'
outputs land on pages already mapped (7-10 ms for that decode). It shows
after the first few calls (from the fourth on, on that VM): an aligned
request needs a little more than the block just freed, so glibc places the
next one or two blocks past it before the freed space fits.

The price is memory: the process keeps what it freed (up to about twice
``limit_bytes`` at the top of the heap) instead of returning it to the
system. Limits: glibc serves blocks above 64 MiB from its heap only on the
main thread's arena, and other threads' arenas map those afresh whatever the
setting. Some glibc releases refuse thresholds above 32 MiB; the call then
returns False and changes nothing (glibc 2.36 takes 1 GiB).

It is a process-wide setting, so the library never applies it on its own.
The same effect without code: start the process with
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3
_LIMIT_MAX = 1 << 30  # twice it, less one, is the largest int: the trim threshold


def reuse_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Keep freed blocks of up to ``limit_bytes`` for reuse (glibc only).

    Returns True if glibc took both settings, and False where they do not
    apply (another C library or platform, or a glibc that refuses so high a
    threshold); nothing changes then.
    ``limit_bytes`` must be in 1..2**30 (mallopt takes an int, and the trim
    threshold is set to twice the limit).
    """
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or not 0 < limit_bytes <= _LIMIT_MAX:
        raise ValueError(f"reuse_freed_memory: limit_bytes must be an int in 1..{_LIMIT_MAX}, got {limit_bytes!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols of the running process: its C library
        if not hasattr(libc, "gnu_get_libc_version"):  # musl's mallopt does nothing
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Trim above twice the limit, so that a freed block at the top of the heap stays too.
    return mallopt(_M_MMAP_THRESHOLD, limit_bytes) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 * limit_bytes - 1) == 1
