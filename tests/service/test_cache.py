from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

import pytest

from service import cache as cache_module
from service.cache import TaskCache
from service.engine.types import TaskKey
from service.errors import BundleError, StoreUnavailable, TaskTooLarge, TaskUnavailable
from tests.aio import async_test, wait_until

A, B, C = TaskKey("a", "v1"), TaskKey("b", "v1"), TaskKey("c", "v1")


@dataclass(eq=False)
class Loaded:
    key: TaskKey
    nbytes: int


class Loader:
    """Counts loads; optionally blocks on a gate or fails."""

    def __init__(self, nbytes: int = 40) -> None:
        self.nbytes = nbytes
        self.calls: list[TaskKey] = []
        self.gate: threading.Event | None = None
        self.error: Exception | None = None

    def __call__(self, key: TaskKey) -> Loaded:
        self.calls.append(key)
        if self.gate is not None:
            assert self.gate.wait(5), "gate never opened"
        if self.error is not None:
            raise self.error
        return Loaded(key, self.nbytes)


@async_test
async def test_evicts_least_recently_used_beyond_the_byte_budget() -> None:
    cache = TaskCache(Loader(nbytes=40), max_bytes=100)
    await cache.get(A)
    await cache.get(B)
    await cache.get(A)  # A is now more recent than B
    await cache.get(C)  # 120 bytes > 100: evict B
    assert cache.keys() == [A, C]
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.loads, stats.evictions) == (1, 3, 3, 1)
    assert (stats.bytes, stats.entries) == (80, 2)


@async_test
async def test_evicted_task_stays_usable_by_its_holders() -> None:
    cache = TaskCache(Loader(nbytes=60), max_bytes=100)
    held = await cache.get(A)
    await cache.get(B)  # evicts A
    assert A not in cache and cache.peek(A) is None
    assert held.key == A  # a batch holding A keeps a live object
    assert await cache.get(A) is not held  # a new request reloads it


@pytest.mark.parametrize("failure_ttl_s", [0.01, 0.0])  # 0: failed loads are retried per request, this is not
@async_test
async def test_task_larger_than_the_whole_budget_is_unavailable_and_not_cached(failure_ttl_s: float) -> None:
    """No retry can help (the budget and the version's size are fixed while the server runs): the
    503 has no Retry-After, names the budget's setting as given, and the store is not read again
    per request, nor once the failed-load retry time has passed (or with no retry time at all); an
    activation's forget_failure (or a drop) does read it again."""
    loader = Loader(nbytes=101)
    cache = TaskCache(loader, max_bytes=100, failure_ttl_s=failure_ttl_s, max_bytes_setting="--cache-max-bytes")
    for _ in range(3):
        with pytest.raises(TaskTooLarge, match=r"more than the whole task cache \(100 bytes\): it cannot be served "
                                              r"until --cache-max-bytes is raised") as refused:
            await cache.get(A)
        assert refused.value.headers == {} and refused.value.error_type == "task_unavailable"
        await asyncio.sleep(0.02)
    assert cache.keys() == [] and cache.stats.bytes == 0 and loader.calls == [A] and cache.stats.load_failures == 1
    assert "--cache-max-bytes" in cache.last_failure(A)
    cache.forget_failure(A)
    with pytest.raises(TaskTooLarge):
        await cache.get(A)
    assert loader.calls == [A, A]


@async_test
async def test_concurrent_first_requests_share_one_load() -> None:
    loader = Loader()
    loader.gate = threading.Event()
    cache = TaskCache(loader, max_bytes=1000)
    waiters = [asyncio.ensure_future(cache.get(A)) for _ in range(10)]
    await wait_until(lambda: len(loader.calls) == 1)
    loader.gate.set()
    results = await asyncio.gather(*waiters)
    assert all(result is results[0] for result in results)
    assert loader.calls == [A]
    assert (cache.stats.misses, cache.stats.loads, cache.stats.hits) == (10, 1, 0)


@async_test
async def test_load_failure_reaches_every_waiter_and_is_retried_later() -> None:
    loader = Loader()
    loader.gate = threading.Event()
    loader.error = BundleError("adapter_config.json: r must be positive")
    cache = TaskCache(loader, max_bytes=1000)
    waiters = [asyncio.ensure_future(cache.get(A)) for _ in range(5)]
    await wait_until(lambda: len(loader.calls) == 1)
    loader.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    for result in results:
        assert isinstance(result, TaskUnavailable)
        assert "r must be positive" in result.message and "a@v1" in result.message
    assert loader.calls == [A] and cache.stats.load_failures == 1 and A not in cache

    loader.error = None  # the bundle was fixed on disk
    assert (await cache.get(A)).key == A
    assert loader.calls == [A, A]


@pytest.mark.parametrize(
    "error, expected, message, tracebacks",
    [
        (TypeError("cannot convert dictionary update sequence element #0 to a sequence"), TaskUnavailable,
         "task a@v1 cannot be loaded: TypeError: cannot convert dictionary update sequence", 1),
        (ValueError("invalid literal for int() with base 10: 'abc'"), TaskUnavailable,
         "task a@v1 cannot be loaded: ValueError: invalid literal for int()", 1),
        (BundleError("r must be positive"), TaskUnavailable, "task a@v1 cannot be loaded: r must be positive", 0),
        (StoreUnavailable("task store s3://b/ failed"), StoreUnavailable, "task store s3://b/ failed", 0),
    ],
    ids=["TypeError", "ValueError", "BundleError", "StoreUnavailable passes through"],
)
@async_test
async def test_whatever_a_load_raises_fails_that_task_alone(error: Exception, expected: type, message: str,
                                                             tracebacks: int, caplog: pytest.LogCaptureFixture) -> None:
    """A stored bundle that trips the loader is a 503 for its task, never a 500; an unexpected
    error's traceback is logged once for a load that every waiter shared."""
    loader = Loader()
    loader.gate = threading.Event()
    loader.error = error
    cache = TaskCache(loader, max_bytes=1000)
    waiters = [asyncio.ensure_future(cache.get(A)) for _ in range(3)]
    await wait_until(lambda: bool(loader.calls))
    loader.gate.set()
    for result in await asyncio.gather(*waiters, return_exceptions=True):
        assert type(result) is expected and message in result.message
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == tracebacks and all(r.levelname == "WARNING" for r in logged)
    assert loader.calls == [A] and cache.stats.load_failures == 1


