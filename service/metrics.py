"""Prometheus metrics, one registry per app (so tests can build many apps in one process).

Requests are labelled by task *name*, never version, and names that are not in the store are
folded into one label, so a client cannot grow the series count. Cache and queue figures are read
from their owners at scrape time instead of being pushed on every change.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.cache import CacheStats

UNKNOWN_TASK = "_unknown"  # label for requests naming a task that is not in the store

# Seconds. A warm request is a few ms of batching wait plus a forward of ms (GPU) to tens of ms
# (CPU); the tail reaches the 10 s default deadline, and a cold load sits in between.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Rows per forward: powers of two up to past the largest sensible max_batch_size.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Every metric the service exports, in its own `CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adaptserve_requests",
            "Classify requests by task name and HTTP status.",
            ["task", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "adaptserve_request_duration_seconds",
            "Classify request latency by task name, from the first byte read to the response.",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "adaptserve_batch_size",
            "Rows per batched forward.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.forward_latency = Histogram(
            "adaptserve_forward_duration_seconds",
            "Time of one batched forward in the worker thread.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._live = _LiveCollector()
        self.registry.register(self._live)

    def observe_request(self, task: str, status: int, seconds: float) -> None:
        self.requests.labels(task=task, status=str(status)).inc()
        self.request_latency.labels(task=task).observe(seconds)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.forward_latency.observe(seconds)

    def watch(
        self,
        *,
        cache_stats: Callable[[], CacheStats | None],
        queue_depth: Callable[[], int],
        ready: Callable[[], bool],
    ) -> None:
        """Tell the registry where to read the figures it reports at scrape time."""
        self._live.cache_stats = cache_stats
        self._live.queue_depth = queue_depth
        self._live.ready = ready

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LiveCollector(Collector):
    """Reads cache counters, queue depth and readiness when Prometheus scrapes."""

    def __init__(self) -> None:
        self.cache_stats: Callable[[], CacheStats | None] = lambda: None
        self.queue_depth: Callable[[], int] = lambda: 0
        self.ready: Callable[[], bool] = lambda: False

    def describe(self) -> list:
        return []  # families are only known at collect time; nothing to check for clashes

    def collect(self) -> Iterator:
        stats = self.cache_stats() or CacheStats()
        for name, value, doc in (
            ("adaptserve_cache_hits", stats.hits, "Task lookups that found the task resident."),
            ("adaptserve_cache_misses", stats.misses, "Task lookups that had to load or wait for a load."),
            ("adaptserve_cache_loads", stats.loads, "Task loads started (concurrent misses share one)."),
            ("adaptserve_cache_load_failures", stats.load_failures, "Task loads that failed."),
            ("adaptserve_cache_evictions", stats.evictions, "Tasks evicted to stay within the byte budget."),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("adaptserve_cache_bytes", "Resident bytes of cached tasks.", value=stats.bytes)
        yield GaugeMetricFamily("adaptserve_cache_entries", "Cached (resident) tasks.", value=stats.entries)
        yield GaugeMetricFamily("adaptserve_queue_depth", "Rows waiting for a forward.", value=self.queue_depth())
        yield GaugeMetricFamily("adaptserve_ready", "1 once the backbone is loaded and warmed up.", value=int(self.ready()))
