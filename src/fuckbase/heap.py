"""How the server's processes use memory: the C allocator's and the cycle collector's settings.

Both defaults suit short scripts, not a server whose requests and long operations allocate
and free the same kinds of objects over and over.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
from collections.abc import Callable

KEPT_FREE_BYTES = 64 << 20
HEAP_BUFFER_BYTES = 32 << 20  # glibc's own upper bound for this setting
QUIET_SECONDS = 2  # without activity before a worker gives back what its requests freed
# net allocations between collections of the youngest generation: above what one request keeps
# alive at once (a 5,000-operation batch: ~30,000 objects; at 10,000 a batch set off three
# collections that walked them all, 6 % of an import's server CPU)
YOUNG_COLLECTION_THRESHOLD = 100_000
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt options


def _glibc(function: str, *args: int) -> None:
    """Calls one of glibc's allocator functions; elsewhere (musl, macOS) the defaults stay."""
    try:
        getattr(ctypes.CDLL(None), function)(*args)
    except (OSError, AttributeError):
        pass


def few_arenas() -> None:
    """Two arenas for the C allocator, set once in the `fuckbase` process for every child (fork
    keeps it). glibc gives every thread that allocates its own arena and keeps what it frees
    there: a restore whose chunks run on a few pool threads grew private memory by 100 MB per
    500k entries that way."""
    _glibc("mallopt", M_ARENA_MAX, 2)


def keep_freed_memory() -> None:
    """For the job process, whose long operations allocate and free large amounts over and over:
    freed memory is kept for reuse, up to KEPT_FREE_BYTES a heap, and buffers up to
    HEAP_BUFFER_BYTES come from the heap rather than being mapped one by one. By default glibc
    gave back a heap's free top beyond 128 KiB and mapped every large buffer afresh, so a
    restore's chunks were faulted in again page by page: a 1M-entry restore took 1.5 to 2.6 s
    from run to run, up to a third of it in the kernel (370k page faults; 35k with these).
    What an operation leaves free is given back when it ends (`give_back`)."""
    _glibc("mallopt", M_TRIM_THRESHOLD, KEPT_FREE_BYTES)
    _glibc("mallopt", M_MMAP_THRESHOLD, HEAP_BUFFER_BYTES)


def give_back() -> None:
    """Returns the free memory the allocator kept to the system: once a long operation (a
    restore, an index build, a backup) has ended, what it freed is not needed soon."""
    _glibc("malloc_trim", 0)


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


class Quiet:
    """Tells, tick by tick, when a count of activity has not moved for `ticks` ticks after it
    last moved: once per burst."""

    def __init__(self, count: int, ticks: int) -> None:
        self._seen = self._given = count
        self._ticks = ticks
        self._quiet = 0

    def tick(self, count: int) -> bool:
        if count != self._seen:
            self._seen, self._quiet = count, 0
            return False
        self._quiet += 1
        if self._quiet >= self._ticks and count != self._given:
            self._given = count
            return True
        return False


async def give_back_when_quiet(activity: Callable[[], int]) -> None:
    """Gives back what a burst of activity freed once `activity()` (a count that grows with
    it) has not moved for QUIET_SECONDS. glibc keeps a freed heap top below its threshold and
    the free memory inside a heap: after a load of 1M puts each worker held ~4 MB so, for as
    long as it ran idle."""
    quiet = Quiet(activity(), QUIET_SECONDS)
    while True:
        await asyncio.sleep(1)  # a tick
        if quiet.tick(activity()):
            give_back()
