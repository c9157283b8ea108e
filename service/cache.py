"""The task cache, in tiers: device (bounded in bytes) -> host memory (bounded in bytes) -> store.

* A task evicted from the device tier (least recently used beyond `max_bytes`) is copied to CPU
  tensors and kept in the host tier, up to `host_max_bytes`; a later request promotes it back
  with a host-to-device copy, without reading or re-validating the store's files.
* Evicted from the host tier too, it is only in the store, and the next request loads it.

Lives on the event loop (no locks: only the loop touches it); loads, promotions and copies to
host run in threads. Serving on the CPU, the device *is* host memory: the cache is made without
copy functions, and a move between the tiers is bookkeeping done at once on the loop, with no
thread and no copy (the tiers keep their own budgets). Concurrent first requests for one key
share one load or promotion. A failed load, whatever raised, is a 503 `task_unavailable` for that
task alone (`load_or_unavailable`). A bundle that cannot load is remembered for `failure_ttl_s`
(`ADAPTSERVE_FAILED_LOAD_RETRY_S`): its requests meanwhile get the same 503 with Retry-After, so a
broken task under load is not re-read and re-hashed per request; then the store is read again,
so fixing a bundle on disk needs no restart. Until a later load of it is tried, the version
listings show that failure (`last_failure`).

Evicting only drops the cache's reference. A batch that already holds the Task keeps it alive
until the batch is done, so eviction never pulls weights out from under a forward. Keys are
`TaskKey(name, version)`: two versions of a task are two entries, so a swap never mixes them.
Dropping a key (its version or task was deleted) also lets go of a load or promotion of it in
flight: that one still answers its waiters but inserts nothing and remembers no failure, so a
deleted version never comes back into a tier it was dropped from.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Literal, Protocol, TypeVar

from service.engine.types import TaskKey
from service.errors import AdaptserveError, BundleError, TaskTooLarge, TaskUnavailable

log = logging.getLogger(__name__)

Location = Literal["device", "host", "store"]

# A device tier too small for the tasks in use says so in the log, at most once a window: a window
# in which most lookups missed and tasks were evicted. Evictions are DEBUG lines and the counters
# need a dashboard, so without this a replica reading the store for nearly every request logs nothing.
THRASH_WINDOW_S = 60.0
THRASH_MIN_MISSES = 100  # fewer in a window: a cold start or a long tail of rare tasks, not thrashing


class Sized(Protocol):
    nbytes: int  # resident bytes of the task's weights


T = TypeVar("T", bound=Sized)


@dataclass
class CacheStats:
    """Counters since the cache was made (read by the metrics collector at scrape time)."""

    hits: int = 0  # get() found the task on the device
    misses: int = 0  # get() did not (it loaded, promoted, or joined one in flight)
    loads: int = 0  # loads from the store started; < misses when requests shared a load
    load_failures: int = 0
    failures_repeated: int = 0  # get() answered with a failed load it remembered, without a load
    evictions: int = 0  # tasks evicted from the device tier
    bytes: int = 0  # device tier bytes now
    entries: int = 0  # device tier tasks now
    # Evicted from the device tier, copy to host still running: on the device until it is done,
    # outside the tier's budget (metrics add them to the device gauges).
    copying_bytes: int = 0
    copying_entries: int = 0
    promotions: int = 0  # host -> device, no store read
    demotions: int = 0  # device -> host copies completed
    host_evictions: int = 0  # dropped from the host tier (back to store only)
    host_bytes: int = 0
    host_entries: int = 0


def _same(task: T) -> T:
    return task


class TaskCache(Generic[T]):
    """`await cache.get(key)` returns the loaded task for `key` on the device, loading or
    promoting it at most once at a time."""

    def __init__(
        self,
        load: Callable[[TaskKey], T],
        max_bytes: int,
        *,
        host_max_bytes: int = 0,
        to_host: Callable[[T], T] | None = None,
        to_device: Callable[[T], T] | None = None,
        failure_ttl_s: float = 0.0,
        max_bytes_setting: str = "ADAPTSERVE_CACHE_MAX_BYTES",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`load(key)`, `to_host(task)` and `to_device(task)` are blocking and run in threads.
        Without `to_host` and `to_device` the device tier is in host memory already: tasks move
        between the tiers as they are. A load that fails with TaskUnavailable (a corrupt or
        unreadable bundle) is remembered for `failure_ttl_s`: meanwhile get() raises it again
        at once instead of re-reading and re-hashing the files for every request. A task larger
        than `max_bytes` is remembered until it is forgotten (`forget_failure`, `drop`): its size
        and the budget never change while the server runs. `max_bytes_setting`: the setting that
        gave `max_bytes`, as messages name it (its flag or its variable). `clock`: seconds, for the
        failure memory and the thrashing warning (tests pass their own)."""
        if max_bytes < 1 or host_max_bytes < 0 or failure_ttl_s < 0:
            raise ValueError("max_bytes must be positive, host_max_bytes and failure_ttl_s >= 0")
        self._load = load
        self._copies = to_host is not None or to_device is not None
        self._to_host = to_host or _same
        self._to_device = to_device or _same
        self.max_bytes = max_bytes
        self.max_bytes_setting = max_bytes_setting
        self.host_max_bytes = host_max_bytes
        self._entries: OrderedDict[TaskKey, tuple[T, int]] = OrderedDict()  # device tier, LRU first
        self._host: OrderedDict[TaskKey, tuple[T, int]] = OrderedDict()  # host tier, LRU first
        # Evicted from the device, copy to host in flight: still whole on the device meanwhile.
        self._demoting: dict[TaskKey, tuple[T, int]] = {}
        self._pending: dict[TaskKey, asyncio.Future[T]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.failure_ttl_s = failure_ttl_s
        # key -> (message, clock() time it is retried, or None: never, the task is too large)
        self._failed: dict[TaskKey, tuple[str, float | None]] = {}
        self.stats = CacheStats()
        self._clock = clock
        self._window = (clock(), 0, 0, 0, 0)  # start, hits, misses, loads, evictions then

    async def get(self, key: TaskKey) -> T:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]
        pending = self._pending.get(key)
        if pending is None:
            self._raise_if_failed(key)  # a failures_repeated, not a miss: nothing loads
        self._warn_if_thrashing()  # before counting this miss: it opens the next window
        self.stats.misses += 1
        if pending is None:
            demoting = self._demoting.pop(key, None)
            if demoting is not None:  # its copy to host is still running: take the device copy back
                self._count_copying()
                self._insert(key, demoting[0])
                return demoting[0]
            host = self._host.pop(key, None)
            if host is not None:
                self.stats.host_bytes -= host[1]
                self.stats.host_entries = len(self._host)
                if not self._copies:  # the same memory: nothing to copy, no thread to wait for
                    self._insert(key, host[0])
                    self.stats.promotions += 1
                    return host[0]
                pending = asyncio.ensure_future(self._promote(key, host[0]))
            else:
                pending = asyncio.ensure_future(self._load_and_insert(key))
            pending.add_done_callback(_retrieve_exception)
            self._pending[key] = pending
        # shield: a waiter that gives up (client gone, deadline) must not cancel the load others share.
        return await asyncio.shield(pending)

    def forget_failure(self, key: TaskKey) -> None:
        """The next get() of `key` reads the store even if its last load failed moments ago
        (an admin activating it wants today's files, not a remembered error)."""
        self._failed.pop(key, None)

    def last_failure(self, key: TaskKey) -> str | None:
        """Why the last load of `key` failed, if it did and no load was tried since (its retry
        time may have passed): what a listing shows, without reading the store."""
        failed = self._failed.get(key)
        return failed[0] if failed is not None else None

    def insert(self, key: TaskKey, task: T) -> None:
        """Put an already loaded task on the device tier (e.g. the one an upload validated)."""
        self._failed.pop(key, None)
        if key in self._entries or key in self._pending:
            return
        if self._demoting.pop(key, None) is not None:
            self._count_copying()
        if self._host.pop(key, None) is not None:
            self._count_host()
        self._insert(key, task)

    def location(self, key: TaskKey) -> Location:
        if key in self._entries or key in self._demoting:
            return "device"
        if key in self._host:
            return "host"
        return "store"

    def peek(self, key: TaskKey) -> T | None:
        """The task for `key` from any tier, without loading it or touching the LRU order."""
        for tier in (self._entries, self._demoting, self._host):
            entry = tier.get(key)
            if entry is not None:
                return entry[0]
        return None

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[TaskKey]:
        """Device-resident keys, least recently used first."""
        return list(self._entries)

    def host_keys(self) -> list[TaskKey]:
        return list(self._host)

    def held(self) -> set[TaskKey]:
        """Every key with a copy in a tier (on the device, being copied to host, in the host tier)."""
        return {*self._entries, *self._demoting, *self._host}

    def demote(self, key: TaskKey) -> None:
        """Move `key` from the device to the host tier now (its task was swapped out)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._count_device()
            self._to_host_tier(key, *entry)

    def drop_task(self, name: str) -> None:
        """Forget every version of task `name` in every tier and let go of its loads in flight
        (the task was deleted)."""
        for tier in (self._entries, self._demoting, self._host, self._failed, self._pending):
            for key in [k for k in tier if k.name == name]:
                del tier[key]
        self._count_device()
        self._count_copying()
        self._count_host()

    def drop(self, key: TaskKey) -> None:
        """Forget one version in every tier and let go of its load in flight (the version was deleted)."""
        for tier in (self._entries, self._demoting, self._host, self._failed, self._pending):
            tier.pop(key, None)
        self._count_device()
        self._count_copying()
        self._count_host()

    async def close(self) -> None:
        """Wait for copies to host still running (shutdown, tests)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # -- internals -------------------------------------------------------------------------------
    async def _load_and_insert(self, key: TaskKey) -> T:
        self.stats.loads += 1
        try:
            task = await asyncio.to_thread(load_or_unavailable, self._load, key)
            if self._wanted(key):
                self._insert(key, task)
            return task
        except TaskUnavailable as err:
            self.stats.load_failures += 1
            too_large = isinstance(err, TaskTooLarge)  # remembered whatever failure_ttl_s: no retry helps
            if not self._wanted(key) or (self.failure_ttl_s <= 0 and not too_large):
                raise
            self._remember_failure(key, err.message, retry=not too_large)
            raise self._failure(key) from err
        except BaseException:
            self.stats.load_failures += 1
            raise
        finally:
            if self._wanted(key):
                del self._pending[key]

    def _wanted(self, key: TaskKey) -> bool:
        """Whether the load or promotion running now is still the one the cache waits for: a drop
        (the version was deleted) lets it go, and a get() after that starts a load of its own."""
        return self._pending.get(key) is asyncio.current_task()

    def _warn_if_thrashing(self) -> None:
        now = self._clock()
        start, hits, misses, loads, evictions = self._window
        if now - start < THRASH_WINDOW_S:
            return
        stats = self.stats
        self._window = (now, stats.hits, stats.misses, stats.loads, stats.evictions)
        hits, misses, loads, evictions = (stats.hits - hits, stats.misses - misses, stats.loads - loads,
                                          stats.evictions - evictions)
        if misses >= THRASH_MIN_MISSES and misses > hits and evictions > 0:
            log.warning("the task cache is thrashing: %d of %d task lookups in the last %.0f s missed the device "
                        "tier (%d store loads started) and %d tasks were evicted from it; the tasks in use need "
                        "more than %s (%d bytes): raise it if memory allows", misses, hits + misses, now - start,
                        loads, evictions, self.max_bytes_setting, self.max_bytes)

    def _remember_failure(self, key: TaskKey, message: str, retry: bool = True) -> None:
        now = self._clock()
        if len(self._failed) >= 1024:  # bounded by the stored versions anyway; expired ones go first
            self._failed = {k: v for k, v in self._failed.items() if v[1] is None or v[1] > now}
        self._failed[key] = (message, now + self.failure_ttl_s if retry else None)

    def _raise_if_failed(self, key: TaskKey) -> None:
        failed = self._failed.get(key)
        if failed is None:
            return
        if failed[1] is not None and self._clock() >= failed[1]:
            del self._failed[key]
            return
        self.stats.failures_repeated += 1
        raise self._failure(key)

    def _failure(self, key: TaskKey) -> TaskUnavailable:
        """A fresh 503 for a remembered failure, with Retry-After: when the store is read again
        (none for a task too large to serve: no retry helps)."""
        message, retry_at = self._failed[key]
        if retry_at is None:
            return TaskTooLarge(message)
        return TaskUnavailable(message, headers={"Retry-After": str(max(1, math.ceil(retry_at - self._clock())))})

    async def _promote(self, key: TaskKey, host_task: T) -> T:
        try:
            try:
                task = await asyncio.to_thread(self._to_device, host_task)
            except Exception as err:  # noqa: BLE001 - e.g. device out of memory: the store may still do
                log.warning("promoting task %s from host memory failed (%s); loading it from the store", key, err)
                return await self._load_and_insert(key)  # still this key's pending: new requests join it
            if self._wanted(key):
                self._insert(key, task)
                self.stats.promotions += 1
                log.debug("promoted task %s from host memory to the device", key)
            return task
        finally:
            if self._wanted(key):
                del self._pending[key]

    def check_fits(self, key: TaskKey, task: T) -> None:
        """TaskTooLarge if `task` alone needs more than the whole device tier."""
        size = int(task.nbytes)
        if size > self.max_bytes:
            raise TaskTooLarge(
                f"task {key} needs {size} bytes resident, more than the whole task cache ({self.max_bytes} "
                f"bytes): it cannot be served until {self.max_bytes_setting} is raised (a restart) or a "
                "smaller version of it is activated"
            )

    def _insert(self, key: TaskKey, task: T) -> None:
        self.check_fits(key, task)
        size = int(task.nbytes)
        previous = self._entries.pop(key, None)
        self._entries[key] = (task, size)
        self.stats.bytes += size - (previous[1] if previous else 0)
        self.stats.entries = len(self._entries)
        while self.stats.bytes > self.max_bytes:
            old_key, (old_task, old_size) = self._entries.popitem(last=False)
            self.stats.bytes -= old_size
            self.stats.entries = len(self._entries)
            self.stats.evictions += 1
            log.debug("evicted task %s (%d bytes) from the device tier", old_key, old_size)
            self._to_host_tier(old_key, old_task, old_size)
        log.debug("task %s resident on the device (%d bytes)", key, size)

    def _to_host_tier(self, key: TaskKey, task: T, size: int) -> None:
        if size > self.host_max_bytes:
            return  # no host tier, or the task alone exceeds it: back to the store only
        if not self._copies:
            self._add_to_host(key, task, size)
            return
        self._demoting[key] = (task, size)
        self._count_copying()
        job = asyncio.ensure_future(self._copy_to_host(key, task, size))
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _copy_to_host(self, key: TaskKey, task: T, size: int) -> None:
        try:
            host_task = await asyncio.to_thread(self._to_host, task)
        except Exception as err:  # noqa: BLE001
            log.warning("copying task %s to host memory failed (%s); it stays in the store only", key, err)
            if self._demoting.get(key, (None,))[0] is task:
                del self._demoting[key]
                self._count_copying()
            return
        if self._demoting.get(key, (None,))[0] is not task:
            return  # promoted back (or dropped) while we copied
        del self._demoting[key]
        self._count_copying()
        self._add_to_host(key, host_task, size)

    def _add_to_host(self, key: TaskKey, host_task: T, size: int) -> None:
        self._host[key] = (host_task, size)
        self.stats.demotions += 1
        self.stats.host_bytes += size
        self.stats.host_entries = len(self._host)
        while self.stats.host_bytes > self.host_max_bytes:
            old_key, (_, old_size) = self._host.popitem(last=False)
            self.stats.host_evictions += 1
            self.stats.host_bytes -= old_size
            self.stats.host_entries = len(self._host)
            log.debug("evicted task %s (%d bytes) from the host tier", old_key, old_size)

    def _count_device(self) -> None:
        self.stats.bytes = sum(size for _, size in self._entries.values())
        self.stats.entries = len(self._entries)

    def _count_copying(self) -> None:
        self.stats.copying_bytes = sum(size for _, size in self._demoting.values())
        self.stats.copying_entries = len(self._demoting)

    def _count_host(self) -> None:
        self.stats.host_bytes = sum(size for _, size in self._host.values())
        self.stats.host_entries = len(self._host)


