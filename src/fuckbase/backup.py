"""Backups: consistent snapshots streamed to an object store, validated all-or-nothing restores.

This module knows the object layout (`backups/<database>/<YYYYMMDD-HHMMSS>.json`,
`backups/full/…`) and the rules around it; it talks to storage only through ObjectStore and to
the data only through the storage interface's Snapshot and RestoreWriter, so it never knows
which backend or which on-disk format is in use.

Every backup gets a sidecar `<name>.sha256` (JSON: checksum, sizes, counts). The sidecar is
created first, with a create-only write, which claims the name: two backups in the same second
— on this node or another — never overwrite each other. Restores verify the checksum when a
sidecar exists (backups made by the original implementation have none).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import zstandard
from prometheus_client.core import Metric

from fuckbase.auth import make_db_auth
from fuckbase.backupformat import (
    FORMAT_VERSION,
    BackupInvalid,
    BackupReader,
    Checksummer,
    DatabaseEnd,
    DatabaseMeta,
    DatabaseStart,
    Entries,
    Record,
    SetStart,
    database_header,
    entry_line,
    set_header,
)
from fuckbase.contract import BACKUP_NAME_PATTERN, MAX_NAME_CHARS, ErrorCode
from fuckbase.encryption import EncryptionError, KeyMissing, Keyring, Unsealer, open_sealed
from fuckbase.errors import ApiError, invalid, not_found
from fuckbase.metrics import counter, gauge
from fuckbase.names import is_database_name, is_key, is_object_name, sort_fields_problem
from fuckbase.objectstore import STALE_SECONDS, AlreadyExists, NotFound, ObjectStore, ObjectStoreError, Written
from fuckbase.storage import (
    BASIC,
    SORTABLE,
    Credentials,
    Database,
    IndexDef,
    RestoreWriter,
    Snapshot,
    StagedDatabase,
    Storage,
)

log = logging.getLogger("fuckbase.backup")

PREFIX = "backups/"
FULL_FOLDER = "full"
EXTENSIONS = {"none": ".json", "gzip": ".json.gz", "zstd": ".json.zst"}
SIDECAR = ".sha256"
PENDING = b"pending"
CHUNK_BYTES = 1 << 20
INFLATE_SLICE = 16 << 10  # compressed bytes decompressed and parsed at a time
CLEANUP_ATTEMPTS = 6  # a failed backup's leftovers are retried for about 10 minutes
CLEANUP_PAUSE = 30.0
_NAME = re.compile(BACKUP_NAME_PATTERN)


def storage_error(code: ErrorCode, exc: ObjectStoreError) -> ApiError:
    """The object store failing, as the client sees it: 504 on a timeout, else 502."""
    return ApiError(504 if exc.kind == "timeout" else 502, code, str(exc))


def parse_name(name: Any) -> re.Match[str]:
    """A restorable backup name: `backups/<folder>/<timestamp>[_n].json[.gz|.zst]`, else 400."""
    if not isinstance(name, str) or not name:
        raise invalid('"backup_name" is required')
    m = _NAME.fullmatch(name)
    if m is None:
        raise invalid(
            '"backup_name" must look like backups/<database>/YYYYMMDD-HHMMSS.json (or .json.gz, .json.zst)'
        )
    return m


@dataclass(frozen=True)
class BaseSnapshot:
    """A base snapshot continuous backup took: where, up to which commit, when, and of what."""

    name: str
    sequence: int
    taken: float
    entries: int
    databases: list[str]


@dataclass
class BackupStats:
    """What /metrics reports about backups."""

    last_success: dict[str, float] = field(default_factory=dict)
    last_duration: dict[str, float] = field(default_factory=dict)
    last_bytes: dict[str, int] = field(default_factory=dict)
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    continuous: dict[str, Any] = field(default_factory=dict)  # the shipper's status, when it runs

    def failed(self, op: str, kind: str) -> None:
        self.failures[(op, kind)] = self.failures.get((op, kind), 0) + 1

    def dump(self) -> dict[str, Any]:
        return {"last_success": dict(self.last_success), "last_duration": dict(self.last_duration),
                "last_bytes": dict(self.last_bytes), "failures": [[op, kind, n] for (op, kind), n in self.failures.items()],
                "continuous": self.continuous}

    @classmethod
    def from_dump(cls, d: dict[str, Any]) -> BackupStats:
        return cls(dict(d.get("last_success", {})), dict(d.get("last_duration", {})), dict(d.get("last_bytes", {})),
                   {(op, kind): n for op, kind, n in d.get("failures", ())}, dict(d.get("continuous") or {}))

    def metrics(self) -> Iterable[Metric]:
        yield gauge("fuckbase_backup_last_success_timestamp_seconds", "Last successful operation",
                    ["operation"], (([k], v) for k, v in self.last_success.items()))
        yield gauge("fuckbase_backup_last_duration_seconds", "Duration of the last successful operation",
                    ["operation"], (([k], v) for k, v in self.last_duration.items()))
        yield gauge("fuckbase_backup_last_bytes", "Size of the last backup created or restored",
                    ["operation"], (([k], v) for k, v in self.last_bytes.items()))
        yield counter("fuckbase_backup_failures", "Failed backup operations by kind",
                      ["operation", "kind"], (([op, kind], n) for (op, kind), n in self.failures.items()))
        c = self.continuous
        if not c:
            return
        yield gauge("fuckbase_continuous_shipping", "1 while continuous backup ships changes", [],
                    [([], 1.0 if c.get("state") == "shipping" else 0.0)])
        yield gauge("fuckbase_continuous_lag_seconds", "Age of the oldest change not yet shipped", [],
                    [([], c.get("lag_seconds", 0.0))])
        yield gauge("fuckbase_continuous_pending_changes", "Commits not yet shipped", [],
                    [([], c.get("pending_changes", 0))])
        yield gauge("fuckbase_continuous_shipped_sequence", "The last commit shipped", [],
                    [([], c.get("shipped_sequence", 0))])
        yield gauge("fuckbase_continuous_shipped_timestamp_seconds", "Up to when the shipped changes are complete",
                    [], [([], c.get("shipped_until", 0.0))])
        yield counter("fuckbase_continuous_requests", "Object-store requests of continuous backup", ["operation"],
                      (([op], n) for op, n in c.get("requests", {}).items()))
        yield counter("fuckbase_continuous_failures", "Continuous backup failures by kind", ["kind"],
                      (([kind], n) for kind, n in c.get("failures", {}).items()))


class BackupService:
    def __init__(self, storage: Storage, store: ObjectStore, compression: str = "none",
                 retention: int = 0, spool_dir: Path | None = None, keyring: Keyring | None = None) -> None:
        self.storage = storage
        self.keyring = keyring  # encrypts every object written, opens encrypted ones read
        self.spool_dir = spool_dir  # where a backup is encoded before it is uploaded
        self.store = store
        self.compression = compression
        self.retention = retention
        self.stats = BackupStats()
        self.restore_lock = asyncio.Lock()
        self._last_auto_sequence = -1
        self._cleanups: set[asyncio.Task[None]] = set()
        # set where continuous backup runs: (generation, sequence, until) it has shipped, which
        # may be newer than what the store shows, so that this node restores up to now
        self.shipped: Callable[[], tuple[str, int, float] | None] = lambda: None

    @property
    def target(self) -> str:
        return self.store.description

    # ------------------------------------------------------------------ create

    async def create(self, database: str | None, automatic: bool = False) -> dict[str, Any]:
        started = time.monotonic()
        if database is not None:
            with self.storage.read() as view:
                view.database(database)  # 404 before any object-store work
        snapshot = self.storage.snapshot()
        sequence = snapshot.sequence()
        spool = _Spool(snapshot, database, self.compression, self.spool_dir, self.keyring)
        counts = spool.counts
        name = None
        try:
            try:
                await self.store.ensure_ready()
                name = await self._claim(database or FULL_FOLDER)
                stored = await self._upload(name, spool, {"database": database or "all", "automatic": automatic})
            except ObjectStoreError as exc:
                self.stats.failed("create", exc.kind)
                await self._release(name)
                raise storage_error(ErrorCode.BACKUP_FAILED, exc) from None
            except BaseException:
                self.stats.failed("create", "error")
                await self._release(name)
                raise
        finally:
            spool.close()
        if automatic:
            self._last_auto_sequence = sequence
        elapsed = time.monotonic() - started
        self.stats.last_success["create"] = time.time()
        self.stats.last_duration["create"] = elapsed
        self.stats.last_bytes["create"] = stored
        log.info("backup %s written: %d entries, %d bytes in %.2fs", name, counts.entries, stored, elapsed)
        return {"backup_name": name, "size": stored, "entries": counts.entries, "database": database or "all"}

    async def _upload(self, name: str, spool: _Spool, about: dict[str, Any]) -> int:
        """Sends the spooled backup, checks what the store holds, then writes its sidecar."""
        written = await self.store.put_stream(name, spool.chunks())
        await self._check_stored(name, spool.stored.hexdigest(), written)
        counts = spool.counts
        sidecar = {"sha256": counts.checksum.hexdigest(), "json_size": counts.checksum.size, "size": written.size,
                   "entries": counts.entries, **about, "format": FORMAT_VERSION}
        await self.store.put_bytes(name + SIDECAR, self.seal(orjson.dumps(sidecar)))
        return written.size

    def seal(self, data: bytes) -> bytes:
        """A small object as it is stored: encrypted when a key is configured."""
        return self.keyring.seal(data) if self.keyring is not None else data

    async def write_base(self, name_of: Callable[[int, float], str]) -> BaseSnapshot:
        """A zstd full backup under the name `name_of(sequence, taken)` gives: continuous
        backup's base snapshot. `taken` is read once the snapshot has begun, so every commit it
        holds is older. Raises ObjectStoreError."""
        snapshot = self.storage.snapshot()
        taken = time.time()
        sequence = snapshot.sequence()
        databases = [db.name for db in snapshot.databases()]
        spool = _Spool(snapshot, None, "zstd", self.spool_dir, self.keyring)
        name = name_of(sequence, taken)
        try:
            await self._upload(name, spool, {"database": "all", "automatic": True, "sequence": sequence, "taken": taken})
        finally:
            spool.close()
        return BaseSnapshot(name, sequence, taken, spool.counts.entries, databases)

    async def _check_stored(self, name: str, digest: str, written: Written) -> None:
        """Checks that the store holds what was sent, so that a store or proxy that damaged it
        on the way fails the backup instead of acknowledging a corrupt one: by the ETag the
        store computed over what it received when that matches ours, else by reading it back."""
        if written.etag is not None and await self.store.etag(name) == written.etag:
            return
        size = written.size
        h = hashlib.sha256()
        got = 0
        async for chunk in await self.store.get_stream(name):
            h.update(chunk)
            got += len(chunk)
        if got != size or h.hexdigest() != digest:
            raise ObjectStoreError(f"the stored {name} differs from what was sent ({got} of {size} bytes read back,"
                                   " checksum mismatch): damaged on the way or by the store", "corrupt")

    async def _release(self, name: str | None) -> None:
        """Forgets the claim of a failed backup in the background: the failing request returns
        at once, and the cleanup retries while the storage recovers."""
        if name is not None:
            task = asyncio.get_running_loop().create_task(self._remove_failed(name))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def _remove_failed(self, name: str) -> None:
        for attempt in range(CLEANUP_ATTEMPTS):
            try:
                await asyncio.gather(self.store.delete(name), self.store.delete(name + SIDECAR))
                return
            except ObjectStoreError as exc:
                log.warning("cleanup of failed backup %s: %s (attempt %d)", name, exc, attempt + 1)
                await asyncio.sleep(CLEANUP_PAUSE * (attempt + 1))

    async def _claim(self, folder: str) -> str:
        """Reserves a fresh name by creating its sidecar; later names in one second get _2, _3…
        A name whose object exists without a sidecar of ours (the original implementation,
        sharing the bucket, writes none) is given back and skipped."""
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        ext = EXTENSIONS[self.compression]
        for n in range(1, 1000):
            name = f"{PREFIX}{folder}/{stamp}{'' if n == 1 else f'_{n:02d}'}{ext}"
            try:
                await self.store.put_bytes(name + SIDECAR, PENDING, create_only=True)
            except AlreadyExists:
                continue
            if not any(o.key == name for o in await self.store.list(name)):
                return name
            await self.store.delete(name + SIDECAR)
        raise ApiError(503, ErrorCode.BACKUP_FAILED, "too many backups in one second")

    async def remove_abandoned(self) -> None:
        """Deletes what backups cut short by a crash left: claims (sidecars still "pending")
        at least an hour old, with whatever part of their object exists."""
        cutoff = datetime.now(UTC).timestamp() - STALE_SECONDS
        try:
            objects = await self.store.list(PREFIX)
            names = [o.key[: -len(SIDECAR)] for o in objects if o.key.endswith(SIDECAR) and o.size == len(PENDING)
                     and o.last_modified.timestamp() < cutoff]
            abandoned = [n for n in names if await self.store.get_bytes(n + SIDECAR) == PENDING]
            if abandoned:
                await self.store.delete_many([k for n in abandoned for k in (n, n + SIDECAR)])
                log.warning("removed %d backups a crash left unfinished: %s", len(abandoned), ", ".join(abandoned))
        except ObjectStoreError as exc:
            log.warning("could not look for backups a crash left unfinished: %s", exc)

    # ------------------------------------------------------------------ list

    async def list(self, database: str | None) -> list[dict[str, Any]]:
        prefix = f"{PREFIX}{database}/" if database else PREFIX
        try:
            objects = await self.store.list(prefix)
        except ObjectStoreError as exc:
            self.stats.failed("list", exc.kind)
            raise storage_error(ErrorCode.LIST_FAILED, exc) from None
        out = []
        for obj in objects:
            m = _NAME.fullmatch(obj.key)
            if m is None:
                continue
            folder, stamp, seq = m.group(1), m.group(2), int(m.group(3) or 1)
            when = datetime.strptime(stamp, "%Y%m%d-%H%M%S").replace(tzinfo=UTC)
            out.append((when, seq, {
                "name": obj.key,
                "timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "size": obj.size,
                "database": "all" if folder == FULL_FOLDER else folder,
            }))
        out.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [entry for _, _, entry in out]

    # ------------------------------------------------------------------ restore and verify

    @staticmethod
    def replaces(name: Any) -> str | None:
        """The database a restore of this backup replaces; None: a full backup, all of them."""
        folder = parse_name(name).group(1)
        return None if folder == FULL_FOLDER else folder

    async def restore(self, name: Any, check: Callable[[Database], None] | None = None,
                      into: str | None = None) -> dict[str, Any]:
        """`check` sees, inside the commit, each database about to be replaced or removed.
        `into` restores a database backup under that name, which must not be in use."""
        m = parse_name(name)
        started = time.monotonic()
        async with self.restore_lock:
            staging = self.storage.restore_writer()
            try:
                staged: dict[str, StagedDatabase] = {}
                result = await self.read(m.group(0), m.group(1) == FULL_FOLDER, m.group(4), staging, staged=staged,
                                         renamed=into is not None)
                if into is not None:
                    for db in staged.values():
                        db.name = into
                    result["databases"] = [into]
                    check = refuse_existing
                await asyncio.to_thread(staging.commit, result["full"], check)
            except BaseException:
                staging.abort()
                raise
        elapsed = time.monotonic() - started
        self.stats.last_success["restore"] = time.time()
        self.stats.last_duration["restore"] = elapsed
        self.stats.last_bytes["restore"] = result["size"]
        log.info("restored %s: %d databases, %d entries in %.2fs", name, len(result["databases"]),
                 result["entries"], elapsed)
        return result

    async def verify(self, name: Any) -> dict[str, Any]:
        m = parse_name(name)
        return await self.read(m.group(0), m.group(1) == FULL_FOLDER, m.group(4), None)

    async def read(self, name: str, full: bool, extension: str, staging: RestoreWriter | None,
                   only: str | None = None, staged: dict[str, StagedDatabase] | None = None,
                   renamed: bool = False) -> dict[str, Any]:
        """Streams the object through the parser; with staging, also writes it aside: every
        database, or with `only` that one alone. `staged` receives the staged databases by name;
        `renamed`: they are restored under another name, so theirs need not be one of ours."""
        op = "restore" if staging is not None else "verify"
        try:
            expected = await self._sidecar(name)
            stream = await self.store.get_stream(name)
            applier = _Applier(staging, full, only, staged, renamed)
            reader = BackupReader()
            checksum = Checksummer()
            unsealer = Unsealer(self.keyring)
            decompress = _decompressor(extension)

            def parse(data: bytes) -> None:
                checksum.update(data)
                if data:
                    applier.apply(reader.feed(data))

            def consume(chunk: bytes | None) -> None:
                """Decrypts, parses (and stages) a chunk on a worker thread; None marks the end.
                The compressed bytes go in by slices: a very compressible backup (1 MB that
                inflates to 70) never has more than a slice's worth of entries in memory."""
                if chunk is None:
                    tail = unsealer.finish()
                    parse((decompress(tail) if tail else b"") + decompress(None))
                    applier.apply(reader.finish())
                    return
                view = memoryview(unsealer.feed(chunk))
                step = INFLATE_SLICE if extension != ".json" else max(1, len(view))
                for start in range(0, len(view), step):
                    parse(decompress(view[start : start + step]))

            size = 0
            async for chunk in stream:
                size += len(chunk)
                await asyncio.to_thread(consume, chunk)
            await asyncio.to_thread(consume, None)
        except NotFound:
            raise not_found(ErrorCode.BACKUP_NOT_FOUND, f"no backup named {name!r}") from None
        except ObjectStoreError as exc:
            self.stats.failed(op, exc.kind)
            raise storage_error(ErrorCode.RESTORE_FAILED, exc) from None
        except (zlib.error, zstandard.ZstdError, EOFError, gzip.BadGzipFile) as exc:
            self.stats.failed(op, "invalid")
            raise BackupInvalid(f"cannot decompress: {exc}") from None
        except KeyMissing as exc:
            self.stats.failed(op, "encrypted")
            raise encrypted(str(exc)) from None
        except EncryptionError as exc:
            self.stats.failed(op, "invalid")
            raise BackupInvalid(str(exc)) from None
        except ApiError:
            self.stats.failed(op, "invalid")
            raise
        if expected is not None and expected.get("sha256") != checksum.hexdigest():
            self.stats.failed(op, "invalid")
            raise BackupInvalid("checksum mismatch: the object was changed or damaged")
        if expected is None and reader.ours:
            self.stats.failed(op, "invalid")
            raise BackupInvalid(f"{name} was written by FuckBase but its checksum file {name}{SIDECAR} is missing,"
                                " so its contents cannot be checked")
        if reader.full is not full:
            self.stats.failed(op, "invalid")
            what = "full backup" if full else "database backup"
            raise BackupInvalid(f"{name} is in the {'full' if full else 'database'} folder but is not a {what}")
        applier.check_complete()
        return {
            "backup_name": name,
            "full": full,
            "databases": applier.names,
            "entries": applier.entries,
            "size": size,
            "checksum": "verified" if expected is not None else "none (the original implementation writes no checksum)",
            "written_by": "fuckbase" if reader.ours else "another implementation",
        }

    async def _sidecar(self, name: str) -> dict[str, Any] | None:
        try:
            raw = await self.store.get_bytes(name + SIDECAR)
        except NotFound:
            return None
        if raw == PENDING:
            raise BackupInvalid("this backup never completed")
        try:
            sidecar = orjson.loads(open_sealed(self.keyring, raw))
        except KeyMissing as exc:
            raise encrypted(str(exc)) from None
        except (orjson.JSONDecodeError, EncryptionError):
            raise BackupInvalid("its checksum file is damaged") from None
        if not isinstance(sidecar, dict):
            raise BackupInvalid("its checksum file is damaged")
        return sidecar

    # ------------------------------------------------------------------ automation

    async def run_schedule(self, interval_minutes: float) -> None:
        """Full backups every interval, skipped when nothing changed; failures retried next tick."""
        while True:
            await asyncio.sleep(interval_minutes * 60)
            if self.storage.sequence() == self._last_auto_sequence:
                continue
            try:
                result = await self.create(None, automatic=True)
                await self.apply_retention()
                log.info("automatic backup %s done", result["backup_name"])
            except ApiError as exc:
                log.error("automatic backup failed: %s", exc.message)
            except Exception:
                log.exception("automatic backup failed")

    async def apply_retention(self) -> None:
        """Keeps the newest N automatic backups; manual ones are never deleted."""
        if self.retention <= 0:
            return
        automatic = []
        for entry in await self.list(None):
            if entry["database"] != "all":
                continue
            try:
                sidecar = await self._sidecar(entry["name"])
            except ApiError:  # unreadable: never deleted on a guess
                continue
            if isinstance(sidecar, dict) and sidecar.get("automatic"):
                automatic.append(entry["name"])
        for name in automatic[self.retention:]:
            await self.store.delete(name)
            await self.store.delete(name + SIDECAR)
            log.info("retention: deleted %s", name)

    @staticmethod
    def created_at(name: str) -> float:
        """When a backup was made, from the timestamp in its name."""
        stamp = parse_name(name).group(2)
        return datetime.strptime(stamp, "%Y%m%d-%H%M%S").replace(tzinfo=UTC).timestamp()

    async def latest_full(self) -> str | None:
        backups = await self.list(FULL_FOLDER)
        return backups[0]["name"] if backups else None


