"""Prometheus metrics across processes: counted in shared memory, exposed by prometheus_client.

Each worker counts its requests in a file-backed shared mapping of fixed layout (`Tallies`,
`<run dir>/tallies-<name>.bin`): one 64-bit slot per endpoint and status, and per endpoint a
latency histogram. A request costs a few slot increments, no lock and no system call; the
process answering a scrape reads every process's mapping and adds them up, so /metrics is
exact and live for all workers, as prometheus_client's multiprocess mode would be, without
its cost per increment. A restarted worker maps the same file and counts on from there.
Figures that change rarely (backups) are published as JSON by the process that owns them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import mmap
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUSES = 600
_HIST = len(BUCKETS) + 2  # the buckets, +Inf, then the sum in microseconds


class Tallies:
    """One process's request counts, in a mapping other processes can read."""

    def __init__(self, path: Path, endpoints: Sequence[str]) -> None:
        self.endpoints = list(endpoints)
        self._index = {e: i for i, e in enumerate(self.endpoints)}
        self._status_base = 0
        self._hist_base = len(self.endpoints) * STATUSES
        size = (self._hist_base + len(self.endpoints) * _HIST) * 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, 0)
            # the blocks, not just the size: writing a hole of a full disk through a mapping
            # would kill the process (SIGBUS)
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        except OSError:  # no room for it: count privately, unseen by the other processes
            self._map = mmap.mmap(-1, size)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("q")

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Called from one thread per process (the event loop's)."""
        e = self._index.get(endpoint, len(self.endpoints) - 1)
        slots = self._slots
        if 0 <= status < STATUSES:
            slots[e * STATUSES + status] += 1
        h = self._hist_base + e * _HIST
        slots[h + bisect_left(BUCKETS, seconds)] += 1
        slots[h + _HIST - 1] += int(seconds * 1e6)

    def answered(self) -> int:
        """The requests this process has counted, of every endpoint and status."""
        return sum(self._slots[: self._hist_base])

    @staticmethod
    def read(path: Path, endpoints: Sequence[str]) -> list[int] | None:
        """Another process's slots, or None when the file is not one of this layout."""
        n = len(endpoints) * (STATUSES + _HIST)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        if len(raw) != n * 8:
            return None
        return list(memoryview(raw).cast("q"))


class Metrics:
    """The request tallies of every process plus families read from the server at scrape time."""

    def __init__(self, tallies: Tallies, run_dir: Path) -> None:
        self.tallies = tallies
        self._run_dir = run_dir
        self._sources: list[Callable[[], Iterable[Metric]]] = []
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)
        self.observe = tallies.observe

    def add_source(self, source: Callable[[], Iterable[Metric]]) -> None:
        """Registers a callable that yields metric families at scrape time."""
        self._sources.append(source)

    def _summed(self) -> list[int]:
        endpoints = self.tallies.endpoints
        total = [0] * (len(endpoints) * (STATUSES + _HIST))
        for path in self._run_dir.glob("tallies-*.bin"):
            slots = Tallies.read(path, endpoints)
            if slots is not None:
                total = [a + b for a, b in zip(total, slots, strict=True)]
        return total

    def collect(self) -> Iterable[Metric]:
        endpoints = self.tallies.endpoints
        slots = self._summed()
        requests = CounterMetricFamily(
            "fuckbase_requests", "HTTP requests by endpoint and status", labels=["endpoint", "status"]
        )
        for e, endpoint in enumerate(endpoints):
            row = slots[e * STATUSES : (e + 1) * STATUSES]
            for status, n in enumerate(row):
                if n:
                    requests.add_metric([endpoint, str(status)], n)
        yield requests
        latency = HistogramMetricFamily(
            "fuckbase_request_duration_seconds", "Request latency by endpoint", labels=["endpoint"]
        )
        base = len(endpoints) * STATUSES
        for e, endpoint in enumerate(endpoints):
            h = slots[base + e * _HIST : base + (e + 1) * _HIST]
            if not any(h[:-1]):
                continue
            cumulative, buckets = 0, []
            for bound, n in zip((*BUCKETS, float("inf")), h[:-1], strict=True):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            latency.add_metric([endpoint], buckets, h[-1] / 1e6)
        yield latency
        for source in self._sources:
            yield from source()

    def render(self) -> bytes:
        return generate_latest(self._registry)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def gauge(name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> Metric:
    return _filled(GaugeMetricFamily(name, doc, labels=labels), samples)


def counter(name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> Metric:
    return _filled(CounterMetricFamily(name, doc, labels=labels), samples)


def _filled(family: GaugeMetricFamily | CounterMetricFamily, samples: Iterable[tuple[list[str], float]]) -> Metric:
    for label_values, value in samples:
        family.add_metric(label_values, value)
    return family


class Published:
    """Rarely changing figures of one process, as JSON in `<run dir>/<name>.json`."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.path = run_dir / f"{name}.json"

    def write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_bytes(orjson.dumps(data))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full disk: the figures wait for the next change

    def read(self) -> dict[str, Any]:
        try:
            data = orjson.loads(self.path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}


BACKEND_FIGURES = "storage-"  # <run dir>/storage-<process>.json: each process's storage backend figures


async def publish_backend_figures(figures: Callable[[], list[Any]], published: Published) -> None:
    """Every second, this process's backend figures (dataclasses), for whichever worker
    answers /metrics."""
    last = None
    while True:
        now = {"figures": [dataclasses.asdict(f) for f in figures()]}
        if now != last:
            published.write(now)
            last = now
        await asyncio.sleep(1.0)


def backend_metrics(run_dir: Path) -> Iterable[Metric]:
    """The backend figures of every process: gauges per process, counters summed."""
    found: dict[str, tuple[str, str, list[tuple[str, dict[str, str], float]]]] = {}
    for path in sorted(run_dir.glob(BACKEND_FIGURES + "*.json")):
        process = path.stem[len(BACKEND_FIGURES):]
        for f in Published(run_dir, path.stem).read().get("figures", []):
            _, _, samples = found.setdefault(f["name"], (f["doc"], f["kind"], []))
            samples.extend((process, sample, value) for sample, value in f["samples"])
    for name, (doc, kind, samples) in found.items():
        keys = sorted({k for _, sample, _ in samples for k in sample})
        summed: dict[tuple[str, ...], float] = {}
        for process, sample, value in samples:
            at = tuple(sample.get(k, "") for k in keys) + ((process,) if kind == "gauge" else ())
            summed[at] = summed.get(at, 0.0) + value
        labels = keys + (["process"] if kind == "gauge" else [])
        make = gauge if kind == "gauge" else counter
        yield make(f"fuckbase_storage_{name}", doc, labels, [(list(at), v) for at, v in summed.items()])
