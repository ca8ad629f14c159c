"""Opens a data directory written by release 0.1 under the current format, once, atomically.

Release 0.1 kept the data table in the layout still used, its catalog as `db:<name>` records
in the meta table, and its indexes only in memory. Upgrading writes the new catalog beside
the old one (indexes not yet ready), fills the indexes a chunk per commit, then in one last
commit marks them ready, removes the old records and stamps the format. Until that commit
the old records stay authoritative: a crash part-way leaves a directory that upgrades afresh.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from fuckbase.storage.interface import BASIC, SORTABLE, IndexDef, StorageFailure
from fuckbase.storage.lmdb import keys as K
from fuckbase.storage.lmdb.catalog import IndexState, SetState

if TYPE_CHECKING:
    from fuckbase.storage.lmdb.store import LmdbStorage, Writer

log = logging.getLogger("fuckbase.storage")

_OLD_DB = b"db:"
_OLD_GC = b"gc:"
_OLD_IDS = b"seq"


def upgrade_if_needed(storage: LmdbStorage) -> None:
    from fuckbase.storage.lmdb.store import _FORMAT_KEY, _GC_SET, _IDS, FORMAT

    env, meta = storage.env, storage.meta
    with env.begin() as txn:
        fmt = txn.get(_FORMAT_KEY, db=meta)
        if fmt == FORMAT:
            return
        if fmt is not None:
            raise StorageFailure(
                f"{storage.path} is in storage format {fmt.decode()!r}, newer than this release reads"
            )
        old = {k[len(_OLD_DB) :].decode(): orjson.loads(v) for k, v in txn.cursor(db=meta) if k.startswith(_OLD_DB)}
        old_gc = [k[len(_OLD_GC) :] for k, _ in txn.cursor(db=meta) if k.startswith(_OLD_GC)]
        old_ids = K.count_of(txn.get(_OLD_IDS, db=meta))
    if not old and not old_gc and not old_ids:
        storage.write(lambda w: w.txn.put(_FORMAT_KEY, FORMAT, db=meta), numbered=False)
        return
    started = time.monotonic()
    log.info("upgrading %s from the format of release 0.1: %d databases", storage.path, len(old))
    plan: list[tuple[str, SetState]] = []

    def prepare(w: Writer) -> None:
        for table in (storage.catalog, storage.index, storage.counts, storage.gc, storage.changelog):
            w.txn.drop(table, delete=False)  # leftovers of an upgrade that was interrupted
        w.txn.put(_IDS, K.id_bytes(old_ids), db=meta)
        for name, rec in old.items():
            sets: dict[str, Any] = {}
            for set_name, srec in rec["sets"].items():
                indexes = [IndexState(_old_definition(iname, d), w.new_id(), ready=False)
                           for iname, d in srec["indexes"].items()]
                st = SetState(set_name, srec["id"], tuple(indexes))
                sets[set_name] = {"id": st.id, "indexes": {
                    ix.definition.name: {"id": ix.id, "field": ix.definition.field, "kind": ix.definition.kind,
                                         "sort_fields": list(ix.definition.sort_fields), "ready": False}
                    for ix in indexes}}
                _count_entries(w, st)
                plan.append((name, st))
            w.save(name, {"id": rec["id"], "auth": rec.get("auth"), "sets": sets})
        for prefix in old_gc:
            w.mark_for_reclaim(_GC_SET, prefix)

    storage.write(prepare, numbered=False)
    for _, st in plan:
        if st.indexes:
            start = st.prefix
            while True:
                last = storage.write(partial(_fill, st=st, start=start), numbered=False)
                if last is None:
                    break
                start = last + b"\x00"

    def finish(w: Writer) -> None:
        for name in old:
            rec = orjson.loads(w.txn.get(name.encode(), db=storage.catalog))
            for srec in rec["sets"].values():
                for irec in srec["indexes"].values():
                    irec["ready"] = True
            w.save(name, rec)
        for k in [k for k, _ in w.txn.cursor(db=meta) if k.startswith((_OLD_DB, _OLD_GC))]:
            w.txn.delete(k, db=meta)
        w.txn.delete(_OLD_IDS, db=meta)
        w.txn.put(_FORMAT_KEY, FORMAT, db=meta)

    storage.write(finish, numbered=False)
    log.info("upgrade of %s done in %.1fs", storage.path, time.monotonic() - started)


def _fill(w: Writer, st: SetState, start: bytes) -> bytes | None:
    from fuckbase.storage.lmdb.store import BUILD_CHUNK

    return w.index_existing(st, list(st.indexes), start, BUILD_CHUNK)


def _old_definition(name: str, d: dict[str, Any]) -> IndexDef:
    if int(d.get("type", 0)) == 1:
        return IndexDef(name, d["field"], SORTABLE, tuple(d.get("sort_fields") or ()))
    return IndexDef(name, d["field"], BASIC)


def _count_entries(w: Writer, st: SetState) -> None:
    n = 0
    cur = w.txn.cursor(db=w.storage.data)
    if cur.set_range(st.prefix):
        for k in cur.iternext(values=False):
            if not k.startswith(st.prefix):
                break
            n += 1
    if n:
        w.txn.put(K.set_count_key(st.prefix), K.count_bytes(n), db=w.storage.counts)