def encrypted(message: str) -> ApiError:
    return ApiError(422, ErrorCode.BACKUP_ENCRYPTED, message + "; give its key with --backup-encryption-key-file"
                    " or FUCKBASE_BACKUP_ENCRYPTION_KEY (old keys after the current one)")


def refuse_existing(db: Database) -> None:
    """The commit check of a restore into a new name: nothing in use is replaced."""
    raise ApiError(409, ErrorCode.DB_ALREADY_EXISTS,
                   f"database {db.name!r} already exists: restore into a name not in use, or drop it first")


# ---------------------------------------------------------------------- encoding


class _Spool:
    """A backup's bytes, encoded from its snapshot into an unlinked local file by a thread
    that goes as fast as it can and then ends the snapshot. However slow or frozen the object
    store is, the snapshot (which keeps the storage from reusing the pages it sees) lasts only
    as long as the encoding; the upload reads the file as it grows. Memory stays flat."""

    def __init__(self, snapshot: Snapshot, database: str | None, compression: str, directory: Path | None,
                 keyring: Keyring | None) -> None:
        self.counts = _Counts()
        self.stored = hashlib.sha256()  # of the bytes as uploaded (compressed)
        self._file = tempfile.TemporaryFile(dir=directory)
        self._fd = self._file.fileno()
        self._written = 0
        self._done = False
        self._abandoned = False
        self._error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._progress = asyncio.Event()
        self._encryptor = keyring.encryptor() if keyring is not None else None
        threading.Thread(target=self._produce, args=(snapshot, database, compression),
                         name="fuckbase-backup-encode", daemon=True).start()

    def _produce(self, snapshot: Snapshot, database: str | None, compression: str) -> None:
        try:
            compress = _compressor(compression)
            parts: list[bytes] = []
            size = 0
            for line in _backup_lines(snapshot, database, self.counts):
                self.counts.checksum.update(line)
                parts.append(line)
                size += len(line)
                if size >= CHUNK_BYTES:
                    self._append(self._sealed(compress(b"".join(parts))))
                    parts, size = [], 0
                    if self._abandoned:
                        return
            self._append(self._sealed(compress(b"".join(parts)) + compress(None), end=True))
        except BaseException as exc:  # handed to the upload, which fails with it
            self._error = exc
        finally:
            snapshot.close()
            self._done = True
            self._loop.call_soon_threadsafe(self._progress.set)

    def _sealed(self, data: bytes, end: bool = False) -> bytes:
        if self._encryptor is None:
            return data
        return self._encryptor.update(data) + (self._encryptor.finish() if end else b"")

    def _append(self, data: bytes) -> None:
        self.stored.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._written += len(data)
        self._loop.call_soon_threadsafe(self._progress.set)

    async def chunks(self) -> AsyncIterator[bytes]:
        offset = 0
        while True:
            if offset < self._written:
                n = min(self._written - offset, CHUNK_BYTES)
                yield os.pread(self._fd, n, offset)
                offset += n
                continue
            if self._done:
                if self._error is not None:
                    raise self._error
                return
            self._progress.clear()
            if offset == self._written and not self._done:
                await self._progress.wait()

    def close(self) -> None:
        self._abandoned = True
        self._file.close()


