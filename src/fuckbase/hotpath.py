"""Request threads: one serves at a time, the others stand by.

granian hands requests to a pool of threads. Two threads running Python at once turn every
GIL release (each LMDB call releases it) into a hand-off between them, which measured here
costs a third to a half of the throughput of short requests. So one thread holds the "hot"
role and serves; a request that lands on another thread while the hot one is busy waits a
moment (STANDBY) and then runs anyway. A thread about to block (an index build, a backup, an
fsync wait, password hashing) gives the role up first, so the next request does not wait.
Correctness never depends on this: the engine has its own lock; this only orders the work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

STANDBY = 0.003  # seconds a request on a second thread waits for the hot thread to go idle


class HotRole:
    __slots__ = ("busy", "owner")

    def __init__(self) -> None:
        self.owner: int | None = None
        self.busy = False

    def enter(self) -> None:
        """At the start of a request: take the role if it is free or idle, else stand by."""
        me = threading.get_ident()
        if self.owner != me:
            if self.owner is not None and self.busy:
                time.sleep(STANDBY)
                if self.owner is not None and self.busy and self.owner != me:
                    return  # still busy: run alongside it
            self.owner = me
        self.busy = True

    def leave(self) -> None:
        if self.owner == threading.get_ident():
            self.busy = False

    @contextmanager
    def released(self) -> Iterator[None]:
        """Around a call that blocks or runs long: another thread may serve meanwhile."""
        if self.owner == threading.get_ident():
            self.owner = None
            self.busy = False
        yield


HOT = HotRole()
