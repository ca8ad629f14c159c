"""How the server's processes use memory: the C allocator's and the cycle collector's settings.

Both defaults suit short scripts, not a server whose requests and long operations allocate
and free the same kinds of objects over and over.
"""

from __future__ import annotations

import ctypes
import gc

KEPT_FREE_BYTES = 64 << 20
HEAP_BUFFER_BYTES = 32 << 20  # glibc's own upper bound for this setting
YOUNG_COLLECTION_THRESHOLD = 10_000  # net allocations between collections of the youngest generation


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def tune_malloc() -> None:
    """glibc's allocator, set once in the `fuckbase` process for every child (fork keeps it):
    - Two arenas. glibc gives every thread that allocates its own arena and keeps what it frees
      there: a restore whose chunks run on a few pool threads grew private memory by 100 MB per
      500k entries that way.
    - Freed memory kept for reuse, up to KEPT_FREE_BYTES a heap, and buffers up to
      HEAP_BUFFER_BYTES taken from the heap rather than mapped one by one. By default glibc gave
      back a heap's free top beyond 128 KiB and mapped every buffer over it afresh, so a
      restore's chunks were faulted in again page by page: a 1M-entry restore took 1.5 to 2.6 s
      from run to run, up to a third of it in the kernel (370k page faults; 35k with these).
      What a long operation leaves free is given back when it ends (`give_back`)."""
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc = _libc()
    try:
        if libc is not None:
            libc.mallopt(m_arena_max, 2)
            libc.mallopt(m_trim_threshold, KEPT_FREE_BYTES)
            libc.mallopt(m_mmap_threshold, HEAP_BUFFER_BYTES)
    except AttributeError:
        pass  # not glibc


def give_back() -> None:
    """Returns the free memory the allocator kept to the system: once a long operation (a
    restore, an index build, a backup) has ended, what it freed is not needed soon."""
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass  # not glibc


def settle() -> None:
    """Called by a child once it is ready to serve. Requests make almost no reference cycles
    (what they allocate dies by its reference count), yet with Python's default thresholds a
    burst of objects alive at once (pipelined puts waiting for their group commit, a batch's
    operations, a restore's parsed chunk) set off a young collection every 700 allocations that
    walked them all and promoted them, up to full collections of the whole heap: a quarter to a
    third of a worker's CPU under pipelined puts. What start-up built lives as long as the
    process: frozen, no collection walks it again."""
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, 10, 10)