@dataclass
class _Counts:
    checksum: Checksummer = field(default_factory=Checksummer)
    entries: int = 0


def _index_map(db: Database) -> dict[str, Any]:
    """Index definitions in the original's shape: one map per database, keyed by index name."""
    out: dict[str, Any] = {}
    for set_name, info in db.sets.items():
        for iname, d in info.indexes.items():
            idef: dict[str, Any] = {"name": iname, "set_name": set_name, "field": d.field,
                                    "type": 1 if d.kind == SORTABLE else 0}
            if d.sort_fields:
                idef["sort_fields"] = list(d.sort_fields)
            key = iname if iname not in out else f"{set_name}/{iname}"
            out[key] = idef
    return out


def _database_lines(snapshot: Snapshot, db: Database, counts: _Counts, head: bytes) -> Iterator[bytes]:
    yield head + b"\n"
    for i, set_name in enumerate(sorted(db.sets)):
        yield (b"," if i else b"") + set_header(set_name) + b"\n"
        first = True
        for key, raw in snapshot.entries(db, set_name):
            yield entry_line(first, key, raw)
            first = False
            counts.entries += 1
        yield b"}}\n"
    yield b"}}\n"


def _header(db: Database) -> bytes:
    return database_header(db.name, _index_map(db), dict(db.auth) if db.auth else None)


