"""The backup object: JSON in the original implementation's shape, written and read as a stream.

We write one structural element or one entry per line, so our own backups are read back a
line at a time with orjson (about a microsecond per entry). Any other layout of the same JSON
— the original's indented output, a hand-edited file — is read with ijson's incremental
parser instead. Both readers turn the object into the same flat stream of records, so the
restore logic does not care which wrote the backup, and neither holds more than one entry
(or one line) in memory.

Database backup:  {"name", "indexes": {name: {"name","set_name","field","type","sort_fields"?}},
                   "sets": {set: {"name", "data": {key: value}}}, "auth"? | "fuckbase_auth"?}
Full backup:      {"databases": {name: <database backup>}, "metadata": {…}}
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import ijson
import orjson

from fuckbase.contract import ErrorCode
from fuckbase.errors import ApiError

FORMAT_VERSION = 1
ENTRIES_PER_RECORD = 4096


class BackupInvalid(ApiError):
    """The object is not a valid backup; nothing was changed."""

    def __init__(self, message: str) -> None:
        super().__init__(422, ErrorCode.BACKUP_INVALID, f"not a valid backup: {message}")


# ------------------------------------------------------------------ records


@dataclass
class DatabaseStart:
    """A database begins. Fields known so far; `DatabaseMeta` may complete them later."""


@dataclass
class DatabaseMeta:
    """Small fields of the current database: name, indexes, auth (as found in the object)."""

    fields: dict[str, Any]


@dataclass
class SetStart:
    name: str


@dataclass
class Entries:
    # (key, value, the value's JSON when the reader has it at hand, else None)
    items: list[tuple[str, Any, bytes | None]] = field(default_factory=list)


@dataclass
class DatabaseEnd:
    pass


Record = DatabaseStart | DatabaseMeta | SetStart | Entries | DatabaseEnd


# ------------------------------------------------------------------ writing


def _j(v: Any) -> bytes:
    return orjson.dumps(v)


def database_header(name: str, indexes: dict[str, Any], auth: dict[str, str] | None) -> bytes:
    """The opening of one database object, up to and including `"sets":{`."""
    head: dict[str, Any] = {"name": name, "indexes": indexes}
    if auth:
        head["fuckbase_auth"] = auth  # hashed; never the plaintext "auth" of the original
    return _j(head)[:-1] + b',"sets":{'


def set_header(name: str) -> bytes:
    return _j(name) + b':{"name":' + _j(name) + b',"data":{'


def entry_line(first: bool, key: str, raw: bytes) -> bytes:
    return (b"" if first else b",") + _j(key) + b":" + raw + b"\n"


class Checksummer:
    """SHA-256 and size of the uncompressed JSON, as it streams past."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> bytes:
        self._h.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        return self._h.hexdigest()


# ------------------------------------------------------------------ reading: our line layout


class _NotOurs(Exception):
    """The first line is not our header: read the object with the general parser."""


class LineReader:
    """Reads our own line layout, one line at a time."""

    def __init__(self) -> None:
        self.full: bool | None = None
        self.metadata: dict[str, Any] = {}
        self.state = "start"
        self._pending = Entries()

    def _flush(self, out: list[Record]) -> None:
        if self._pending.items:
            out.append(self._pending)
            self._pending = Entries()

    def feed_lines(self, lines: list[bytes], out: list[Record]) -> None:
        """Consecutive entry lines are parsed together, as one JSON object (about twice as
        fast as line by line); every other line on its own."""
        i, n = 0, len(lines)
        while i < n:
            line = lines[i].strip()
            i += 1
            if not line:
                continue
            if self.state != "entries" or line == b"}}":
                self.feed_line(line, out)
                continue
            block = [line[1:] if line[:1] == b"," else line]
            while i < n:
                more = lines[i].strip()
                if more == b"}}" or (more and more[:1] != b","):
                    break
                if more:
                    block.append(more)
                i += 1
            self._entries(block, out)

    def _entries(self, block: list[bytes], out: list[Record]) -> None:
        entries = orjson.loads(b"{" + b"".join(block) + b"}")
        if not isinstance(entries, dict):
            raise BackupInvalid("malformed entries")
        pending = self._pending.items
        for key, value in entries.items():
            pending.append((key, value, None))
        if len(pending) >= ENTRIES_PER_RECORD:
            self._flush(out)

    def feed_line(self, line: bytes, out: list[Record]) -> None:
        state = self.state
        if state == "entries":
            if line == b"}}":
                self._flush(out)
                self.state = "sets"
                return
            body = line[1:] if line[:1] == b"," else line
            pair = orjson.loads(b"{" + body + b"}")
            if len(pair) != 1:
                raise BackupInvalid("an entry line holds more than one entry")
            key, value = next(iter(pair.items()))
            # we wrote `orjson(key):value`: when the key reads back the same, the rest is the value
            head = orjson.dumps(key) + b":"
            raw = body[len(head) :] if body.startswith(head) else None
            self._pending.items.append((key, value, raw))
            if len(self._pending.items) >= ENTRIES_PER_RECORD:
                self._flush(out)
        elif state == "sets":
            if line == b"}}":
                out.append(DatabaseEnd())
                self.state = "databases" if self.full else "end"
                return
            set_name, body = _single(line, b"}}}")
            if not isinstance(body, dict) or body.get("data") != {}:
                raise BackupInvalid("malformed set")
            out.append(SetStart(set_name))
            self.state = "entries"
        elif state == "databases":
            if line.startswith(b'},"metadata":'):
                meta = orjson.loads(b"{" + line[2:])
                self.metadata = meta.get("metadata") or {}
                self.state = "end"
                return
            db_name, body = _single(line, b"}}}")
            if not isinstance(body, dict):
                raise BackupInvalid("malformed database")
            out.append(DatabaseStart())
            out.append(DatabaseMeta({**body, "name": body.get("name", db_name)}))
            self.state = "sets"
        elif state == "start":
            try:
                head = orjson.loads(line + b"}}")
            except orjson.JSONDecodeError:
                raise _NotOurs from None
            if not isinstance(head, dict) or head.get("fuckbase_format") != FORMAT_VERSION:
                raise _NotOurs
            self.full = "databases" in head
            if self.full:
                self.state = "databases"
            else:
                out.append(DatabaseStart())
                out.append(DatabaseMeta(head))
                self.state = "sets"
        else:
            raise BackupInvalid("data after the end of the backup")

    def finish(self, out: list[Record]) -> None:
        if self.state == "start":
            raise BackupInvalid("the object is empty")
        if self.state != "end":
            raise BackupInvalid("the backup ends early (truncated?)")


