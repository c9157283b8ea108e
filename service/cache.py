"""The task cache: loaded tasks kept resident, least recently used evicted beyond a byte budget.

Lives on the event loop (no locks: only the loop touches it); loading runs in a thread. Concurrent
first requests for one key share one load. A failed load is not remembered: its waiters all get
the error and the next request tries again, so fixing a bundle on disk needs no restart.

Evicting only drops the cache's reference. A batch that already holds the Task keeps it alive
until the batch is done, so eviction never pulls weights out from under a forward.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Protocol, TypeVar

from service.engine.types import TaskKey
from service.errors import BundleError, TaskUnavailable

log = logging.getLogger(__name__)


class Sized(Protocol):
    nbytes: int  # resident bytes of the task's weights


T = TypeVar("T", bound=Sized)


@dataclass
class CacheStats:
    """Counters since the cache was made (read by the metrics collector at scrape time)."""

    hits: int = 0  # get() found the task resident
    misses: int = 0  # get() did not (it started a load or joined one in flight)
    loads: int = 0  # loads started; < misses when concurrent requests shared a load
    load_failures: int = 0
    evictions: int = 0
    bytes: int = 0  # resident bytes now
    entries: int = 0  # resident tasks now


class TaskCache(Generic[T]):
    """`await cache.get(key)` returns the loaded task for `key`, loading it at most once at a time."""

    def __init__(self, load: Callable[[TaskKey], T], max_bytes: int) -> None:
        """`load(key)` is blocking (disk IO, validation) and runs in a worker thread."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self._load = load
        self.max_bytes = max_bytes
        self._entries: OrderedDict[TaskKey, tuple[T, int]] = OrderedDict()  # LRU first
        self._pending: dict[TaskKey, asyncio.Task[T]] = {}
        self.stats = CacheStats()

    async def get(self, key: TaskKey) -> T:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]
        self.stats.misses += 1
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load_and_insert(key))
            pending.add_done_callback(_retrieve_exception)
            self._pending[key] = pending
        # shield: a waiter that gives up (client gone, deadline) must not cancel the load others share.
        return await asyncio.shield(pending)

    def peek(self, key: TaskKey) -> T | None:
        """The resident task for `key`, without loading it or touching the LRU order."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[TaskKey]:
        """Resident keys, least recently used first."""
        return list(self._entries)

    async def _load_and_insert(self, key: TaskKey) -> T:
        self.stats.loads += 1
        try:
            try:
                task = await asyncio.to_thread(self._load, key)
            except (BundleError, OSError) as err:
                raise as_unavailable(key, err) from err
            self._insert(key, task)
            return task
        except BaseException:
            self.stats.load_failures += 1
            raise
        finally:
            self._pending.pop(key, None)

    def _insert(self, key: TaskKey, task: T) -> None:
        size = int(task.nbytes)
        if size > self.max_bytes:
            raise TaskUnavailable(
                f"task {key} needs {size} bytes resident, more than the whole task cache "
                f"({self.max_bytes} bytes); raise ADAPTSERVE_CACHE_MAX_BYTES"
            )
        self._entries[key] = (task, size)
        self.stats.bytes += size
        while self.stats.bytes > self.max_bytes:
            old_key, (_, old_size) = self._entries.popitem(last=False)
            self.stats.bytes -= old_size
            self.stats.evictions += 1
            log.info("evicted task %s (%d bytes) from the task cache", old_key, old_size)
        self.stats.entries = len(self._entries)
        log.info("loaded task %s (%d bytes resident)", key, size)


def _retrieve_exception(future: asyncio.Future) -> None:
    # Every waiter may have left; mark the error retrieved so asyncio does not log it as lost.
    if not future.cancelled():
        future.exception()


def as_unavailable(key: TaskKey, err: BaseException) -> TaskUnavailable:
    """The 503 for a stored task whose bundle cannot be loaded (a BundleError is only a 422
    when the bundle is the thing a client uploaded)."""
    return TaskUnavailable(f"task {key} cannot be loaded: {getattr(err, 'message', err)}")
