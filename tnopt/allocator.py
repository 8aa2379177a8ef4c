"""Give freed large arrays back to the operating system (glibc's malloc keeps them otherwise).

glibc serves a block of at least M_MMAP_THRESHOLD bytes with its own mmap and unmaps it on free; the
threshold starts at 128 KiB but is *dynamic*: each mmapped block freed raises it to that block's size
(up to 32 MiB on 64-bit). After the first few big numpy temporaries are freed, arrays of that size come
from the heap instead, and freed heap memory goes back to the system only from the heap's top — so a
run keeps the high-water mark of its freed arrays as resident memory. Measured on the ResNet-50 row
(session 8, bench/RESULTS.md): with the threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_=1048576) the
search's peak fell 6.60 → 6.20 GiB and the stages after it 3.5–3.7 → 1.5–1.7 GiB, the same plan.

Setting the threshold explicitly (mallopt) also turns the dynamic adjustment off, and blocks below it
(Python objects, small arrays) stay on the heap as before. The cost is one mmap/munmap and fresh
(zeroed) pages per large allocation; bench/RESULTS.md (session 9, memx10) has its measured time.

Process-wide, so only the command line (which owns its process) calls `return_freed_memory`, at start;
a library caller keeps its allocator as it is. A no-op where the C library is not glibc, where it has
no mallopt, or where the user set MALLOC_MMAP_THRESHOLD_ themselves (theirs wins).
"""

from __future__ import annotations

import ctypes
import functools
import os

# glibc's mallopt parameter number for the mmap threshold (malloc.h: #define M_MMAP_THRESHOLD -3).
M_MMAP_THRESHOLD = -3
# Blocks from this size up are mapped on their own and unmapped on free: every activation batch,
# moment and factor of a real model, while Python's small objects and small arrays stay on the heap.
MMAP_THRESHOLD_BYTES = 1 << 20
# The environment variable glibc reads for the same setting at start.
ENV_VARIABLE = "MALLOC_MMAP_THRESHOLD_"


@functools.cache
def _glibc():
    """The process's C library when it is glibc with mallopt and malloc_trim, else None."""
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # glibc only
        version.restype = ctypes.c_char_p
        version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        libc.malloc_trim.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes; whether it was set (False: not glibc, no
    mallopt, or the user's MALLOC_MMAP_THRESHOLD_ already decides)."""
    if os.environ.get(ENV_VARIABLE):
        return False
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)


def trim() -> bool:
    """Hand the heap's free pages back to the system (glibc malloc_trim) after a big release; whether
    any memory was returned (False where the C library is not glibc)."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
