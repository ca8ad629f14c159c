"""The PostgreSQL backend against the embedded LMDB backend, in the same run, on this machine.

Usage: .venv/bin/python bench/postgresql.py [--rounds 3] [--duration 10s] [--keys 100000]
       [--big 1000000] [--only http,nodes,page,index,backup]

A throw-away PostgreSQL cluster (Debian's package, as tests/pgserver.py starts it) serves the
PostgreSQL nodes; every figure is side by side with the LMDB backend's from the same run.

http:   get, put and query req/s (wrk -t2 -c64, bench/lua) of one LMDB node and one PostgreSQL
        node, preloaded alike, run alternately (A B A B …), medians and the ratio PG/LMDB;
        put_changed: puts whose values differ from the ones stored (put's are the same
        value for a key every time, which PostgreSQL does not write again).
nodes:  put and get req/s of two PostgreSQL nodes loaded at once (a wrk each, -t1 -c32)
        against one node (-t2 -c64), alternately; with the CPU each process took.
page:   a sorted page of 10 out of 100,000 matches (first, middle and last pages, both
        directions), milliseconds per page, in this process against each backend.
index:  a basic index created on --big entries, seconds, each backend.
backup: a backup (zstd, local folder) of --big entries and its restore, seconds and the
        node's RSS growth, each backend, alternately, medians of --rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from compare import Server, cpu_seconds, wrk  # noqa: E402
from load import preload  # noqa: E402
from scale import machine_busy  # noqa: E402

from fuckbase.storage import SORTABLE, IndexDef, Put, Storage, allow_all  # noqa: E402
from fuckbase.storage.lmdb import LmdbStorage  # noqa: E402
from fuckbase.storage.postgresql import PostgresStorage  # noqa: E402

OURS = [sys.executable, "-m", "fuckbase", "--log-level", "info", "--log-file", os.devnull]


def call(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url + path, json.dumps(body or {}).encode())
    with urllib.request.urlopen(req, timeout=1800) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def http(pg: Any, args: argparse.Namespace) -> None:
    servers = [Server("lmdb", OURS, 18711, False), Server("postgresql", [*OURS, "--storage", pg.new_database()], 18712, False)]
    try:
        for s in servers:
            asyncio.run(preload(s.url, args.keys))
        for script in ("get", "put", "put_changed", "query"):
            results: dict[str, list[float]] = {s.name: [] for s in servers}
            for r in range(args.rounds):
                for s in servers if r % 2 == 0 else reversed(servers):
                    rps, p99, cpu = wrk(s, script, args.duration, args.keys, False)
                    results[s.name].append(rps)
                    print(f"{script} round {r + 1} {s.name}: {rps:.0f} req/s, p99 {p99:.2f} ms, {cpu:.0f} µs CPU/request "
                          "(FuckBase's processes)", flush=True)
            med = {n: statistics.median(v) for n, v in results.items()}
            print(f"{script}: lmdb {med['lmdb']:.0f} req/s, postgresql {med['postgresql']:.0f} req/s, "
                  f"ratio {med['postgresql'] / med['lmdb']:.2f}x", flush=True)
    finally:
        for s in servers:
            s.stop()


def _wrk_many(targets: list[tuple[Server, str]], script: str, duration: str, keys: int) -> float:
    """Runs one wrk per (server, flags) at once; their req/s summed."""
    from compare import LUA

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write((LUA / f"{script}.lua").read_text() + (LUA / "report.lua").read_text())
    procs = [subprocess.Popen(["wrk", *flags.split(), f"-d{duration}", "-s", f.name, s.url], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "KEYS": str(keys)}) for s, flags in targets]
    total = 0.0
    for p in procs:
        out, _ = p.communicate()
        total += float(out.split("RESULT rps=")[1].split()[0])
    os.unlink(f.name)
    return total


def nodes(pg: Any, args: argparse.Namespace) -> None:
    url = pg.new_database()
    a = Server("pg-a", [*OURS, "--storage", url], 18713, False)
    b = Server("pg-b", [*OURS, "--storage", url], 18714, False)
    try:
        asyncio.run(preload(a.url, args.keys))
        for script in ("get", "put"):
            one: list[float] = []
            two: list[float] = []
            for _ in range(args.rounds):
                one.append(_wrk_many([(a, "-t2 -c64")], script, args.duration, args.keys))
                before = {p: cpu_seconds(p) for p in (a.proc.pid, b.proc.pid, pg.proc.pid)}
                two.append(_wrk_many([(a, "-t1 -c32"), (b, "-t1 -c32")], script, args.duration, args.keys))
                used = {p: cpu_seconds(p) - t for p, t in before.items()}
                print(f"{script}: one node {one[-1]:.0f} req/s, two nodes {two[-1]:.0f} req/s; CPU seconds of the"
                      f" two-node run: node a {used[a.proc.pid]:.1f}, node b {used[b.proc.pid]:.1f},"
                      f" PostgreSQL {used[pg.proc.pid]:.1f}", flush=True)
            print(f"{script}: two nodes / one node = {statistics.median(two) / statistics.median(one):.2f}x", flush=True)
    finally:
        a.stop()
        b.stop()


def _fill(storage: Storage, n: int, value: Callable[[int], Any]) -> None:
    storage.create_database("b", None)
    ops: list[Put] = []
    for i in range(n):
        v = value(i)
        ops.append(Put(f"k{i:08d}", v, orjson.dumps(v)))
        if len(ops) == 5000:
            storage.batch("b", "s", ops, allow_all)
            ops = []
    if ops:
        storage.batch("b", "s", ops, allow_all)


def _backends(pg: Any) -> list[tuple[str, Callable[[], Storage]]]:
    lmdb_dir = tempfile.mkdtemp(prefix="bench-lmdb-")
    url = pg.new_database()
    return [("lmdb", lambda: LmdbStorage(Path(lmdb_dir) / "store", primary=True)), ("postgresql", lambda: PostgresStorage(url))]


def page(pg: Any, args: argparse.Namespace) -> None:
    rng = random.Random(1)
    for name, opener in _backends(pg):
        storage = opener()
        try:
            _fill(storage, 100_000, lambda i: {"g": "x", "n": rng.randrange(1_000_000), "name": f"n{i % 97}"})
            storage.create_index("b", "s", IndexDef("by", "g", SORTABLE, ("n", "name")), allow_all)
            for desc in (False, True):
                for offset in (0, 50_000, 99_990):
                    times = []
                    for _ in range(30):
                        t = time.perf_counter()
                        with storage.read() as view:
                            p = view.page(view.database("b"), "s", "by", "x", [("n", desc)], offset, 10)
                        times.append((time.perf_counter() - t) * 1000)
                        assert p.total == 100_000 and len(p.entries) == 10
                    print(f"page {name}: 10 of 100,000 at offset {offset}, {'descending' if desc else 'ascending'}:"
                          f" {statistics.median(times):.2f} ms (median of 30)", flush=True)
        finally:
            storage.close()


def index(pg: Any, args: argparse.Namespace) -> None:
    for name, opener in _backends(pg):
        storage = opener()
        try:
            _fill(storage, args.big, lambda i: {"email": f"user{i}@example.com", "age": i % 90})
            t = time.perf_counter()
            storage.create_index("b", "s", IndexDef("email", "email"), allow_all)
            print(f"index {name}: basic index on {args.big:,} entries in {time.perf_counter() - t:.1f} s", flush=True)
        finally:
            storage.close()


class _Peak:
    """The highest RSS of a process tree while a block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _rss(self) -> int:
        from compare import descendants

        total = 0
        for p in descendants(self.pid):
            try:
                total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except FileNotFoundError:
                pass
        return total

    def __enter__(self) -> _Peak:
        self.start = self._rss()
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def backup(pg: Any, args: argparse.Namespace) -> None:
    """Backup and restore of each backend in turn, --rounds times (a restore replaces the
    database with the same data), each after the machine has gone quiet: a restore leaves
    the replaced database to reclaim, a fresh load PostgreSQL's autovacuum to run."""
    servers = [Server("lmdb", [*OURS, "--backup-compression", "zstd"], 18715, False),
               Server("postgresql", [*OURS, "--backup-compression", "zstd", "--storage", pg.new_database()], 18716, False)]
    took: dict[str, dict[str, list[float]]] = {s.name: {"backup": [], "restore": []} for s in servers}
    grew: dict[str, dict[str, list[float]]] = {s.name: {"backup": [], "restore": []} for s in servers}
    try:
        for s in servers:
            asyncio.run(preload(s.url, args.big))
        for r in range(args.rounds):
            for s in servers:
                for step in ("backup", "restore"):
                    quiet_by = time.perf_counter() + 120
                    os.sync()
                    while time.perf_counter() < quiet_by and machine_busy(1.0) >= 0.05:
                        pass
                    with _Peak(s.proc.pid) as peak:
                        t = time.perf_counter()
                        if step == "backup":
                            name = call(s.url, "/backup/create", {"database": "bench"})["backup_name"]
                        else:
                            call(s.url, "/backup/restore", {"backup_name": name})
                        took[s.name][step].append(time.perf_counter() - t)
                    grew[s.name][step].append((peak.peak - peak.start) / 2**20)
                print(f"backup round {r + 1} {s.name}: backed up in {took[s.name]['backup'][-1]:.2f} s,"
                      f" restored in {took[s.name]['restore'][-1]:.2f} s", flush=True)
        for s in servers:
            print(f"backup {s.name}: {args.big:,} entries backed up in {statistics.median(took[s.name]['backup']):.2f} s"
                  f" (+{max(grew[s.name]['backup']):.0f} MB), restored in {statistics.median(took[s.name]['restore']):.2f} s"
                  f" (+{max(grew[s.name]['restore']):.0f} MB); medians of {args.rounds}, largest growth", flush=True)
        for step in ("backup", "restore"):
            ratio = statistics.median(took["postgresql"][step]) / statistics.median(took["lmdb"][step])
            print(f"{step}: postgresql / lmdb = {ratio:.2f}x", flush=True)
    finally:
        for s in servers:
            s.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument("--only", default="http,nodes,page,index,backup")
    args = ap.parse_args()
    from pgserver import running_postgres

    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    print(f"machine: {os.cpu_count()} cores, {cpu}; {time.strftime('%Y-%m-%d')}")
    with running_postgres() as pg:
        for part in args.only.split(","):
            {"http": http, "nodes": nodes, "page": page, "index": index, "backup": backup}[part](pg, args)


if __name__ == "__main__":
    main()
