"""Continuous backup: the change sequence shipped to the object store every second, and
restores to any instant of the window it covers.

Layout, beside the seed's `backups/<database>/…` and `backups/full/…` (which stay as they are):

    continuous/lease.json                                   which node ships (one at a time)
    continuous/<generation>/snapshots/<sequence>-<taken ms>.json.zst (+ .sha256)
    continuous/<generation>/segments/<after>-<upto>-<until ms>.jsonl.zst
    continuous/<generation>/databases.json                  when each database existed

A generation is one data dir's stream: sequence numbers mean something only within it, so a
node restored from the bucket starts a new one. A snapshot is a full backup in the usual format
holding every commit up to its sequence, and nothing newer than its time. A segment holds every
change with a sequence in (after, upto], and vouches that nothing else was committed before
`until`. A restore to an instant takes the newest snapshot taken at or before it and replays
the changes after it up to that instant; a missing or damaged segment on the way is refused,
never skipped.

Segments are zstd-compressed JSON Lines: a header line, one line per commit
(`{"s": sequence, "t": time, "ops": [...]}`), and a trailer with the count and the SHA-256 of
everything before it. Each second's changes make a small segment; every COMPACT_SECONDS the
node writes one segment for the whole period from its local log (kept until then) and deletes
the small ones, so a busy hour leaves a handful of objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import zstandard

from fuckbase.backup import INFLATE_SLICE, SIDECAR, BackupService, encrypted, refuse_existing, storage_error
from fuckbase.backupformat import BackupInvalid
from fuckbase.contract import INSTANT_PATTERN, ErrorCode
from fuckbase.encryption import EncryptionError, KeyMissing, Keyring, Unsealer, open_sealed
from fuckbase.errors import ApiError, invalid, not_found
from fuckbase.objectstore import AlreadyExists, NotFound, ObjectStore, ObjectStoreError
from fuckbase.storage import (
    BASIC,
    SORTABLE,
    Change,
    Database,
    IndexDef,
    RestoreWriter,
    StagedDatabase,
    Storage,
    StorageError,
    StorageUnavailable,
)

log = logging.getLogger("fuckbase.continuous")

ROOT = "continuous/"
LEASE = ROOT + "lease.json"
CONSUMER = "continuous"  # the storage's change-sequence consumer
FAILURE_KINDS = ("lease", "stream", "error", "retention")  # what /metrics counts by kind
STATE_FILE = "continuous.json"  # in the data dir: this node's id and generation
SEGMENT_FORMAT = 1
LEASE_TTL = 60.0  # a lease not renewed for this long may be taken over by another node
LEASE_RENEW = 10.0
LEASE_RETRY = 5.0  # seconds between tries of a node refused by another's lease
COMPACT_SECONDS = 600.0
COMPACT_SEGMENTS = 600  # small segments that trigger a compaction before COMPACT_SECONDS
SEGMENT_CHANGES = 50_000  # commits per small segment at most; more are shipped in several
READ_CHUNK = 10_000  # commits read from the local log at once
RETRY_PAUSE_MAX = 30.0
SNAPSHOT_SPACING = 60.0  # seconds at least between snapshots the volume of changes calls for (or the interval)
RETENTION_CHECK = 3600.0  # seconds between retention rounds (and after every snapshot)

_SNAPSHOT = re.compile(r"continuous/([0-9TZ]{16}-[0-9a-f]{8})/snapshots/(\d{20})-(\d{13})\.json\.zst")
_HISTORY = re.compile(r"continuous/([0-9TZ]{16}-[0-9a-f]{8})/databases\.json")
_SEGMENT = re.compile(r"continuous/([0-9TZ]{16}-[0-9a-f]{8})/segments/(\d{20})-(\d{20})-(\d{13})\.jsonl\.zst")


def _ms(t: float) -> str:
    return f"{int(t * 1000):013d}"


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_instant(text: Any) -> float:
    """An RFC 3339 time with its offset (`2026-12-01T14:00:00Z`, fractions allowed), else 400."""
    if not isinstance(text, str) or not re.fullmatch(INSTANT_PATTERN, text):
        raise invalid(f'"at" must be an RFC 3339 time with its offset, e.g. 2026-12-01T14:00:00Z (got {text!r:.60})')
    try:
        t = datetime.fromisoformat(text.upper()).timestamp()
        rfc3339(t)  # in UTC too it must fall within years 1-9999
    except (ValueError, OverflowError, OSError):
        raise invalid(f'"at" is not a valid date and time: {text!r:.60}') from None
    return t


# ---------------------------------------------------------------------- segments


def _restores(change: Change) -> bool:
    """Whether a commit is a restore (the text test is cheap; the parse makes it exact)."""
    return b'["restore",' in change.record and any(op[0] == "restore" for op in orjson.loads(change.record)["ops"])


class SegmentEncoder:
    """Encodes commits into one segment, compressed as they come, into a spooled temp file."""

    def __init__(self, generation: str, after: int, directory: Path | None, level: int) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=8 << 20, dir=str(directory) if directory else None)  # noqa: SIM115
        self._z = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj()
        self._sha = hashlib.sha256()
        self._generation = generation
        self.after = after
        self.count = 0
        self._lines: list[bytes] = []

    def add(self, changes: Iterable[Change]) -> None:
        for c in changes:  # the storage's record, with the sequence added in front
            self._lines.append(b'{"s":%d,%b' % (c.sequence, c.record[1:]))
            self.count += 1
        self._flush()

    def _flush(self) -> None:
        if self._lines:
            data = b"\n".join(self._lines) + b"\n"
            self._lines = []
            self._write(data)

    def _write(self, data: bytes) -> None:
        self._sha.update(data)
        self._file.write(self._z.compress(data))

    def start(self) -> None:
        self._write(orjson.dumps({"fuckbase_changes": SEGMENT_FORMAT, "generation": self._generation,
                                  "after": self.after}) + b"\n")

    def finish(self, upto: int, until: float) -> bytes:
        """The whole compressed segment; the trailer vouches for its range and content."""
        self._flush()
        trailer = {"end": True, "upto": upto, "until": until, "changes": self.count, "sha256": self._sha.hexdigest()}
        self._file.write(self._z.compress(orjson.dumps(trailer) + b"\n") + self._z.flush())
        self._file.seek(0)
        data = self._file.read()
        self._file.close()
        return bytes(data)


class SegmentReader:
    """Reads one segment from its chunks (decrypting it when it is encrypted) and hands each
    commit in (`start`, `at`] to `apply`, on whatever thread feeds it. Every line is checked
    against the header and the trailer's checksum at the end; a segment cut short or damaged
    raises BackupInvalid naming it."""

    def __init__(self, key: str, after: int, upto: int, keyring: Keyring | None, start: int, at: float,
                 apply: Callable[[dict[str, Any]], None]) -> None:
        self.check = _SegmentCheck(key, after, upto)
        self._key = key
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._unsealer = Unsealer(keyring)
        self._pending = b""
        self._start, self._at, self._apply = start, at, apply
        self.reached_at = False  # a commit after `at` came: the replay is done

    def feed(self, chunk: bytes) -> bool:
        """True once a commit after `at` has been seen (the rest need not be read)."""
        with self._errors():
            view = memoryview(self._unsealer.feed(chunk))
            for start in range(0, len(view), INFLATE_SLICE):  # bounded memory, however well it compressed
                self._pending += self._d.decompress(view[start : start + INFLATE_SLICE])
                *lines, self._pending = self._pending.split(b"\n")
                for line in lines:
                    rec = self.check.line(line)
                    if rec is None or rec["s"] <= self._start:
                        continue
                    if rec["t"] > self._at:
                        self.reached_at = True
                        return True
                    self._apply(rec)
        return False

    def finish(self) -> None:
        with self._errors():
            tail = self._unsealer.finish()
            if tail:
                self._pending += self._d.decompress(tail)
        if not self._d.eof or self._pending:
            raise self.check.bad("is cut short")
        self.check.end()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except KeyMissing as exc:
            raise encrypted(f"segment {self._key}: {exc}") from None
        except (zstandard.ZstdError, orjson.JSONDecodeError, EncryptionError) as exc:
            raise self.check.bad(f"is damaged ({exc})") from None


class _SegmentCheck:
    """Checks a segment's lines as they come: header, commits in range, trailer."""

    def __init__(self, key: str, after: int, upto: int) -> None:
        self.key, self.after, self.upto = key, after, upto
        self._sha = hashlib.sha256()
        self._header = False
        self._trailer: dict[str, Any] | None = None
        self._count = 0

    def bad(self, why: str) -> BackupInvalid:
        return BackupInvalid(f"segment {self.key} (changes {self.after + 1}-{self.upto}) {why}: the changes after"
                             f" sequence {self.after} cannot be replayed")

    def line(self, line: bytes) -> dict[str, Any] | None:
        """The commit on this line, or None for the header and the trailer."""
        if self._trailer is not None:
            raise self.bad("has data after its end")
        rec = orjson.loads(line)
        if not self._header:
            if not isinstance(rec, dict) or rec.get("fuckbase_changes") != SEGMENT_FORMAT or rec.get("after") != self.after:
                raise self.bad("has a wrong header")
            self._header = True
            self._sha.update(line + b"\n")
            return None
        if isinstance(rec, dict) and rec.get("end") is True:
            self._trailer = rec
            return None
        self._sha.update(line + b"\n")
        self._count += 1
        if not isinstance(rec, dict) or not isinstance(rec.get("s"), int) or not self.after < rec["s"] <= self.upto:
            raise self.bad("holds a change outside its range")
        return rec

    def end(self) -> None:
        t = self._trailer
        if t is None or t.get("sha256") != self._sha.hexdigest() or t.get("changes") != self._count \
                or t.get("upto") != self.upto:
            raise self.bad("fails its checksum")