@async_test
async def test_a_waiter_giving_up_does_not_cancel_the_shared_load() -> None:
    loader = Loader()
    loader.gate = threading.Event()
    cache = TaskCache(loader, max_bytes=1000)
    impatient = asyncio.ensure_future(cache.get(A))
    patient = asyncio.ensure_future(cache.get(A))
    await wait_until(lambda: len(loader.calls) == 1)
    impatient.cancel()
    loader.gate.set()
    assert (await patient).key == A
    assert impatient.cancelled() and A in cache and loader.calls == [A]


@async_test
async def test_load_completes_into_the_cache_even_if_every_waiter_left() -> None:
    loader = Loader()
    loader.gate = threading.Event()
    cache = TaskCache(loader, max_bytes=1000)
    waiter = asyncio.ensure_future(cache.get(A))
    await wait_until(lambda: len(loader.calls) == 1)
    waiter.cancel()
    loader.gate.set()
    await wait_until(lambda: A in cache)
    assert await cache.get(A) is cache.peek(A)
    assert loader.calls == [A]


@pytest.mark.parametrize("delete", [lambda cache: cache.drop(A), lambda cache: cache.drop_task(A.name)],
                         ids=["version deleted", "task deleted"])
@async_test
async def test_a_load_that_finishes_after_its_version_was_deleted_is_not_cached(delete) -> None:
    """A load in flight (a prefetch, a request) when the delete is heard answers its waiter but
    leaves nothing in the cache: the version was dropped, and nothing resolves to it any more."""
    loader = Loader()
    loader.gate = threading.Event()
    cache = TaskCache(loader, max_bytes=1000)
    waiter = asyncio.ensure_future(cache.get(A))
    await wait_until(lambda: len(loader.calls) == 1)
    delete(cache)  # heard while the load runs
    loader.gate.set()
    assert (await waiter).key == A  # a request that resolved A before the delete still gets it
    assert A not in cache and cache.peek(A) is None and (cache.stats.bytes, cache.stats.entries) == (0, 0)
    assert (await cache.get(A)).key == A and A in cache  # uploaded again: loaded afresh
    assert loader.calls == [A, A]


@async_test
async def test_a_load_let_go_by_a_delete_leaves_the_load_after_it_alone() -> None:
    """A get() after the delete starts a load of its own (the version may have been uploaded again):
    the old load failing on the deleted files is not remembered, and does not end the new load."""
    gates, calls = [threading.Event(), threading.Event()], []

    def load(key: TaskKey) -> Loaded:
        attempt = len(calls)
        calls.append(key)
        assert gates[attempt].wait(5), "gate never opened"
        if attempt == 0:
            raise BundleError("adapter_config.json: No such file")  # its files went with the delete
        return Loaded(key, 40)

    cache = TaskCache(load, max_bytes=1000, failure_ttl_s=60.0)
    old = asyncio.ensure_future(cache.get(A))
    await wait_until(lambda: len(calls) == 1)
    cache.drop(A)
    new = asyncio.ensure_future(cache.get(A))
    await wait_until(lambda: len(calls) == 2)
    gates[0].set()
    with pytest.raises(TaskUnavailable, match="No such file"):
        await old
    joined = asyncio.ensure_future(cache.get(A))  # joins the new load: neither a remembered failure nor a third load
    gates[1].set()
    assert (await new) is (await joined) is cache.peek(A)
    assert calls == [A, A]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("workload, budget, warned", [
    ([A, B, C] * 40, 2, True),  # three tasks through room for two: every lookup loads
    ([A, B] * 60, 2, False),  # the same lookups, all resident after the first two
    ([TaskKey(f"t{i}", "v1") for i in range(120)], 120, False),  # a cold start: loads, no evictions
], ids=["thrashing", "resident", "cold start"])
@async_test
async def test_a_thrashing_device_tier_is_named_in_the_log_once_a_window(workload: list[TaskKey], budget: int, warned: bool,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Evictions are DEBUG lines: without this warning a replica that reads the store for nearly
    every request logs nothing. It names the budget's setting, and comes at most once a window."""
    clock = Clock()
    cache = TaskCache(Loader(nbytes=40), max_bytes=40 * budget, clock=clock, max_bytes_setting="--cache-max-bytes")
    with caplog.at_level(logging.WARNING, logger="service.cache"):
        for key in workload:
            await cache.get(key)
        clock.now += cache_module.THRASH_WINDOW_S
        for key in workload[:3]:  # the next misses close the window: one warning at most, then a new window
            cache.drop(key)
            await cache.get(key)
    thrashing = [r.getMessage() for r in caplog.records if "thrashing" in r.getMessage()]
    assert len(thrashing) == int(warned)
    if warned:
        assert thrashing[0].startswith("the task cache is thrashing: 120 of 120 task lookups in the last 60 s missed "
                                       "the device tier (120 store loads started) and 118 tasks were evicted")
        assert thrashing[0].endswith("need more than --cache-max-bytes (80 bytes): raise it if memory allows")
