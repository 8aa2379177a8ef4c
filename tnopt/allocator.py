"""Give freed large arrays back to the operating system (glibc's malloc keeps them otherwise).

glibc serves a block of at least M_MMAP_THRESHOLD bytes with its own mmap and unmaps it on free; the
threshold starts at 128 KiB but is *dynamic*: each mmapped block freed raises it to that block's size
(up to 32 MiB on 64-bit), and the heap's trim threshold (free memory at the heap's top kept rather than
returned) rises with it to twice that. After the first big numpy temporaries are freed, arrays up to that
size come from the heap, and up to 64 MiB of freed heap stays resident at its top; memory below the top
goes back only through malloc_trim.

Setting the threshold explicitly (mallopt) turns both adjustments off: blocks from MMAP_THRESHOLD_BYTES up
are mapped on their own and returned on free, the trim threshold stays at glibc's 128 KiB, and
`trim` (malloc_trim) after the search's release returns what is free below the heap's top.

Why 32 MiB, not lower. A lower threshold maps more arrays on their own and returns them at once, but every
such allocation then costs an mmap/munmap and fresh zeroed pages. Measured on the ResNet-50 row, same
command and files, quiet (bench/RESULTS.md, session 9): fixed at 1 MiB, 642 s and a 4.31 GiB peak; at
32 MiB, 542 s and 4.55 GiB; session 8 (dynamic threshold, no trim) had a 6.60 GiB peak. 32 MiB is the
ceiling glibc's own dynamic threshold stops at, so the allocation pattern is glibc's steady state, without
its 64 MiB trim threshold.

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
# Blocks from this size up are mapped on their own and unmapped on free (the big activation batches and
# moments of a real model); smaller ones come from the heap, which the trim threshold and `trim` return.
MMAP_THRESHOLD_BYTES = 32 << 20
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
