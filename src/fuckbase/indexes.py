"""In-memory secondary indexes over one set, kept exactly in step with the committed data.

The engine calls `update(key, old_value, new_value)` inside the same synchronous step that
commits the write, so a query never sees an index entry without its value or the reverse.
Indexes are rebuilt from the data at startup; only their definitions are stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from sortedcontainers import SortedList

BASIC = 0
SORTABLE = 1

_MISSING = object()


def field_of(value: Any, field: str) -> Any:
    """The top-level field of a JSON object value, or _MISSING."""
    if isinstance(value, dict):
        return value.get(field, _MISSING)
    return _MISSING


def match_text(v: Any) -> str:
    """A field's value written as text: what `/index/query`'s "value" is compared with."""
    if isinstance(v, str):
        return v
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e21:
            return str(int(v))
        return repr(v)
    if v is None:
        return "null"
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()


def sort_key(v: Any) -> tuple[int, Any]:
    """Orders values: null < booleans < numbers < strings < arrays/objects (as JSON text)."""
    if isinstance(v, str):
        return (3, v)
    if isinstance(v, bool):
        return (1, int(v))
    if isinstance(v, (int, float)):
        return (2, v)
    if v is None:
        return (0, 0)
    return (4, orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode())


class _Top:
    """Compares above every key: the upper bound of a run of equal sort values."""

    def __lt__(self, other: object) -> bool:
        return False

    def __gt__(self, other: object) -> bool:
        return True


_TOP = _Top()


@dataclass(frozen=True)
class IndexDef:
    name: str
    field: str
    type: int = BASIC
    sort_fields: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"field": self.field, "type": self.type}
        if self.type == SORTABLE:
            d["sort_fields"] = list(self.sort_fields)
        return d

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> IndexDef:
        return cls(name, d["field"], int(d.get("type", BASIC)), tuple(d.get("sort_fields") or ()))


class BasicIndex:
    """Field text -> keys. A single key is stored bare to keep 1M unique values small."""

    def __init__(self, definition: IndexDef) -> None:
        self.definition = definition
        self.field = definition.field
        self._entries: dict[str, str | set[str]] = {}

    def update(self, key: str, old: Any, new: Any) -> None:
        f = self.field
        # inline field lookups: this runs for every write and every restored entry
        old_t = match_text(old[f]) if type(old) is dict and f in old else None
        new_t = match_text(new[f]) if type(new) is dict and f in new else None
        if old_t == new_t:
            if new_t is not None:
                self._add(new_t, key)
            return
        if old_t is not None:
            self._remove(old_t, key)
        if new_t is not None:
            self._add(new_t, key)

    def _add(self, text: str, key: str) -> None:
        cur = self._entries.get(text)
        if cur is None:
            self._entries[text] = key
        elif isinstance(cur, str):
            if cur != key:
                self._entries[text] = {cur, key}
        else:
            cur.add(key)

    def _remove(self, text: str, key: str) -> None:
        cur = self._entries.get(text)
        if cur is None:
            return
        if isinstance(cur, str):
            if cur == key:
                del self._entries[text]
            return
        cur.discard(key)
        if len(cur) == 1:
            self._entries[text] = next(iter(cur))
        elif not cur:
            del self._entries[text]

    def matches(self, value: Any, text: str) -> bool:
        """Whether a value belongs under `text` in this index."""
        return type(value) is dict and self.field in value and match_text(value[self.field]) == text

    def lookup(self, text: str) -> list[str]:
        cur = self._entries.get(text)
        if cur is None:
            return []
        if isinstance(cur, str):
            return [cur]
        return sorted(cur)

    def entry_count(self) -> int:
        return sum(1 if isinstance(v, str) else len(v) for v in self._entries.values())


class _Group:
    """The entries sharing one primary value: per sort field, a sorted list and the keys lacking it."""

    __slots__ = ("present", "missing", "size")

    def __init__(self, n_fields: int) -> None:
        self.present = [SortedList() for _ in range(n_fields)]
        self.missing = [SortedList() for _ in range(n_fields)]
        self.size = 0


class SortableIndex:
    """Primary field text -> entries kept sorted by each sort field, so a page costs O(log n)."""

    def __init__(self, definition: IndexDef) -> None:
        self.definition = definition
        self.field = definition.field
        self.sort_fields = definition.sort_fields
        self._positions = {f: i for i, f in enumerate(self.sort_fields)}
        self._rows: dict[str, tuple[str, tuple[Any, ...]]] = {}
        self._groups: dict[str, _Group] = {}

    def update(self, key: str, old: Any, new: Any) -> None:
        self._remove(key)
        pv = field_of(new, self.field)
        if pv is _MISSING:
            return
        text = match_text(pv)
        sort_values = tuple(
            None if (sv := field_of(new, f)) is _MISSING else sort_key(sv) for f in self.sort_fields
        )
        group = self._groups.get(text)
        if group is None:
            group = self._groups[text] = _Group(len(self.sort_fields))
        for i, sk in enumerate(sort_values):
            if sk is None:
                group.missing[i].add(key)
            else:
                group.present[i].add((sk[0], sk[1], key))
        group.size += 1
        self._rows[key] = (text, sort_values)

    def _remove(self, key: str) -> None:
        row = self._rows.pop(key, None)
        if row is None:
            return
        text, sort_values = row
        group = self._groups[text]
        for i, sk in enumerate(sort_values):
            if sk is None:
                group.missing[i].remove(key)
            else:
                group.present[i].remove((sk[0], sk[1], key))
        group.size -= 1
        if group.size == 0:
            del self._groups[text]

    def lookup(self, text: str) -> list[str]:
        group = self._groups.get(text)
        if group is None:
            return []
        return sorted([*(e[2] for e in group.present[0]), *group.missing[0]])

    def entry_count(self) -> int:
        return len(self._rows)

    def page(
        self, text: str, order: list[tuple[str, bool]], offset: int, limit: int
    ) -> tuple[int, list[str]]:
        """Total matches and one page of keys, sorted by `order` ((field, descending) pairs)."""
        group = self._groups.get(text)
        if group is None:
            return 0, []
        first, desc = order[0]
        pos = self._positions[first]
        rest = [(self._positions[f], d) for f, d in order[1:]]
        if not rest and not desc:
            return group.size, self._ascending_slice(group, pos, offset, limit)
        out: list[str] = []
        seen = 0
        for run in self._runs(group, pos, desc):
            n = len(run)
            if seen + n <= offset:
                seen += n
                continue
            if rest and n > 1:
                run = self._order_run(run, rest)
            out.extend(run[max(0, offset - seen) :])
            seen += n
            if len(out) >= limit:
                break
        return group.size, out[:limit]

    @staticmethod
    def _ascending_slice(group: _Group, pos: int, offset: int, limit: int) -> list[str]:
        """Ascending on one field is the sorted list's own order: slice it directly."""
        items, missing = group.present[pos], group.missing[pos]
        out = [e[2] for e in items.islice(offset, offset + limit)]
        if len(out) < limit:
            start = max(0, offset - len(items))
            out.extend(missing.islice(start, start + limit - len(out)))
        return out

    def _runs(self, group: _Group, pos: int, desc: bool) -> Iterator[list[str]]:
        """Keys in runs of equal sort value, in the requested direction; keys ascending inside a run."""
        items = group.present[pos]
        n = len(items)
        if not desc:
            i = 0
            while i < n:
                e = items[i]
                j = items.bisect_right((e[0], e[1], _TOP))
                yield [x[2] for x in items.islice(i, j)]
                i = j
        else:
            j = n
            while j > 0:
                e = items[j - 1]
                i = items.bisect_left((e[0], e[1]))
                yield [x[2] for x in items.islice(i, j)]
                j = i
        if group.missing[pos]:
            yield list(group.missing[pos])

    def _order_run(self, keys: list[str], rest: list[tuple[int, bool]]) -> list[str]:
        """Orders keys that tie on the first sort field by the remaining ones (stable, missing last)."""
        rows = self._rows
        ordered = sorted(keys)
        for pos, desc in reversed(rest):
            present = [k for k in ordered if rows[k][1][pos] is not None]
            missing = [k for k in ordered if rows[k][1][pos] is None]
            present.sort(key=lambda k: rows[k][1][pos], reverse=desc)
            ordered = present + missing
        return ordered


Index = BasicIndex | SortableIndex


def make_index(definition: IndexDef) -> Index:
    return SortableIndex(definition) if definition.type == SORTABLE else BasicIndex(definition)