# ---------------------------------------------------------------------- what the store holds


@dataclass(frozen=True)
class SnapshotObject:
    key: str
    generation: str
    sequence: int
    taken: float


@dataclass(frozen=True)
class SegmentObject:
    key: str
    generation: str
    after: int
    upto: int
    until: float


def _names_after(names: set[str], event: dict[str, Any]) -> set[str]:
    """The databases after one history event."""
    if "set" in event:
        names = set(event["set"])
    swapped = set(event.get("replaced", []))
    if event.get("all"):
        names = set()
    return (names | set(event.get("add", [])) | swapped) - set(event.get("drop", []))


class DatabaseHistory:
    """When each database of one generation existed, and when a restore replaced it (the log
    cannot rebuild it from then until the next snapshot): what the per-database ranges of
    /backup/list come from, without reading a segment. The shipper keeps it in
    `continuous/<generation>/databases.json`, rewritten with the segment that holds a
    creation, drop or restore, and at each snapshot whose databases differ from it.

    Events, oldest first: {"s", "t"} and any of "snapshot" (a base: what was replaced can be
    rebuilt again), "set" (every database, at a snapshot), "add", "drop", "replaced" (names a
    restore swapped in), "all" (the restore replaced every database)."""

    def __init__(self, events: list[dict[str, Any]] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.names: set[str] | None = None  # the databases now; None before a snapshot says
        self._replaced = False  # a restore since the last snapshot
        for event in events or []:
            self._apply(event)
            self.events.append(event)

    @classmethod
    def from_bytes(cls, data: bytes) -> DatabaseHistory:
        events = orjson.loads(data)["events"]
        if not isinstance(events, list) or not all(isinstance(e, dict) and {"s", "t"} <= e.keys() for e in events):
            raise ValueError("not a database history")
        return cls(events)

    def to_bytes(self, generation: str) -> bytes:
        return orjson.dumps({"generation": generation, "events": self.events})

    @property
    def sequence(self) -> int:
        return int(self.events[-1]["s"]) if self.events else 0

    def _apply(self, event: dict[str, Any]) -> None:
        self._replaced = "replaced" in event or (self._replaced and not event.get("snapshot"))
        if "set" in event or self.names is not None:
            self.names = _names_after(self.names or set(), event)

    def note_snapshot(self, sequence: int, taken: float, databases: Iterable[str]) -> bool:
        """Takes in a base snapshot and what it holds; True when that says something new (the
        databases differ, or a restore since the last snapshot can now be rebuilt)."""
        event: dict[str, Any] = {"s": sequence, "t": taken, "snapshot": True}
        names = set(databases)
        if self.names != names:
            event["set"] = sorted(names)
        elif not self._replaced:
            return False
        self._apply(event)
        self.events.append(event)
        return True

    def note(self, changes: Iterable[Change]) -> bool:
        """Takes in the creations, drops and restores among shipped changes newer than what it
        holds; True when it changed. Changes before its first snapshot say nothing."""
        changed = False
        for change in changes:
            if self.names is None or change.sequence <= self.sequence or not (
                    b'_database",' in change.record or b'["restore",' in change.record):
                continue
            event: dict[str, Any] = {}
            for op in change.ops:
                if op[0] == "create_database":
                    event.setdefault("add", []).append(op[1])
                elif op[0] == "drop_database":
                    event.setdefault("drop", []).append(op[1])
                elif op[0] == "restore":
                    event.setdefault("replaced", []).extend(op[1])
                    event["all"] = event.get("all", False) or bool(op[2])
            if event:
                event.update(s=change.sequence, t=change.time)
                self._apply(event)
                self.events.append(event)
                changed = True
        return changed

    def lifetimes(self) -> dict[str, list[tuple[float, float]]]:
        """Per database, the spans [from, to) it existed and could be rebuilt from the log."""
        lived: dict[str, list[tuple[float, float]]] = {}
        since: dict[str, float] = {}  # databases restorable now, and since when
        names: set[str] = set()
        replaced: set[str] = set()
        every = False  # a restore replaced every database: none can be rebuilt until a snapshot
        for event in self.events:
            names = _names_after(names, event)
            if event.get("snapshot"):
                replaced, every = set(), False
            every = every or bool(event.get("all"))
            replaced |= set(event.get("replaced", []))
            now = set() if every else names - replaced
            for name in set(since) - now:
                lived.setdefault(name, []).append((since.pop(name), event["t"]))
            for name in now - set(since):
                since[name] = event["t"]
        for name, start in since.items():
            lived.setdefault(name, []).append((start, math.inf))
        return lived


@dataclass
class Generation:
    name: str
    snapshots: list[SnapshotObject] = field(default_factory=list)  # by sequence
    segments: list[SegmentObject] = field(default_factory=list)
    # from the node shipping it (its lease, or the shipper itself): (S, T) says that every
    # change committed before T has a sequence of at most S, so a chain that reaches S holds
    # the state at T, and a quiet node's window grows without a segment a second
    vouched: tuple[int, float] | None = None
    unfinished: list[str] = field(default_factory=list)  # snapshot objects without their sidecar
    history_key: str | None = None
    history: DatabaseHistory | None = None  # read only for the listing

    def vouched_until(self, end: int) -> float | None:
        """How far the vouch extends a chain that ends at sequence `end`, if it does."""
        if self.vouched is None or end < self.vouched[0]:
            return None
        return self.vouched[1]

    def chain(self, start: int) -> Iterator[SegmentObject]:
        """Segments that continue from `start` one after another, the longest reach first;
        stops at the first sequence no segment continues from."""
        pos = start
        while True:
            nxt = max((s for s in self.segments if s.after <= pos < s.upto), key=lambda s: s.upto, default=None)
            if nxt is None:
                return
            yield nxt
            pos = nxt.upto

    def reach(self, snap: SnapshotObject) -> tuple[int, float]:
        """How far a snapshot and the unbroken chain of segments after it go: (sequence, time)."""
        end, pos = snap.taken, snap.sequence
        for seg in self.chain(snap.sequence):
            end, pos = max(end, seg.until), seg.upto
        return pos, max(end, self.vouched_until(pos) or end)

    def lost_after(self, pos: int) -> int | None:
        """A sequence the stream is known to have reached beyond `pos`, where its segments
        stop: evidence that a segment is missing. Retention removes segments only from the
        start of a generation, so below the lowest one left nothing counts as lost."""
        if not self.segments or pos < min(seg.after for seg in self.segments):
            return None
        reached = max([seg.upto for seg in self.segments] + ([self.vouched[0]] if self.vouched else []))
        return reached if reached > pos else None


def _stream_end(gen: Generation) -> int | None:
    """The last sequence a generation holds (its snapshots and segments), if any."""
    return max([*(s.upto for s in gen.segments), *(s.sequence for s in gen.snapshots)], default=None)


async def timeline(store: ObjectStore, shipped: tuple[str, int, float] | None = None, *,
                   histories: bool = False, keyring: Keyring | None = None) -> dict[str, Generation]:
    """Every generation in the store, by name (which sorts by when it began); `shipped` is
    what this node's own shipper vouches for beyond what the store shows. With `histories`,
    each generation's database history is read too (opened with `keyring`)."""
    gens: dict[str, Generation] = {}
    objects = await store.list(ROOT)
    keys = {obj.key for obj in objects}
    leased = LEASE in keys
    for obj in objects:
        if m := _SNAPSHOT.fullmatch(obj.key):
            gen = gens.setdefault(m.group(1), Generation(m.group(1)))
            if obj.key + SIDECAR not in keys:  # being written, or left by a crash: not a base
                gen.unfinished.append(obj.key)
                continue
            gen.snapshots.append(SnapshotObject(obj.key, m.group(1), int(m.group(2)), int(m.group(3)) / 1000))
        elif m := _SEGMENT.fullmatch(obj.key):
            gen = gens.setdefault(m.group(1), Generation(m.group(1)))
            gen.segments.append(SegmentObject(obj.key, m.group(1), int(m.group(2)), int(m.group(3)),
                                              int(m.group(4)) / 1000))
        elif m := _HISTORY.fullmatch(obj.key):
            gens.setdefault(m.group(1), Generation(m.group(1))).history_key = obj.key
    for gen in gens.values():
        gen.snapshots.sort(key=lambda s: s.sequence)
    if leased:
        with contextlib.suppress(NotFound, orjson.JSONDecodeError, KeyError, TypeError, ValueError):  # a damaged lease vouches nothing
            lease = orjson.loads(await store.get_bytes(LEASE))
            holder = gens.get(lease["generation"])
            if holder is not None:
                until = datetime.fromisoformat(lease["shipped"]["until"]).timestamp()
                holder.vouched = (int(lease["shipped"]["sequence"]), until)
    if shipped is not None and shipped[0] in gens:
        gen = gens[shipped[0]]
        if gen.vouched is None or gen.vouched < shipped[1:]:
            gen.vouched = shipped[1:]
    if histories:
        await asyncio.gather(*(_read_history(store, keyring, g) for g in gens.values() if g.history_key))
    return dict(sorted(gens.items()))


async def _read_history(store: ObjectStore, keyring: Keyring | None, gen: Generation) -> None:
    """A history that is gone or cannot be read leaves its generation without per-database
    ranges; the listing says nothing rather than something wrong."""
    assert gen.history_key is not None
    with contextlib.suppress(NotFound, EncryptionError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        gen.history = DatabaseHistory.from_bytes(open_sealed(keyring, await store.get_bytes(gen.history_key)))


def _merge(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def ranges(gens: dict[str, Generation]) -> list[tuple[float, float]]:
    """The spans of time a restore can reach, oldest first: each snapshot to where its chain
    goes, overlapping ones merged (a kept old snapshot alone is a span of one instant)."""
    return _merge((s.taken, g.reach(s)[1]) for g in gens.values() for s in g.snapshots)


def database_ranges(gens: dict[str, Generation]) -> dict[str, list[tuple[float, float]]]:
    """Per database, the spans of time a restore of it alone can reach: where its generation
    reaches, while the database existed and no restore had replaced it since a snapshot."""
    found: dict[str, list[tuple[float, float]]] = {}
    for gen in gens.values():
        if gen.history is None:
            continue
        reach = _merge((s.taken, gen.reach(s)[1]) for s in gen.snapshots)
        for name, lived in gen.history.lifetimes().items():
            for a, b in lived:
                for start, end in reach:
                    # a creation counts from the next whole millisecond, a drop ends the one before
                    lo, hi = max(a, start), min(b, end)
                    lo_ms = math.ceil(lo * 1000) / 1000 if lo == a else lo
                    hi_ms = (math.ceil(hi * 1000) - 1) / 1000 if hi == b else hi
                    if lo_ms <= hi_ms:
                        found.setdefault(name, []).append((lo_ms, hi_ms))
    return {name: _merge(spans) for name, spans in sorted(found.items())}


def _span_view(spans: list[tuple[float, float]]) -> dict[str, Any]:
    return {"earliest": rfc3339(spans[-1][0]), "latest": rfc3339(spans[-1][1]),
            "ranges": [{"from": rfc3339(a), "to": rfc3339(b)} for a, b in spans]}


def window(gens: dict[str, Generation], database: str | None = None) -> dict[str, Any] | None:
    """The restorable range for /backup/list and /server/info: the newest unbroken span, every
    span, the snapshots, and (from the histories read) each database's (or one's) own."""
    spans = ranges(gens)
    if not spans:
        return None
    snapshots: list[dict[str, Any]] = [{"name": s.key, "timestamp": rfc3339(s.taken), "sequence": s.sequence,
                                        "generation": g.name} for g in gens.values() for s in g.snapshots]
    snapshots.sort(key=lambda s: s["timestamp"], reverse=True)
    view = {**_span_view(spans), "snapshots": snapshots}
    if any(g.history is not None for g in gens.values()):
        view["databases"] = {name: _span_view(db_spans) for name, db_spans in database_ranges(gens).items()
                             if database is None or name == database}
    return view


async def latest_instant(store: ObjectStore) -> float | None:
    """The newest instant the continuous backup can restore, or None without one."""
    spans = ranges(await timeline(store))
    return spans[-1][1] if spans else None


# ---------------------------------------------------------------------- retention by age


@dataclass(frozen=True)
class Retention:
    """Keep every instant of the last `age` seconds restorable; beyond it, only the newest
    snapshot of each of the last `daily` days, `weekly` ISO weeks and `monthly` months."""

    age: float
    daily: int = 0
    weekly: int = 0
    monthly: int = 0


def expired(gens: dict[str, Generation], now: float, rule: Retention) -> list[str]:
    """The objects no instant of the window needs and no kept snapshot is: the window rests on
    the newest snapshot taken at or before its start and everything after it."""
    cutoff = now - rule.age
    snapshots = [s for g in gens.values() for s in g.snapshots]
    base = max((s for s in snapshots if s.taken <= cutoff), key=lambda s: s.taken, default=None)
    if base is None:
        return []
    old_snapshots = [s for s in snapshots if s.taken < base.taken]
    kept = _kept(old_snapshots, rule)
    doomed = [k for s in old_snapshots if s.key not in kept for k in (s.key, s.key + SIDECAR)]
    for g in gens.values():
        segments = [seg.key for seg in g.segments if (g.name == base.generation and seg.upto <= base.sequence) or (
            g.name < base.generation and seg.until < base.taken)]
        doomed.extend(segments)
        if g.history_key and g.name < base.generation and len(segments) == len(g.segments) and not any(
                s.key in kept for s in g.snapshots):
            doomed.append(g.history_key)  # nothing of its generation is left to restore
    return doomed


def _kept(snapshots: list[SnapshotObject], rule: Retention) -> set[str]:
    """The newest snapshot of each of the most recent days, weeks and months asked for."""
    kept: set[str] = set()
    for count, period in ((rule.daily, "%Y-%m-%d"), (rule.weekly, "%G-W%V"), (rule.monthly, "%Y-%m")):
        if count <= 0:
            continue
        newest: dict[str, SnapshotObject] = {}
        for s in snapshots:
            bucket = datetime.fromtimestamp(s.taken, UTC).strftime(period)
            if bucket not in newest or s.taken > newest[bucket].taken:
                newest[bucket] = s
        for bucket in sorted(newest, reverse=True)[:count]:
            kept.add(newest[bucket].key)
    return kept


# ---------------------------------------------------------------------- point-in-time restore


class _Replay:
    """Applies logged changes to staged databases, as they were applied to the live ones.
    With `only`, changes to other databases are passed over."""

    def __init__(self, staging: RestoreWriter, staged: dict[str, StagedDatabase], only: str | None) -> None:
        self.staging = staging
        self.staged = staged
        self.only = only
        self.applied = 0
        self._run: tuple[str, str, str] | None = None  # ("put" | "delete", database, set)
        self._items: list[Any] = []

    def flush(self) -> None:
        if self._run is not None and self._items:
            kind, db, set_name = self._run
            target = self.staged.get(db)
            if target is None:  # a change is missing before this one
                raise BackupInvalid(f"a logged change writes to database {db!r}, which neither the snapshot nor"
                                    " the changes before it hold")
            if kind == "put":
                self.staging.write(target, set_name, self._items)
            else:
                self.staging.delete(target, set_name, self._items)
        self._run, self._items = None, []

    def _queue(self, run: tuple[str, str, str], item: Any) -> None:
        if run != self._run or len(self._items) >= READ_CHUNK:
            self.flush()
            self._run = run
        self._items.append(item)

    def apply_logged(self, change: dict[str, Any]) -> None:
        """`apply`, with the ways a logged change can fail as BackupInvalid."""
        try:
            self.apply(change)
        except _Unreplayable:
            raise BackupInvalid(f"a restore replaced databases at {rfc3339(change['t'])} (sequence {change['s']});"
                                " states between it and the next snapshot cannot be rebuilt") from None
        except (KeyError, IndexError, TypeError) as exc:
            raise BackupInvalid(f"a logged change cannot be applied ({type(exc).__name__}: {exc})") from None

    def apply(self, change: dict[str, Any]) -> None:
        for op in change["ops"]:
            kind = op[0]
            if kind == "restore":
                names, replace_all = op[1], op[2]
                if replace_all or self.only is None or self.only in names:
                    raise _Unreplayable()
                continue
            if self.only is not None and op[1] != self.only:
                continue
            self.applied += 1
            if kind == "put":
                self._queue(("put", op[1], op[2]), (op[3], op[4], orjson.dumps(op[4])))
            elif kind == "delete":
                self._queue(("delete", op[1], op[2]), op[3])
            else:
                self.flush()
                self._catalog(op)

    def _catalog(self, op: list[Any]) -> None:
        kind, name = op[0], op[1]
        if kind == "create_database":
            db = self.staging.add_database()
            db.name = name
            db.auth = op[2]
            self.staged[name] = db
        elif kind == "drop_database":
            self.staging.remove_database(self.staged.pop(name))
        elif kind == "create_set":
            self.staging.add_set(self.staged[name], op[2])
        elif kind == "create_index":
            d = op[3]
            definition = IndexDef(d["name"], d["field"], SORTABLE if d["kind"] == SORTABLE else BASIC,
                                  tuple(d["sort_fields"]))
            self.staging.add_index(self.staged[name], op[2], definition)
        elif kind == "drop_index":
            self.staging.drop_index(self.staged[name], op[2], op[3])
        else:
            raise BackupInvalid(f"unknown change {kind!r}")


class _Unreplayable(Exception):
    """A logged restore: what it swapped in is not in the log."""


async def restore_to(backups: BackupService, at: float, database: str | None, into: str | None,
                     check: Callable[[Database], None] | None) -> dict[str, Any]:
    """Restores every database (or one, optionally under another name) as it was at `at`:
    the newest snapshot taken at or before it, plus the logged changes up to it. All or nothing."""
    store = backups.store
    try:
        gens = await timeline(store, backups.shipped())
    except ObjectStoreError as exc:
        raise storage_error(ErrorCode.RESTORE_FAILED, exc) from None
    span = window(gens)
    found = max(((s, g) for g in gens.values() for s in g.snapshots if s.taken <= at),
                key=lambda sg: sg[0].taken, default=None)
    where = (f"the restorable range is {span['earliest']} to {span['latest']}"
             + (f" ({len(span['ranges'])} ranges in all: see /backup/list)" if len(span["ranges"]) > 1 else "")
             if span else "no continuous backup exists")
    if found is None:
        raise not_found(ErrorCode.BACKUP_NOT_FOUND, f"no point-in-time state at {rfc3339(at)}: {where}")
    base, gen = found
    end, reach = gen.reach(base)
    if at > reach:
        lost = gen.lost_after(end)
        if lost is not None:  # changes the stream had are gone: a gap, not the end of a range
            raise BackupInvalid(f"the changes of generation {gen.name} after sequence {end} are missing (the stream"
                                f" reached sequence {lost}): no segment continues from there, so {rfc3339(at)}"
                                " cannot be reached")
        raise not_found(ErrorCode.BACKUP_NOT_FOUND, f"no point-in-time state at {rfc3339(at)}: {where}")
    started = time.monotonic()
    async with backups.restore_lock:
        staging = backups.storage.restore_writer()
        staged: dict[str, StagedDatabase] = {}
        try:
            result = await backups.read(base.key, True, ".json.zst", staging, only=database, staged=staged)
            read = time.monotonic()
            replay = _Replay(staging, staged, database)
            await _replay(store, backups.keyring, gen, base, at, replay)
            await asyncio.to_thread(replay.flush)
            replayed = time.monotonic()
            names = sorted(staged)
            if database is not None:
                if database not in staged:
                    raise not_found(ErrorCode.BACKUP_NOT_FOUND, f"database {database!r} did not exist at {rfc3339(at)}")
                names = [into or database]
                staged[database].name = names[0]
            commit_check = check if into is None else refuse_existing
            await asyncio.to_thread(staging.commit, database is None, commit_check)
        except ObjectStoreError as exc:
            staging.abort()
            backups.stats.failed("restore", exc.kind)
            raise storage_error(ErrorCode.RESTORE_FAILED, exc) from None
        except BaseException:
            staging.abort()
            raise
    seconds = {"snapshot": round(read - started, 3), "changes": round(replayed - read, 3),
               "swap": round(time.monotonic() - replayed, 3)}
    log.info("restored to %s: %d databases from %s (%.2fs) plus %d changes (%.2fs), swapped in %.2fs", rfc3339(at),
             len(names), base.key, seconds["snapshot"], replay.applied, seconds["changes"], seconds["swap"])
    return {"at": rfc3339(at), "databases": names, "snapshot": base.key, "changes_replayed": replay.applied,
            "entries": result["entries"], "full": database is None, "seconds": seconds}


async def _replay(store: ObjectStore, keyring: Keyring | None, gen: Generation, base: SnapshotObject, at: float,
                  replay: _Replay) -> None:
    """Feeds the segments after the snapshot to the replay, on a worker thread chunk by chunk
    (the next chunk downloads meanwhile), until the first commit after `at`; the caller has
    checked that the chain reaches it."""
    pos = base.sequence
    for seg in gen.chain(base.sequence):
        reader = SegmentReader(seg.key, seg.after, seg.upto, keyring, pos, at, replay.apply_logged)
        try:
            async for chunk in await store.get_stream(seg.key):
                if await asyncio.to_thread(reader.feed, chunk):
                    return
        except NotFound:
            raise reader.check.bad("is missing") from None
        await asyncio.to_thread(reader.finish)
        pos = seg.upto
        if seg.until >= at:
            return


# ---------------------------------------------------------------------- shipping


@dataclass
class ShipStatus:
    """What /metrics and /server/info report about continuous backup."""

    state: str = "starting"
    generation: str = ""
    shipped_sequence: int = 0
    stored_sequence: int = 0  # the end of the last segment stored
    shipped_until: float = 0.0
    pending_changes: int = 0
    lag_seconds: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    # by kind, each from 0 so that an alert on one finds it before the first failure
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_KINDS, 0))
    window: dict[str, str] = field(default_factory=dict)  # the restorable range: earliest, latest

    def count(self, op: str, n: int = 1) -> None:
        self.requests[op] = self.requests.get(op, 0) + n

    def failed(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


class StreamTaken(Exception):
    """Another node holds the lease on the stream."""


class StreamBroken(Exception):
    """The change log no longer holds what the stream needs next: it cannot go on."""


class Shipper:
    """Ships the change sequence of this node's data dir to the object store; one per node,
    in the process that runs the schedule."""

    def __init__(self, storage: Storage, backups: BackupService, data_dir: Path, spool_dir: Path | None, *,
                 sync_interval: float = 1.0, snapshot_minutes: float = 60.0, snapshot_changes: int = 200_000,
                 retention: Retention | None = None) -> None:
        self.storage = storage
        self.backups = backups
        self.store: ObjectStore = backups.store
        self.state_path = data_dir / STATE_FILE
        self.spool_dir = spool_dir
        self.sync_interval = sync_interval
        self.snapshot_seconds = snapshot_minutes * 60
        self.snapshot_changes = snapshot_changes
        self.retention = retention
        self._last_retention = -math.inf
        self.status = ShipStatus()
        self.node = ""
        self.generation = ""
        self._compacted = 0  # the storage keeps the changes after this for the next compaction
        self._shipped = 0  # every change up to this is stored
        self._small: list[SegmentObject] = []
        self._last_compact = time.monotonic()
        self._last_renew = 0.0
        self._last_snapshot = time.monotonic()
        self._since_snapshot = 0
        self._snapshot_entries = 0  # entries in the last snapshot: a new one costs about as much
        self._snapshot_due = False
        self._history = DatabaseHistory()
        self._history_of = ""  # the generation it belongs to

    # -- running

    async def run(self) -> None:
        """Ships until cancelled (a stop, or another node taking the lead of a shared backend),
        then ships what it can and gives the lease up (`release`); any failure is logged,
        counted and retried with back-off, while the changes wait in the log."""
        try:
            await self._run()
        except asyncio.CancelledError:
            await self.release()
            raise

    async def _run(self) -> None:
        pause = self.sync_interval
        while True:
            try:
                await self._start()
                pause = self.sync_interval
                await self._ship_forever()
            except StreamTaken as exc:
                self.status.state = f"refused: {exc}"
                self.status.failed("lease")
                log.error("continuous backup refused: %s", exc)
                pause = LEASE_RETRY
            except StreamBroken as exc:  # the next start sees it and begins a new generation
                self.status.state = f"starting again: {exc}"
                self.status.failed("stream")
                log.error("continuous backup: %s", exc)
            except ObjectStoreError as exc:
                self.status.state = f"waiting for the object store: {exc}"
                self.status.failed(exc.kind)
                log.warning("continuous backup: %s (retrying in %.0fs)", exc, pause)
            except ApiError as exc:
                self.status.state = f"failing: {exc.message}"
                self.status.failed("error")
                log.error("continuous backup: %s", exc.message)
            except Exception as exc:
                self.status.state = f"failing: {type(exc).__name__}: {exc}"
                self.status.failed("error")
                log.exception("continuous backup failed")
            await asyncio.sleep(pause)
            pause = min(RETRY_PAUSE_MAX, pause * 2)

    async def _start(self) -> None:
        """Takes the lease, then the stream: this node's (its data dir's), or on a shared
        backend the stream the nodes shipped last; a stream whose end the change log no longer
        follows on from (another node shipped a stream of its own meanwhile, or the log was let
        go) is not continued: a new generation begins, with a snapshot."""
        await self.store.ensure_ready()
        if not self.node:
            self.node = await asyncio.to_thread(self._node_id)
        await self._acquire_lease()  # before anything touches the change log, which other nodes may share
        gens = await self._list()
        acked = await asyncio.to_thread(self.storage.retain_changes, CONSUMER)
        if not self.generation:
            acked = await asyncio.to_thread(self._open_stream, self._continuable(gens, acked), acked)
            await self._renew_lease()  # it names the generation now
        mine = gens.get(self.generation, Generation(self.generation))
        end = _stream_end(mine)
        sequence = await asyncio.to_thread(self.storage.sequence)
        if any(s.upto > sequence for s in mine.segments) or (end is not None and acked > end):
            # the data lost commits the stream holds (a power loss before its fsync: its numbers
            # would now mean other changes), or the log lost changes that follow the stream's end
            log.warning("continuous backup: the data and the change log do not follow on from stream %s"
                        " (sequence %d, log from %d, stream to %s); starting a new one",
                        self.generation, sequence, acked, end)
            await asyncio.to_thread(stop_logging_changes, self.storage, self.state_path.parent)
            self.generation = ""
            await self._start()
            return
        self._compacted = acked
        self.status.generation = self.generation
        if mine.unfinished:  # a snapshot this node was writing when it crashed
            self.status.count("delete")
            await self.store.delete_many(mine.unfinished)
        self.status.stored_sequence = max([0, *(s.upto for s in mine.segments)])
        self._small = [s for s in mine.segments if s.after >= self._compacted]
        self.status.shipped_sequence = max([self._compacted, *(s.upto for s in self._small)])
        span = window(gens)
        if span is not None:
            self.status.window = {"earliest": span["earliest"], "latest": span["latest"]}
        if self._history_of != self.generation:
            await self._load_history(mine)
        if not mine.snapshots:
            await self._snapshot()
        shipped = self.status.shipped_sequence
        if self._history.sequence < shipped:  # stored segments whose catalog changes it may lack
            if await self._note_logged(max(self._history.sequence, self._compacted), shipped):
                await self._put_history()
        if self._small:
            await self._compact()
        self._shipped = shipped
        self.status.state = "shipping"

    def _continuable(self, gens: dict[str, Generation], acked: int) -> str | None:
        """On a shared backend, the stream that reaches furthest (the one the nodes shipped
        last), for this node to continue once it leads, if the log follows on from its end
        (it holds every change after `acked`); elsewhere the data dir knows its own."""
        if not self.storage.shared:
            return None
        ends = {name: end for name, g in gens.items() if (end := _stream_end(g)) is not None}
        last = max(ends, key=ends.__getitem__, default=None)
        return last if last is not None and acked <= ends[last] else None

    def _state(self) -> dict[str, Any]:
        """This node's id and generation as its data dir keeps them."""
        try:
            state = orjson.loads(self.state_path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}
        return state if isinstance(state, dict) else {}

    def _node_id(self) -> str:
        return str(self._state().get("node") or secrets.token_hex(8))

    def _open_stream(self, continued: str | None, acked: int) -> int:
        """The generation this node ships, kept in its data dir: `continued`, else the data
        dir's own (not on a shared backend: the nodes' streams are theirs together), else a
        new one from a fresh consumer (a new data dir, or one restored from the bucket).
        Returns where the consumer now starts (`acked`, unless a fresh one replaced it)."""
        state = self._state()
        generation = continued or (None if self.storage.shared else state.get("generation"))
        if generation:
            self.generation = generation
        else:
            self.storage.release_changes(CONSUMER)
            acked = self.storage.retain_changes(CONSUMER)
            self.generation = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)
        if self.generation != state.get("generation"):
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps({"node": self.node, "generation": self.generation}))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
        return acked

    async def _load_history(self, mine: Generation) -> None:
        self._history, self._history_of = DatabaseHistory(), self.generation
        if mine.history_key is None:
            return
        self.status.count("get")
        await _read_history(self.store, self.backups.keyring, mine)
        if mine.history is None:
            log.warning("continuous backup: %s cannot be read; it starts again from the next snapshot", mine.history_key)
        else:
            self._history = mine.history

    def _logged(self, after: int, upto: int) -> Iterator[list[Change]]:
        """The changes in (after, upto] from the local log, chunk by chunk (blocking reads)."""
        pos = after
        while pos < upto:
            chunk = [c for c in self.storage.changes(pos, READ_CHUNK) if c.sequence <= upto]
            if not chunk:
                return
            yield chunk
            pos = chunk[-1].sequence

    async def _note_logged(self, after: int, upto: int) -> bool:
        """The history takes in the creations, drops and restores of the local log's changes in
        (after, upto]; True when it changed."""
        logged = self._logged(after, upto)
        return any(await asyncio.to_thread(lambda: [self._history.note(chunk) for chunk in logged]))

    async def _put_history(self) -> None:
        self.status.count("put")
        await self.store.put_bytes(f"{ROOT}{self.generation}/databases.json",
                                   self.backups.seal(self._history.to_bytes(self.generation)))

    async def _list(self) -> dict[str, Generation]:
        self.status.count("list")
        return await timeline(self.store)

    async def _ship_forever(self) -> None:
        while True:
            started = time.monotonic()
            await self._ship()
            now = time.monotonic()
            if now - self._last_renew >= LEASE_RENEW:
                await self._renew_lease()
            if self._small and (len(self._small) >= COMPACT_SEGMENTS or now - self._last_compact >= COMPACT_SECONDS):
                await self._compact()
            volume = self._since_snapshot >= max(self.snapshot_changes, self._snapshot_entries) and (
                now - self._last_snapshot >= min(SNAPSHOT_SPACING, self.snapshot_seconds))
            if self._snapshot_due or volume or (
                    self._since_snapshot and now - self._last_snapshot >= self.snapshot_seconds):
                await self._snapshot()
            if self.retention is not None and now - self._last_retention >= RETENTION_CHECK:
                await self._apply_retention()
            # start to start one interval apart, so a change waits at most about one interval
            await asyncio.sleep(max(0.05, self.sync_interval - (time.monotonic() - started)))

    async def _ship(self) -> None:
        """Ships every change not yet shipped, as one small segment per SEGMENT_CHANGES."""
        while True:
            until = time.time()
            sequence = await asyncio.to_thread(self.storage.sequence)  # read first: every commit up to it is in the log
            changes = await asyncio.to_thread(self.storage.changes, self._shipped, SEGMENT_CHANGES)
            full = len(changes) >= SEGMENT_CHANGES
            if full:
                sequence, until = changes[-1].sequence, changes[-1].time
            elif changes:  # commits made since `sequence` was read are in too
                sequence = max(sequence, changes[-1].sequence)
            self.status.pending_changes = max(0, sequence - self._shipped)
            self.status.lag_seconds = max(0.0, time.time() - changes[0].time) if changes else 0.0
            if not changes:
                # nothing to ship; commits that changed nothing may have moved the sequence
                self._shipped = max(self._shipped, sequence)
                self._shipped_to(self._shipped, until)
                return
            seg = await self._put_segment(self._shipped, changes, sequence, until)
            self.status.stored_sequence = seg.upto
            self._small.append(seg)
            self._shipped = seg.upto
            self._since_snapshot += sum(c.writes for c in changes)
            if self._history.note(changes):
                await self._put_history()
            if any(_restores(c) for c in changes):
                self._snapshot_due = True
            self._shipped_to(seg.upto, seg.until)
            self.status.pending_changes = max(0, await asyncio.to_thread(self.storage.sequence) - seg.upto)
            self.status.lag_seconds = 0.0
            if not full:
                return

    def shipped(self) -> tuple[str, int, float] | None:
        """What is stored for certain: (generation, every change up to this sequence, nothing
        else committed before this time)."""
        if self.status.state != "shipping":
            return None
        return self.generation, self.status.stored_sequence, self.status.shipped_until

    def _shipped_to(self, sequence: int, until: float) -> None:
        self.status.shipped_sequence, self.status.shipped_until = sequence, until
        if "earliest" in self.status.window:
            self.status.window["latest"] = rfc3339(until)

    async def _put_segment(self, after: int, changes: Iterable[Change] | None, upto: int, until: float,
                           source: Callable[[SegmentEncoder], None] | None = None) -> SegmentObject:
        """Small segments are compressed fast (they cost the writes' CPU), compacted ones tighter."""
        enc = SegmentEncoder(self.generation, after, self.spool_dir, level=1 if source is None else 3)
        enc.start()
        if changes is not None:
            await asyncio.to_thread(enc.add, changes)
        if source is not None:
            await asyncio.to_thread(source, enc)
        data = self.backups.seal(await asyncio.to_thread(enc.finish, upto, until))
        key = f"{ROOT}{self.generation}/segments/{after:020d}-{upto:020d}-{_ms(until)}.jsonl.zst"
        self.status.count("put")
        etag = await self.store.put_bytes(key, data)
        if etag is not None and etag.strip('"') != hashlib.md5(data, usedforsecurity=False).hexdigest():
            self.status.count("delete")
            await self.store.delete(key)
            raise ObjectStoreError(f"the stored {key} differs from what was sent", "corrupt")
        return SegmentObject(key, self.generation, after, upto, until)

    async def _compact(self) -> None:
        """One segment for everything since the last compaction, from the local log; then the
        small segments it replaces go, and the local log lets go of what it now holds. The
        log must still have held all of it once it was read: on a shared backend another node
        may have begun a stream of its own and let the log go."""
        upto = max(s.upto for s in self._small)
        until = max(s.until for s in self._small)
        start = self._compacted

        def fill(enc: SegmentEncoder) -> None:
            for chunk in self._logged(start, upto):
                enc.add(chunk)

        seg = await self._put_segment(start, None, upto, until, fill)
        try:
            await self._log_holds(start)
        except StreamBroken:
            self.status.count("delete")
            await self.store.delete(seg.key)
            raise
        replaced = [s.key for s in self._small if s.key != seg.key and s.upto <= upto]
        if replaced:
            self.status.count("delete", (len(replaced) + 999) // 1000)
            await self.store.delete_many(replaced)
        await asyncio.to_thread(self.storage.acknowledge, CONSUMER, upto)
        self._compacted = upto
        self._small = [s for s in self._small if s.upto > upto]
        self._last_compact = time.monotonic()

    async def _log_holds(self, after: int) -> None:
        acked = await asyncio.to_thread(self.storage.retain_changes, CONSUMER)
        if acked > after:
            raise StreamBroken(f"the change log was let go up to {acked}; stream {self.generation} needs it from {after}")

    async def _apply_retention(self) -> None:
        """Deletes what the window no longer needs; a failure is logged and counted, and the
        next round tries again (what was not deleted is still listed)."""
        assert self.retention is not None
        self._last_retention = time.monotonic()
        try:
            gens = await self._list()
            doomed = expired(gens, time.time(), self.retention)
            if doomed:
                self.status.count("delete", (len(doomed) + 999) // 1000)
                await self.store.delete_many(doomed)
                log.info("continuous backup: retention deleted %d objects older than the window", len(doomed))
                gens = await self._list()
            span = window(gens)
            if span is not None:
                self.status.window["earliest"] = span["earliest"]
        except ObjectStoreError as exc:
            self.status.failed("retention")
            log.error("continuous backup: retention could not delete old objects: %s (retrying later)", exc)

    async def _snapshot(self) -> None:
        def name_of(sequence: int, taken: float) -> str:
            return f"{ROOT}{self.generation}/snapshots/{sequence:020d}-{_ms(taken)}.json.zst"

        self.status.count("put", 3)  # the upload (one or more parts), its check and its sidecar
        base = await self.backups.write_base(name_of)
        self._snapshot_entries = base.entries
        # commits the snapshot holds that no round has shipped: their creations and drops are
        # noted first, at their own times, or the snapshot's list would date them
        noted = self._history.names is not None and await self._note_logged(self._shipped, base.sequence)
        if self._history.note_snapshot(base.sequence, base.taken, base.databases) or noted:
            await self._put_history()
        self.status.window.setdefault("earliest", rfc3339(base.taken))
        self.status.window["latest"] = max(self.status.window.get("latest", ""), rfc3339(base.taken))
        self._snapshot_due = False
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        log.info("continuous backup: base snapshot %s (sequence %d)", base.name, base.sequence)
        self._last_retention = -math.inf  # a new snapshot may let older objects go

    # -- the lease

    async def _read_lease(self) -> dict[str, Any] | None:
        self.status.count("get")
        try:
            lease = orjson.loads(await self.store.get_bytes(LEASE))
        except NotFound:
            return None
        except orjson.JSONDecodeError:
            return {"node": "?", "renewed": 0.0}
        return lease if isinstance(lease, dict) else {"node": "?", "renewed": 0.0}

    def _lease_body(self) -> bytes:
        return orjson.dumps({"node": self.node, "generation": self.generation, "renewed": time.time(),
                             "shipped": {"sequence": self.status.stored_sequence,
                                         "until": rfc3339(self.status.shipped_until or time.time())}})

    async def _acquire_lease(self) -> None:
        lease = await self._read_lease()
        if lease is not None and lease.get("node") != self.node:
            age = time.time() - float(lease.get("renewed") or 0)
            if age < LEASE_TTL:
                raise StreamTaken(f"node {lease.get('node')} ships to this bucket and prefix (its lease was renewed"
                                  f" {age:.0f}s ago; it may be taken over {LEASE_TTL:.0f}s after its last renewal)")
            log.warning("continuous backup: taking over the lease of node %s, silent for %.0fs", lease.get("node"), age)
            self.status.count("delete")
            await self.store.delete(LEASE)
            lease = None
        self.status.count("put")
        try:
            if lease is None:
                await self.store.put_bytes(LEASE, self._lease_body(), create_only=True)
            else:
                await self.store.put_bytes(LEASE, self._lease_body())
        except AlreadyExists:
            raise StreamTaken("another node took the lease at the same moment") from None
        self._last_renew = time.monotonic()

    async def _renew_lease(self) -> None:
        lease = await self._read_lease()
        if lease is None or lease.get("node") != self.node:
            holder = lease.get("node") if lease else "nobody"
            raise StreamTaken(f"the lease was taken over (now held by {holder}) while this node was silent")
        self.status.count("put")
        await self.store.put_bytes(LEASE, self._lease_body())
        self._last_renew = time.monotonic()

    async def release(self) -> None:
        """When this process stops shipping (a clean stop, or another node taking the lead):
        ships what is left, then gives the lease up at once, so that the next node need not
        wait for it to go stale."""
        shipping = self.status.state == "shipping"
        self.status.state = "stopped: this process does not ship (stopping, or another node leads)"
        if shipping:
            try:
                await self._ship()
            except Exception as exc:  # noqa: BLE001 (the storage or the object store; what is left waits in the log)
                log.warning("continuous backup: final shipping failed: %s", exc)
        if not self.node:
            return
        try:  # held as well when stopped while starting
            lease = await self._read_lease()
            if lease is not None and lease.get("node") == self.node:
                await self.store.delete(LEASE)
        except ObjectStoreError as exc:
            log.warning("continuous backup: the lease could not be given up: %s", exc)


def stop_logging_changes(storage: Storage, data_dir: Path) -> None:
    """With continuous backup off, the storage keeps no changes for it; a later start begins a
    new generation. A storage out of reach (PostgreSQL away while the process starts) is told
    from a thread that retries until it is back."""
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    try:
        storage.release_changes(CONSUMER)
    except StorageUnavailable as exc:
        log.warning("continuous backup is off; the storage will stop logging changes once reachable (%s)", exc)
        threading.Thread(target=_release_when_reachable, args=(storage,), name="fuckbase-release-changes",
                         daemon=True).start()


RELEASE_RETRY_SECONDS = 2.0


def _release_when_reachable(storage: Storage) -> None:
    while True:
        time.sleep(RELEASE_RETRY_SECONDS)
        try:
            storage.release_changes(CONSUMER)
            return
        except StorageUnavailable:
            continue
        except StorageError as exc:
            log.error("the storage could not stop logging changes: %s", exc)
            return