def _single(line: bytes, closer: bytes) -> tuple[str, Any]:
    raw = line[1:] if line[:1] == b"," else line
    value = orjson.loads(b"{" + raw + closer)
    if not isinstance(value, dict) or len(value) != 1:
        raise BackupInvalid("malformed structure line")
    key, body = next(iter(value.items()))
    return key, body


# ------------------------------------------------------------------ reading: any JSON layout


class EventReader:
    """Reads any layout of the backup JSON incrementally with ijson's push parser.

    Containers on the way to the entries (root, databases, a database, its sets, a set, its
    data) are walked event by event; every other value is built whole — small fields such as
    names, index definitions and auth, and one entry value at a time.
    """

    def __init__(self) -> None:
        self._events = ijson.sendable_list()
        # not use_float: yajl's own integers stop at 64 bits ("integer overflow"), and the
        # original writes larger ones (1e20 as 100000000000000000000); see _as_parsed
        self._coro = ijson.parse_coro(self._events)
        self.full: bool | None = None
        self.metadata: dict[str, Any] = {}
        self._path: list[str] = []
        self._builder: Any = None
        self._build_path: tuple[str, ...] = ()
        self._build_depth = 0
        self._pending = Entries()
        self._db_open = False
        self._seen_root = False

    def feed(self, chunk: bytes, out: list[Record]) -> None:
        try:
            self._coro.send(chunk)
        except (ijson.JSONError, UnicodeDecodeError) as exc:  # the C parser raises the latter for bad UTF-8
            raise BackupInvalid(f"unparsable JSON: {_first_line(exc)}") from None
        self._consume(out)

    def finish(self, out: list[Record]) -> None:
        try:
            self._coro.close()
        except (ijson.JSONError, UnicodeDecodeError) as exc:
            raise BackupInvalid(f"unparsable or truncated JSON: {_first_line(exc)}") from None
        self._consume(out)
        if not self._seen_root:
            raise BackupInvalid("the object is empty")

    def _consume(self, out: list[Record]) -> None:
        for _prefix, event, value in self._events:
            self._event(event, value, out)
        del self._events[:]

    def _event(self, event: str, value: Any, out: list[Record]) -> None:
        if event == "number":
            value = _as_parsed(value)
        if self._builder is not None:
            self._builder.event(event, value)
            if event in ("start_map", "start_array"):
                self._build_depth += 1
            elif event in ("end_map", "end_array"):
                self._build_depth -= 1
                if self._build_depth == 0:
                    self._built(out)
            return
        path = self._path
        if event == "map_key":
            path[-1] = value
        elif event == "start_map" and (not path or self._is_container(len(path))):
            if not path:
                self._seen_root = True
            else:
                self._enter(len(path), out)
            path.append("")
        elif event == "end_map":
            path.pop()
            self._leave(len(path), out)
        elif not path:
            raise BackupInvalid("the top level is not a JSON object")
        else:
            self._builder = ijson.ObjectBuilder()
            self._builder.event(event, value)
            self._build_path = tuple(path)
            if event == "start_array" or event == "start_map":
                self._build_depth = 1
            else:
                self._built(out)

    def _is_container(self, depth: int) -> bool:
        p = self._path
        if depth == 1:
            return p[0] in ("databases", "sets")
        if self.full:
            return depth in (2, 4) or (depth == 3 and p[2] == "sets") or (depth == 5 and p[4] == "data")
        return depth == 2 or (depth == 3 and p[2] == "data")

    def _open_db(self, out: list[Record]) -> None:
        if not self._db_open:
            out.append(DatabaseStart())
            self._db_open = True

    def _enter(self, depth: int, out: list[Record]) -> None:
        p = self._path
        if depth == 1:
            self.full = p[0] == "databases"
            if not self.full:
                self._open_db(out)
                out.append(DatabaseMeta({"sets": {}}))
        elif self.full and depth == 2:
            self._open_db(out)
            out.append(DatabaseMeta({"name": p[1]}))
        elif self.full and depth == 3:
            out.append(DatabaseMeta({"sets": {}}))
        elif (self.full and depth == 4) or (not self.full and depth == 2):
            out.append(SetStart(p[-1]))

    def _leave(self, depth: int, out: list[Record]) -> None:
        if (self.full and depth == 4) or (not self.full and depth == 2):
            self._flush(out)
        elif (self.full and depth == 2) or (not self.full and depth == 0 and self._db_open):
            self._flush(out)
            out.append(DatabaseEnd())
            self._db_open = False

    def _flush(self, out: list[Record]) -> None:
        if self._pending.items:
            out.append(self._pending)
            self._pending = Entries()

    def _built(self, out: list[Record]) -> None:
        value, p = self._builder.value, self._build_path
        self._builder = None
        n = len(p)
        if n == (6 if self.full else 4):  # …data.<key>
            self._pending.items.append((p[-1], value, None))
            if len(self._pending.items) >= ENTRIES_PER_RECORD:
                self._flush(out)
        elif n == 1 and p[0] == "metadata":
            self.metadata = value if isinstance(value, dict) else {}
        elif n == 1 and p[0] in ("databases", "sets"):
            raise BackupInvalid(f'"{p[0]}" must be an object')
        elif n == 1 and self.full is not True:
            self._open_db(out)
            out.append(DatabaseMeta({p[0]: value}))
        elif self.full and n == 3:
            if p[2] == "sets":
                raise BackupInvalid('"sets" must be an object')
            out.append(DatabaseMeta({p[2]: value}))
        elif (self.full and n == 2) or (not self.full and n == 2 and p[0] == "sets") or (self.full and n == 4):
            raise BackupInvalid(f"{p[-1]!r} must be an object")
        elif n == (5 if self.full else 3) and p[-1] == "data":
            raise BackupInvalid('a set\'s "data" must be an object')