def _retrieve_exception(future: asyncio.Future) -> None:
    # Every waiter may have left; mark the error retrieved so asyncio does not log it as lost.
    if not future.cancelled():
        future.exception()


def load_or_unavailable(load: Callable[[TaskKey], T], key: TaskKey) -> T:
    """`load(key)` (blocking), any failure a 503 `task_unavailable` naming the task and the reason:
    whatever a stored bundle provokes while loading fails that task alone, never the request with
    a 500. Errors that already say what is wrong (TaskUnavailable, StoreUnavailable) pass through."""
    try:
        return load(key)
    except (BundleError, OSError) as err:
        raise as_unavailable(key, err) from err
    except AdaptserveError:
        raise
    except Exception as err:  # noqa: BLE001 - e.g. a TypeError a malformed config provokes in a parser
        log.warning("task %s failed to load", key, exc_info=True)  # the traceback, once per load
        raise as_unavailable(key, err) from err


def as_unavailable(key: TaskKey, err: BaseException) -> TaskUnavailable:
    """The 503 for a stored task whose bundle cannot be loaded (a BundleError is only a 422
    when the bundle is the thing a client uploaded)."""
    if isinstance(err, AdaptserveError):
        reason = err.message
    elif isinstance(err, OSError):
        reason = str(err)
    else:  # unexpected: its type is half the story (a KeyError says only 'x')
        reason = f"{type(err).__name__}: {err}"
    return TaskUnavailable(f"task {key} cannot be loaded: {reason}")