def _backup_lines(snapshot: Snapshot, database: str | None, counts: _Counts) -> Iterator[bytes]:
    databases = snapshot.databases()
    if database is not None:
        db = next((d for d in databases if d.name == database), None)
        if db is None:
            raise not_found(ErrorCode.DB_NOT_FOUND, f"database {database!r} not found")
        head = b'{"fuckbase_format":%d,' % FORMAT_VERSION + _header(db)[1:]
        yield from _database_lines(snapshot, db, counts, head)
        return
    yield b'{"fuckbase_format":%d,"databases":{\n' % FORMAT_VERSION
    set_count = 0
    for i, db in enumerate(databases):
        head = (b"," if i else b"") + orjson.dumps(db.name) + b":" + _header(db)
        yield from _database_lines(snapshot, db, counts, head)
        set_count += len(db.sets)
    metadata = {
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "version": "1.0.0",
        "database_count": len(databases),
        "set_count": set_count,
        "entry_count": counts.entries,
    }
    yield b'},"metadata":' + orjson.dumps(metadata) + b"}\n"


def _compressor(kind: str) -> Callable[[bytes | None], bytes]:
    """f(data) compresses a chunk; f(None) flushes the end of the stream."""
    if kind == "gzip":
        z = zlib.compressobj(1, zlib.DEFLATED, 31)
        return lambda data: z.compress(data) if data is not None else z.flush()
    if kind == "zstd":
        c = zstandard.ZstdCompressor(level=3).compressobj()
        return lambda data: c.compress(data) if data is not None else c.flush()
    return lambda data: data if data is not None else b""


