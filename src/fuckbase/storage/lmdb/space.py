"""Disk blocks allocated ahead of what LMDB writes through its mapping.

The engine maps data.mdb writable (LMDB's MDB_WRITEMAP): a commit makes no write() copy of
each page it changed, which on ext4 with large page-cache folios costs ~4 µs a page, more than
the Python of a put. The price: the file is as large as the map, sparse, and a store into a
hole the filesystem cannot fill is a SIGBUS that kills the process, not an error.

So no write transaction touches a page whose blocks are not allocated. Pages up to LMDB's last
page have blocks (they were written); beyond it, a transaction takes new pages one after the
other. Before a Writer adds records it charges their worst case here (`Budget.charge`); when
the charges outgrow what is allocated past the last page, the blocks are allocated
(posix_fallocate) for all of them plus headroom, so that allocating is rare. When the
filesystem cannot give them, the write fails with StorageFull before it stores anything.

The worst case of a record, in pages: a put or delete copies its B-tree path and then splits
every level of it (a put) or copies a sibling on each (a delete that merges pages): twice the
depth, and one more. A long run of records in one table costs at most twice the pages the
table holds (each is copied once at most, and split once at most) and two per record. Bytes
stored count four times over, for values too large for a page. The depth is the deepest
table's plus one (a transaction may split a root), measured again whenever blocks are
allocated.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmdb

from fuckbase.storage.interface import StorageFailure, StorageFull

HEADROOM = 64 << 20  # allocated past what a transaction needs, so that most need no allocation
MARGIN_PAGES = 64  # LMDB's own records in a commit: the table roots, the free-page list
RECORD_BYTES = 16  # a record's header in its page
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Space:
    """One process's handle on data.mdb's allocated blocks. Used under the write lock."""

    def __init__(self, env: lmdb.Environment, path: Path, tables: Sequence[Any]) -> None:
        self._env = env
        self._tables = tables
        self._fd = os.open(path / "data.mdb", os.O_RDWR | os.O_CLOEXEC)
        self.page = int(env.stat()["psize"])
        self._map_size = int(env.info()["map_size"])
        self._allocated = 0  # bytes from the file's start known to have blocks
        with env.begin() as txn:
            self.depth = self._depth(txn)

    def close(self) -> None:
        os.close(self._fd)

    def budget(self, txn: lmdb.Transaction) -> Budget:
        """What the write transaction `txn`, just begun, may store before allocating."""
        base = (int(self._env.info()["last_pgno"]) + 1) * self.page
        return Budget(self, txn, base, self._allocated - base)

    def reserve(self, txn: lmdb.Transaction, base: int, needed: int) -> int:
        """Allocates blocks for `needed` bytes past `base` (LMDB's next page when the
        transaction began), with headroom when there is room for it; the bytes allocated
        past `base`. Raises StorageFull when even `needed` cannot be had."""
        self.depth = self._depth(txn)
        start = max(self._allocated, base)
        for end in (base + needed + HEADROOM, base + needed):
            end = min(end, self._map_size)
            try:
                if end > start:
                    os.posix_fallocate(self._fd, start, end - start)
            except OSError as exc:
                if exc.errno not in _FULL:
                    raise StorageFailure(f"storage error: cannot allocate space in data.mdb: {exc}") from exc
                continue
            self._allocated = max(self._allocated, end)
            return self._allocated - base
        raise StorageFull("the disk is full: the write was not stored")

    def _depth(self, txn: lmdb.Transaction) -> int:
        return max(int(txn.stat(t)["depth"]) for t in self._tables) + 1


class Budget:
    """The space one write transaction has charged and may use (see the module's docstring)."""

    __slots__ = ("_space", "_txn", "_base", "_room", "spent", "random_pages", "page")

    def __init__(self, space: Space, txn: lmdb.Transaction, base: int, room: int) -> None:
        self._space = space
        self._txn = txn
        self._base = base
        self._room = room
        self.page = space.page
        self.random_pages = 2 * space.depth + 1  # the worst case of a record in no particular order
        self.spent = 0
        self.charge(MARGIN_PAGES + self.random_pages)

    def charge(self, pages: int, nbytes: int = 0) -> None:
        """Makes room for `pages` pages and `nbytes` bytes of records before they are stored."""
        self.spent += (pages + 1) * self.page + 4 * nbytes
        if self.spent > self._room:
            self._room = self._space.reserve(self._txn, self._base, self.spent)

    def records(self, n: int, nbytes: int = 0, table: Any = None) -> None:
        """`n` records put or deleted, `nbytes` bytes stored; all in `table`, when given."""
        pages = n * self.random_pages
        if pages > 1024 and table is not None:
            st = self._txn.stat(table)
            pages = min(pages, 2 * (int(st["branch_pages"]) + int(st["leaf_pages"]) + n))
        self.charge(pages, nbytes + RECORD_BYTES * n)
