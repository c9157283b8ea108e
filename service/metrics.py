"""Prometheus metrics, one registry per app (so tests can build many apps in one process).

Requests are labelled by task *name*, never version, and names that are not in the store are
folded into one label, so a client cannot grow the series count. Cache and queue figures are read
from their owners at scrape time instead of being pushed on every change.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

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
# 1-based encoder layer that answered a row: every layer of 6- and 12-layer encoders (MiniLM,
# BERT-base), then coarser up to 48 (the deepest common encoders have 24).
EXIT_LAYER_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 24, 32, 48)


# An admin request's outcome, from its status: a few fixed words, so that an operator can alert on
# `refused` or `unavailable` without knowing every status, and the series count stays fixed.
_ADMIN_OUTCOMES = {401: "denied", 403: "denied", 404: "not_found", 409: "conflict", 429: "refused",
                   499: "client_gone", 503: "unavailable"}


def admin_outcome(status: int) -> str:
    """`ok` (2xx), a word for the statuses that mean something to an operator, else `invalid`
    (another 4xx: the request was wrong) or `error` (another 5xx)."""
    if 200 <= status < 300:
        return "ok"
    return _ADMIN_OUTCOMES.get(status) or ("invalid" if 400 <= status < 500 else "error")


# Why the server itself (`service.server`) refused a request, before or instead of the app: a few
# fixed words, never anything the client sent. 431 (a head or a body's trailer fields over
# ADAPTSERVE_MAX_HEADER_BYTES), 400 (a request the HTTP parser rejects), 408 (a head not complete
# within ADAPTSERVE_HEADER_READ_TIMEOUT_S).
REFUSAL_REASONS = ("headers_too_large", "malformed", "header_timeout")


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
        self.exit_layer = Histogram(
            "adaptserve_exit_layer",
            "Encoder layer (1-based) that answered each row of early-exit tasks, by task name.",
            ["task"],
            buckets=EXIT_LAYER_BUCKETS,
            registry=self.registry,
        )
        self.admin_actions = Counter(
            "adaptserve_admin_actions",
            "Admin requests (uploads, activations, rollbacks, deletions) by action and outcome.",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.connection_refusals = Counter(
            "adaptserve_connection_refusals",
            "Requests the server refused itself, closing their connection, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:  # each from 0: an alert's rate() sees the first refusal
            self.connection_refusals.labels(reason=reason)
        self._live = _LiveCollector()
        self.registry.register(self._live)
        self._tasks: set[str] = set()  # task names with series of their own (`tasks`)

    def observe_request(self, task: str, status: int, seconds: float) -> None:
        if task != UNKNOWN_TASK:
            self._tasks.add(task)
        self.requests.labels(task=task, status=str(status)).inc()
        self.request_latency.labels(task=task).observe(seconds)

    def observe_admin(self, action: str, status: int) -> None:
        self.admin_actions.labels(action=action, outcome=admin_outcome(status)).inc()

    def observe_refusal(self, reason: str) -> None:
        self.connection_refusals.labels(reason=reason).inc()

    def observe_exits(self, task: str, layers: "list[int | None]") -> None:
        self._tasks.add(task)
        histogram = self.exit_layer.labels(task=task)
        for layer in layers:
            if layer is not None:
                histogram.observe(layer)

    def forget_task(self, task: str) -> None:
        """Drop a deleted task's series: with tasks created and deleted all day, they would
        otherwise pile up in every scrape."""
        for metric in (self.requests, self.request_latency, self.exit_layer):
            metric.remove_by_labels({"task": task})
        self._tasks.discard(task)

    def tasks(self) -> set[str]:
        """The task names with series (not the one label of unknown names): what a delete must reach."""
        return set(self._tasks)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.forward_latency.observe(seconds)

    def watch(
        self,
        *,
        cache_stats: Callable[[], CacheStats | None],
        queue_depth: Callable[[], int],
        ready: Callable[[], bool],
        registry_status: Callable[[], dict[str, Any]] | None = None,
        pool_bytes: Callable[[], int] | None = None,
    ) -> None:
        """Tell the registry where to read the figures it reports at scrape time."""
        self._live.cache_stats = cache_stats
        self._live.queue_depth = queue_depth
        self._live.ready = ready
        if registry_status is not None:
            self._live.registry_status = registry_status
        if pool_bytes is not None:
            self._live.pool_bytes = pool_bytes

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LiveCollector(Collector):
    """Reads cache counters, slot pool bytes, queue depth and readiness when Prometheus scrapes."""

    def __init__(self) -> None:
        self.cache_stats: Callable[[], CacheStats | None] = lambda: None
        self.queue_depth: Callable[[], int] = lambda: 0
        self.ready: Callable[[], bool] = lambda: False
        self.registry_status: Callable[[], dict[str, Any]] = lambda: {}
        self.pool_bytes: Callable[[], int] = lambda: 0

    def describe(self) -> list:
        return []  # families are only known at collect time; nothing to check for clashes

    def collect(self) -> Iterator:
        stats = self.cache_stats() or CacheStats()
        for name, value, doc in (
            ("adaptserve_cache_hits", stats.hits, "Task lookups that found the task resident."),
            ("adaptserve_cache_misses", stats.misses, "Task lookups that had to load or wait for a load."),
            ("adaptserve_cache_loads", stats.loads, "Task loads started (concurrent misses share one)."),
            ("adaptserve_cache_load_failures", stats.load_failures, "Task loads that failed."),
            ("adaptserve_cache_failures_repeated", stats.failures_repeated,
             "Task lookups answered with a load failure remembered for ADAPTSERVE_FAILED_LOAD_RETRY_S, without a load."),
            ("adaptserve_cache_evictions", stats.evictions, "Tasks evicted from the device tier to stay within its byte budget."),
            ("adaptserve_cache_promotions", stats.promotions, "Tasks moved back from the host tier to the device (no store read)."),
            ("adaptserve_cache_demotions", stats.demotions, "Tasks moved from the device to the host tier."),
            ("adaptserve_cache_host_evictions", stats.host_evictions, "Tasks dropped from the host tier (store only)."),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        # A task evicted from the device tier holds its device memory until its copy to the host
        # tier is done (GPU only: on the CPU the tiers move tasks at once): counted here meanwhile.
        yield GaugeMetricFamily("adaptserve_cache_bytes", "Bytes of tasks resident on the device.",
                                value=stats.bytes + stats.copying_bytes)
        yield GaugeMetricFamily("adaptserve_cache_entries", "Tasks resident on the device.",
                                value=stats.entries + stats.copying_entries)
        yield GaugeMetricFamily("adaptserve_cache_host_bytes", "Bytes of tasks kept in host memory.", value=stats.host_bytes)
        yield GaugeMetricFamily("adaptserve_cache_host_entries", "Tasks kept in host memory.", value=stats.host_entries)
        yield GaugeMetricFamily("adaptserve_slot_pool_bytes",
                                "Bytes of the methods' slot pools (padded device copies of batched tasks).",
                                value=self.pool_bytes())
        registry = self.registry_status() or {}
        if "connected" in registry:
            yield GaugeMetricFamily(
                "adaptserve_registry_connected", "1 while the registry (and its change feed) is reachable.",
                value=int(bool(registry["connected"])),
            )
        if "resyncs" in registry:
            yield CounterMetricFamily("adaptserve_registry_resyncs", "Full resyncs of the registry into memory.", value=registry["resyncs"])
        yield GaugeMetricFamily("adaptserve_queue_depth", "Rows waiting for a forward.", value=self.queue_depth())
        yield GaugeMetricFamily("adaptserve_ready", "1 once the backbone is loaded and warmed up.", value=int(self.ready()))