def _decompressor(extension: str) -> Callable[[bytes | memoryview | None], bytes]:
    if extension == ".json.gz":
        z = zlib.decompressobj(47)

        def gunzip(data: bytes | memoryview | None) -> bytes:
            if data is not None:
                return z.decompress(data)
            if not z.eof:
                raise EOFError("the compressed stream ends early")
            return z.flush()

        return gunzip
    if extension == ".json.zst":
        d = zstandard.ZstdDecompressor().decompressobj()

        def unzstd(data: bytes | memoryview | None) -> bytes:
            if data is not None:
                return d.decompress(data)
            if not d.eof:
                raise EOFError("the compressed stream ends early")
            return b""

        return unzstd
    return lambda data: bytes(data) if data is not None else b""


# ---------------------------------------------------------------------- applying records


class _Applier:
    """Validates records and, when restoring, writes them into the staging area (on a worker
    thread: each batch of entries is a commit of its own)."""

    def __init__(self, staging: RestoreWriter | None, full: bool, only: str | None = None,
                 staged: dict[str, StagedDatabase] | None = None, renamed: bool = False) -> None:
        self.staging = staging
        self.full = full
        self.only = only
        self.renamed = renamed
        self.staged = staged if staged is not None else {}
        self._undecided = False  # with `only`: the current database's name is not known yet
        self.names: list[str] = []
        self.entries = 0
        self._db: StagedDatabase | None = None
        self._db_fields: dict[str, Any] = {}
        self._set_name: str | None = None
        self._databases_seen = 0

    def apply(self, records: list[Record]) -> None:
        for rec in records:
            if isinstance(rec, Entries):
                self._entries(rec)
            elif isinstance(rec, SetStart):
                self._set_start(rec.name)
            elif isinstance(rec, DatabaseMeta):
                self._meta(rec.fields)
            elif isinstance(rec, DatabaseStart):
                self._databases_seen += 1
                if not self.full and self._databases_seen > 1:
                    raise BackupInvalid("a database backup holds more than one database")
                db: StagedDatabase = (self.staging.add_database() if self.staging is not None and self.only is None
                                      else _Unstaged())
                self._undecided = self.staging is not None and self.only is not None
                self._db = db
                self._db_fields = {}
                self._set_name = None
            elif isinstance(rec, DatabaseEnd):
                self._end_database()

    def _need_db(self) -> StagedDatabase:
        if self._db is None:
            raise BackupInvalid("data outside a database")
        return self._db

    def _target(self) -> RestoreWriter | None:
        """Where the current database's contents go: nowhere for a database not restored."""
        if self._undecided:
            raise BackupInvalid("a database's contents come before its name")
        return self.staging if not isinstance(self._db, _Unstaged) else None

    def _meta(self, fields: dict[str, Any]) -> None:
        db = self._need_db()
        self._db_fields.update(fields)
        if "name" in fields:
            name = fields["name"]
            if not isinstance(name, str) or not name:
                raise BackupInvalid(f"bad database name {name!r}")
            if not self.renamed and not is_database_name(name):
                raise BackupInvalid(f"bad database name {name!r}" + ("" if self.full else
                                    ': restore it under a name of ours with "as"'))
            if db.name is not None and db.name != name:
                raise BackupInvalid("a database has two names")
            db.name = name
            if self._undecided:  # restoring one database of several: stage it alone
                self._undecided = False
                if name == self.only and self.staging is not None:
                    db = self._db = self.staging.add_database()
                    db.name = name
        if "fuckbase_auth" in fields:
            auth = fields["fuckbase_auth"]
            if auth is not None:
                if (not isinstance(auth, dict) or not isinstance(auth.get("username"), str)
                        or not isinstance(auth.get("hash"), str)):
                    raise BackupInvalid("malformed fuckbase_auth")
                db.auth = {"username": auth["username"], "hash": auth["hash"]}
        elif "auth" in fields and db.auth is None:
            db.auth = _plaintext_auth(fields["auth"])
        if "indexes" in fields:
            self._indexes(db, fields["indexes"])

    def _indexes(self, db: StagedDatabase, indexes: Any) -> None:
        if indexes is None:
            return
        if not isinstance(indexes, dict):
            raise BackupInvalid('"indexes" must be an object')
        for key, d in indexes.items():
            if not isinstance(d, dict):
                raise BackupInvalid(f"index {key!r} is malformed")
            name, set_name, fld = d.get("name") or key, d.get("set_name"), d.get("field")
            kind = d.get("type", 0)
            sort_fields = d.get("sort_fields") or []
            if (not all(isinstance(v, str) and v for v in (name, set_name, fld))
                    or kind not in (0, 1)
                    or not isinstance(sort_fields, list)
                    or not all(isinstance(f, str) and f for f in sort_fields)
                    or (kind == 1 and not sort_fields)):
                raise BackupInvalid(f"index {key!r:.80} is malformed")
            if not all(is_object_name(v) for v in (name, set_name, fld)):  # the names the API accepts
                raise BackupInvalid(f"index {key!r:.80}: names must be 1-{MAX_NAME_CHARS} characters without control characters")
            problem = sort_fields_problem(sort_fields) if kind == 1 else None
            if problem is not None:
                raise BackupInvalid(f"index {key!r:.80}: {problem}")
            target = self._target()
            if target is not None:
                assert isinstance(name, str) and isinstance(fld, str) and isinstance(set_name, str)
                if kind == 1:
                    definition = IndexDef(name, fld, SORTABLE, tuple(sort_fields))
                else:
                    definition = IndexDef(name, fld, BASIC)
                try:
                    target.add_index(db, set_name, definition)
                except ValueError as exc:
                    raise BackupInvalid(str(exc)) from None

    def _set_start(self, name: Any) -> None:
        db = self._need_db()
        if not is_object_name(name):
            raise BackupInvalid(f"bad set name {name!r}")
        self._set_name = name
        target = self._target()
        if target is not None:
            target.add_set(db, name)

    def _entries(self, rec: Entries) -> None:
        if self._set_name is None:
            raise BackupInvalid("entries outside a set")
        batch = []
        for key, value, raw in rec.items:
            if not is_key(key):
                raise BackupInvalid(f"bad key {key!r:.80}")
            if raw is None:
                try:
                    raw = orjson.dumps(value)
                except TypeError as exc:
                    raise BackupInvalid(f"bad value for key {key!r:.80}: {exc}") from None
            batch.append((key, value, raw))
        self.entries += len(batch)
        target = self._target()
        if target is not None:
            target.write(self._need_db(), self._set_name, batch)

    def _end_database(self) -> None:
        db = self._need_db()
        if db.name is None:
            raise BackupInvalid('a database has no "name"')
        if "sets" not in self._db_fields:
            raise BackupInvalid(f'database {db.name!r} has no "sets"')
        if db.name in self.names:
            raise BackupInvalid(f"database {db.name!r} appears twice")
        self.names.append(db.name)
        if self.staging is not None and not isinstance(db, _Unstaged):
            self.staged[db.name] = db
        self._db = None
        self._set_name = None

    def check_complete(self) -> None:
        if self._db is not None:
            raise BackupInvalid("the backup ends inside a database")
        if not self.full and len(self.names) != 1:
            raise BackupInvalid("a database backup must hold exactly one database")


@dataclass
class _Unstaged:
    """A database read by a verify: the same checks, nothing written."""

    name: str | None = None
    auth: Credentials | None = None


def _plaintext_auth(auth: Any) -> dict[str, str] | None:
    """The original writes {"Username","Password","Enabled"} in plaintext: hash it on the way in."""
    if auth is None:
        return None
    if not isinstance(auth, dict):
        raise BackupInvalid('"auth" must be an object')
    lowered = {str(k).lower(): v for k, v in auth.items()}
    user, password = lowered.get("username"), lowered.get("password")
    enabled = lowered.get("enabled", True)
    if not enabled or not user or not password:
        return None
    if not isinstance(user, str) or not isinstance(password, str):
        raise BackupInvalid('"auth" username and password must be strings')
    return make_db_auth(user, password)
