"""Prometheus metrics: counted with plain integers on the hot path, exposed by prometheus_client.

Incrementing prometheus_client's labelled metrics costs microseconds (locks, label lookups)
per request; here a request costs a dict increment and a bisect under one short lock (requests
run on several threads), and the collector turns the tallies into metric families only when
/metrics is scraped.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0


class Metrics:
    """Request tallies plus gauges read from the rest of the server at scrape time."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self._sources: list[Callable[[], Iterable[Metric]]] = []
        self._lock = threading.Lock()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)  # type: ignore[arg-type]

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        k = (endpoint, status)
        bucket = bisect_left(BUCKETS, seconds)
        with self._lock:
            self.requests[k] = self.requests.get(k, 0) + 1
            h = self.latency.get(endpoint)
            if h is None:
                h = self.latency[endpoint] = _Histogram()
            h.counts[bucket] += 1
            h.total += seconds

    def add_source(self, source: Callable[[], Iterable[Metric]]) -> None:
        """Registers a callable that yields metric families at scrape time."""
        self._sources.append(source)

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "fuckbase_requests", "HTTP requests by endpoint and status", labels=["endpoint", "status"]
        )
        with self._lock:
            tallies = sorted(self.requests.items())
            histograms = sorted((e, list(h.counts), h.total) for e, h in self.latency.items())
        for (endpoint, status), n in tallies:
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        latency = HistogramMetricFamily(
            "fuckbase_request_duration_seconds", "Request latency by endpoint", labels=["endpoint"]
        )
        for endpoint, counts, total in histograms:
            cumulative, buckets = 0, []
            for bound, n in zip((*BUCKETS, float("inf")), counts):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            latency.add_metric([endpoint], buckets, total)
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