_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1


def _as_parsed(number: int | Decimal) -> int | float:
    """A number as the API's parser reads the same text: integers that fit 64 bits as they
    are, every other number as a double; one beyond a double's range is refused."""
    if type(number) is int and _INT_MIN <= number <= _INT_MAX:
        return number
    try:
        double = float(number)
    except OverflowError:
        double = math.inf
    if math.isinf(double):
        raise BackupInvalid(f"the number {str(number)[:40]} is beyond a double's range")
    return double


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# ------------------------------------------------------------------ reading: either


class BackupReader:
    """Bytes in, batches of records out; our line layout when it is one, ijson otherwise."""

    def __init__(self) -> None:
        self._lines: LineReader | None = LineReader()
        self._events: EventReader | None = None
        self._buffer = b""
        self._head: list[bytes] = []  # kept until our header line is recognised

    @property
    def full(self) -> bool | None:
        return self._lines.full if self._lines is not None else self._events.full  # type: ignore[union-attr]

    @property
    def ours(self) -> bool:
        """Written by FuckBase: our line layout with our format header."""
        return self._lines is not None and self._lines.state != "start"

    @property
    def metadata(self) -> dict[str, Any]:
        reader = self._lines or self._events
        return reader.metadata if reader is not None else {}

    def feed(self, chunk: bytes) -> list[Record]:
        out: list[Record] = []
        if self._events is not None:
            self._events.feed(chunk, out)
            return out
        assert self._lines is not None
        if self._lines.state == "start":
            self._head.append(chunk)
        self._buffer += chunk
        lines = self._buffer.split(b"\n")
        self._buffer = lines.pop()
        try:
            self._lines.feed_lines(lines, out)
        except _NotOurs:
            self._switch(out)
        except (orjson.JSONDecodeError, ValueError) as exc:
            raise BackupInvalid(f"unparsable line: {exc}") from None
        if self._lines is not None and self._lines.state != "start":
            self._head = []
        return out

    def finish(self) -> list[Record]:
        out: list[Record] = []
        if self._lines is not None:
            try:
                if self._buffer.strip():
                    self._lines.feed_line(self._buffer.strip(), out)
                if self._lines is not None:
                    self._lines.finish(out)
                    return out
            except _NotOurs:
                self._switch(out)
            except (orjson.JSONDecodeError, ValueError) as exc:
                raise BackupInvalid(f"unparsable line: {exc}") from None
        assert self._events is not None
        self._events.finish(out)
        return out

    def _switch(self, out: list[Record]) -> None:
        self._lines, self._events = None, EventReader()
        head, self._head, self._buffer = b"".join(self._head), [], b""
        self._events.feed(head, out)
