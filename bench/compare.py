"""HTTP throughput of FuckBase side by side with a baseline server, in the same run.

Usage: .venv/bin/python bench/compare.py --baseline /path/to/fuckbase-go [--rounds 3] [--pinned]
       [--duration 10s] [--keys 100000] [--workers N] [--scripts get,put,query]
       [--request-logs ours|both|neither]

Both servers are started on fresh data dirs, preloaded with the same keys (value
{"name","email","age"}) and one email index, then wrk (`-t2 -c64`) runs each script against
them alternately (A B A B …, `--rounds` times). Printed per script: every run, the medians,
the ratio ours/baseline, and the server CPU time per request (all its processes, from
/proc/<pid>/stat before and after each run). `--pinned` puts each server on core 0
(`taskset -c 0`) and wrk on core 1: a per-core figure. `--request-logs`: which server writes
a line per request (to /dev/null): ours (the default; ours logs by default, the original is
run at `--log-level error`), both (each at its default: the original logs every request at
info), or neither (ours with `--no-access-log`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from load import preload  # noqa: E402

LUA = Path(__file__).parent / "lua"
CLOCK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out.extend(descendants(int(child)))
    return out


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK


class Server:
    def __init__(self, name: str, command: list[str], port: int, pinned: bool) -> None:
        self.name = name
        self.port = port
        self.data = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        prefix = ["taskset", "-c", "0"] if pinned else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUCKBASE_")}
        self.proc = subprocess.Popen(
            [*prefix, *command, "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(self.data)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(urllib.request.Request(self.url + "/server/info", b"{}"), timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"{name} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.data, ignore_errors=True)


def wrk(server: Server, script: str, duration: str, keys: int, pinned: bool) -> tuple[float, float, float]:
    """(req/s, p99 ms, server CPU µs per request) of one wrk run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write((LUA / f"{script}.lua").read_text() + (LUA / "report.lua").read_text())
    prefix = ["taskset", "-c", "1"] if pinned else []
    before = cpu_seconds(server.proc.pid)
    out = subprocess.run([*prefix, "wrk", "-t2", "-c64", f"-d{duration}", "-s", f.name, server.url],
                         capture_output=True, text=True, env={**os.environ, "KEYS": str(keys)}, check=True).stdout
    used = cpu_seconds(server.proc.pid) - before
    os.unlink(f.name)
    m = re.search(r"RESULT rps=(\d+) p50_ms=([\d.]+) p99_ms=([\d.]+) errors=(\d+) requests=(\d+)", out)
    if m is None:
        raise SystemExit(f"wrk gave no result: {out}")
    if int(m.group(4)):
        raise SystemExit(f"{server.name} {script}: {m.group(4)} errors")
    return float(m.group(1)), float(m.group(3)), used / int(m.group(5)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="the baseline server's binary (the original Go build)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--pinned", action="store_true")
    ap.add_argument("--workers", type=int, default=None, help="our --workers (default: ours)")
    ap.add_argument("--scripts", default="get,put,query")
    ap.add_argument("--request-logs", choices=["ours", "both", "neither"], default="ours")
    args = ap.parse_args()
    ours_cmd = [sys.executable, "-m", "fuckbase", "--log-level", "info", "--log-file", os.devnull]
    if args.request_logs == "neither":
        ours_cmd.append("--no-access-log")
    if args.workers:
        ours_cmd += ["--workers", str(args.workers)]
    baseline_cmd = [args.baseline] if args.request_logs == "both" else [args.baseline, "--log-level", "error"]
    servers = [
        Server("fuckbase", ours_cmd, 18701, args.pinned),
        Server("baseline", baseline_cmd, 18702, args.pinned),
    ]
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    print(f"machine: {os.cpu_count()} cores, {cpu}; {time.strftime('%Y-%m-%d')}; "
          f"{'pinned: servers on core 0, wrk on core 1' if args.pinned else 'unpinned'}; request logs: {args.request_logs}")
    try:
        for s in servers:
            asyncio.run(preload(s.url, args.keys))
        for script in args.scripts.split(","):
            results: dict[str, list[tuple[float, float, float]]] = {s.name: [] for s in servers}
            for r in range(args.rounds):
                for s in servers:
                    got = wrk(s, script, args.duration, args.keys, args.pinned)
                    results[s.name].append(got)
                    print(f"{script} round {r + 1} {s.name}: {got[0]:.0f} req/s, p99 {got[1]:.2f} ms, "
                          f"{got[2]:.1f} µs CPU/request", flush=True)
            med = {n: statistics.median(x[0] for x in v) for n, v in results.items()}
            cpu_med = {n: statistics.median(x[2] for x in v) for n, v in results.items()}
            print(f"{script}: fuckbase {med['fuckbase']:.0f} req/s, baseline {med['baseline']:.0f} req/s, "
                  f"ratio {med['fuckbase'] / med['baseline']:.2f}x; CPU/request {cpu_med['fuckbase']:.1f} µs vs "
                  f"{cpu_med['baseline']:.1f} µs", flush=True)
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()
