"""The embedded registry: the store's own `ACTIVE` pointer per task plus `HISTORY.json` beside it.

`ACTIVE` is the authority (it is what `adaptserve train --store` and a person with a shell write);
`HISTORY.json` holds the rollback stack, the audit log and per-version metadata, and is reconciled
with `ACTIVE` when they disagree. Writes are serialised in this process; there is no feed from
other processes, so this backend is for one replica (or replicas that only read a shared store:
they see a new `ACTIVE` on their next request, since a local store reads it every time).

What another process changes is heard as this replica's own changes are, so the listeners keep
the cache tiers and metric series as the Redis feed would:
* an activation or rollback (the old version leaves the device): by the first request that reads
  the new pointer, with no read of its own;
* a deleted task (its cached copies and metric series go): by the first request that finds it
  gone;
* either, and a deleted version of a task (its cached copies go), by a comparison with the store
  every `resync_s`: one listing of the task names, which takes the tasks this replica served or
  holds anything of (cached copies, metric series) that are gone; then, for each task with a copy
  in a cache tier only, one listing of its versions and one read of its `ACTIVE`. The cost is
  bounded by what the cache tiers hold, not by the store's tasks or versions.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from service.engine.types import TaskKey
from service.errors import AdaptserveError, StoreUnavailable, TaskNotFound, TaskUnavailable, VersionNotFound
from service.registry.base import (
    Registry, TaskRecord, activated, require_version, rolled_back, with_upload, without_version,
)
from service.store import ACTIVE_FILE, HISTORY_FILE, BundleStore, LocalStore, TaskListing, validate_task_name

log = logging.getLogger(__name__)


class LocalRegistry(Registry):
    backend = "local"

    def __init__(self, store: BundleStore, *, history_max: int = 100, pointer_ttl_s: float = 1.0,
                 resync_s: float = 60.0) -> None:
        super().__init__()
        self.store = store
        self.history_max = history_max
        self.pointer_ttl_s = pointer_ttl_s
        self.resync_s = resync_s
        self._watcher: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        # task -> (active key, loop time read): on a remote store a cache for `pointer_ttl_s`, so a
        # request is not an S3 GET; on either store what is served while the store cannot be read.
        self._resolved: dict[str, tuple[TaskKey, float]] = {}
        self._refreshing: set[str] = set()  # tasks whose pointer is being read again in the background
        self._outage = False  # the store failed a read and has not answered since: warned once

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch_store(), name="adaptserve-registry-store-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(self.resync_s)
            await self._compare_with_store()

    async def _compare_with_store(self) -> None:
        """What another process changed that no request noticed (see the module docstring). A task
        a request resolved while the store was read is left to what that request read."""
        held = self._held()
        resolved = dict(self._resolved)
        if not held and not resolved:
            return
        try:
            names = set(await asyncio.to_thread(self.store.task_names))
        except Exception:  # noqa: BLE001 - a store away is what requests report; try again later
            return
        for task in sorted((held.keys() | resolved.keys()) - names):
            if task in resolved:
                if self._resolved.get(task) is resolved[task]:
                    self._gone(task)
            elif task not in self._resolved:  # held (copies, series), never resolved to a version here
                self._gone(task, held=True)
        for task in sorted(t for t, versions in held.items() if versions and t in names):
            try:
                versions, key = await asyncio.to_thread(self._survey, task)
            except Exception:  # noqa: BLE001 - gone meanwhile, or the store away: the next round tells
                continue
            if key is not None and task in resolved and self._resolved.get(task) is resolved[task]:
                self._now_serves(task, key)
            self._notify_deleted(task, tuple(sorted(held[task].difference(versions))))

    def _survey(self, task: str) -> tuple[list[str], TaskKey | None]:
        """The versions of `task` in the store, and the one it serves (None: none, it is a 503):
        one listing of the task and one read of its ACTIVE. Blocking."""
        versions = self.store.versions(task)
        try:
            return versions, TaskKey(task, self.store.active_version(task, versions))
        except (TaskNotFound, TaskUnavailable):
            return versions, None

    def _now_serves(self, task: str, key: TaskKey) -> None:
        """The store says `task` serves `key`, as read now. Another version than this replica read
        last was activated by another process (an activation, a rollback): the listeners hear it as
        a change made here (the old version leaves the device)."""
        last = self._resolved.get(task)
        self._resolved[task] = (key, 0.0 if self.store.cheap_pointers else asyncio.get_running_loop().time())
        if last is not None and last[0] != key:
            self._notify(task, last[0].version, key.version)

    def _gone(self, task: str, *, held: bool = False) -> None:
        """`task` is no longer in the store: forget it, and tell the listeners it was deleted (its
        cached copies and metric series go), once: where it served here, or this replica `held`
        something of it."""
        last = self._resolved.pop(task, None)
        if last is not None or held:
            self._notify_task_deleted(task, last[0].version if last is not None else None)

    # -- reads -----------------------------------------------------------------------------------
    @property
    def may_block(self) -> bool:
        """Whether `resolve` can wait on the store (a remote one, for a task not seen yet)."""
        return not self.store.cheap_pointers

    async def resolve(self, task: str) -> TaskKey:
        """The active version. On a remote store (S3) the pointer is cached for `pointer_ttl_s`;
        once stale, a request answers with the version it knows while one background read per task
        refreshes it, so a slow or unreachable store never holds up a task this replica already
        serves (it keeps serving it, and says so in the log). A task not seen yet, or a TTL of 0,
        waits for the store."""
        validate_task_name(task)
        if self.store.cheap_pointers:
            try:
                key = self.store.resolve(task)  # a stat and a tiny read: fine on the loop
            except TaskNotFound:
                self._gone(task)  # deleted by another process, if it served here
                raise
            except StoreUnavailable:
                # The store's directory is gone or unreadable (a lost mount): a task this replica
                # has served keeps its version, as on a remote store and with Redis, so what is in
                # memory keeps serving; anything that must read the store fails with this 503.
                last = self._resolved.get(task)
                if last is None:
                    raise
                self._warn_stale(last[0])
                return last[0]
            self._store_answered()
            self._now_serves(task, key)  # what the next read is compared with, and what an outage serves
            return key
        loop = asyncio.get_running_loop()
        hit = self._resolved.get(task)
        if hit is not None and loop.time() - hit[1] < self.pointer_ttl_s:
            return hit[0]
        if hit is not None and self.pointer_ttl_s > 0:
            if task not in self._refreshing:
                self._refreshing.add(task)
                refresh = loop.create_task(self._refresh(task, hit[0]))
                refresh.add_done_callback(lambda _: self._refreshing.discard(task))
            return hit[0]
        try:
            key = await asyncio.to_thread(self.store.resolve, task)
        except TaskNotFound:
            self._gone(task)  # deleted by another process, if it served here
            raise
        except StoreUnavailable:
            if hit is None:
                raise
            self._stale(task, hit[0])
            return hit[0]
        self._store_answered()
        self._now_serves(task, key)
        return key

    async def _refresh(self, task: str, known: TaskKey) -> None:
        try:
            key = await asyncio.to_thread(self.store.resolve, task)
        except TaskNotFound:
            self._gone(task)  # deleted by another process
            return
        except TaskUnavailable:
            self._resolved.pop(task, None)  # the store's own answer: the next request gets it
            return
        except Exception:  # noqa: BLE001 - the store is away: keep serving what we know, retry after the TTL
            self._stale(task, known)
            return
        self._store_answered()
        self._now_serves(task, key)

    def _stale(self, task: str, known: TaskKey) -> None:
        self._resolved[task] = (known, asyncio.get_running_loop().time())
        self._warn_stale(known)

    def _warn_stale(self, known: TaskKey) -> None:
        if not self._outage:  # once per outage, not once per task per request (nor every 30 s)
            self._outage = True
            log.warning("the task store %s cannot be read; tasks keep serving the versions this replica "
                        "last read (e.g. %s) until it answers again", self.store.describe(), known)

    def _store_answered(self) -> None:
        if self._outage:
            self._outage = False
            log.info("the task store %s answers again", self.store.describe())

    def known(self, task: str) -> bool:
        if self.store.cheap_pointers:
            try:
                return self.store.has_task(task)
            except StoreUnavailable:
                # The store's directory is gone or unreadable: `has_task` says so with a 503 for the
                # routes, but `known` only picks a metrics label (after the answer was sent) and must
                # never raise; with no store to ask, a task is known if it is still being served.
                return task in self._resolved
        return task in self._resolved

    async def list_tasks(self) -> list[TaskListing]:
        return await asyncio.to_thread(self.store.list_tasks)

    async def listing(self, task: str) -> TaskListing | None:
        return await asyncio.to_thread(self.store.listing, task)

    async def record(self, task: str) -> TaskRecord:
        validate_task_name(task)
        return await asyncio.to_thread(self._read, task)

    # -- writes ----------------------------------------------------------------------------------
    async def add_version(self, task: str, version: str, meta: dict[str, Any], *, activate: bool,
                          created: bool = True) -> TaskRecord:
        def change(record: TaskRecord) -> TaskRecord:
            record = with_upload(record, version, meta, self.history_max, created=created)
            return activated(record, version, self.history_max) if activate else record

        # A version this upload stored must not count as the implicit active one: a new task's first
        # version, just written, is its only version with no ACTIVE yet, and would look active
        # already (its upload logged as "from" itself). A version re-sent was serving before.
        return await self._write(task, change, implicit=not created)

    async def activate(self, task: str, version: str) -> TaskRecord:
        def change(record: TaskRecord) -> TaskRecord:
            require_version(self.store.versions(task), task, version)
            # One replica, writes serialised: the files are the truth. A version deleted and then
            # written into the store again by hand or by `adaptserve train --store` may serve.
            record = replace(record, deleted=tuple(v for v in record.deleted if v != version))
            return activated(record, version, self.history_max)

        return await self._write(task, change)

    async def rollback(self, task: str, exists: Callable[[str], bool]) -> TaskRecord:
        return await self._write(task, lambda record: rolled_back(record, exists, self.history_max))

    async def forget_version(self, task: str, version: str, remove_files: Callable[[], Awaitable[None]]) -> TaskRecord:
        async with self._write_lock:
            record = await asyncio.to_thread(self._read, task)
            if not await asyncio.to_thread(self.store.has_version, task, version):
                raise VersionNotFound(f"task {task!r} has no version {version!r}")
            updated = without_version(record, version, self.history_max)
            await remove_files()
            await asyncio.to_thread(self._write_history, updated)
            self._resolved.pop(task, None)  # the next request reads the pointer afresh
        self._notify_deleted(task, (version,))
        return updated

    async def delete_task(self, task: str, remove_files: Callable[[], Awaitable[None]]) -> None:
        async with self._write_lock:
            old = (await asyncio.to_thread(self._read, task)).active
            await remove_files()  # the files are the registry: once they are gone, so is the task
            self._resolved.pop(task, None)  # the next request reads the pointer afresh
        self._notify_task_deleted(task, old)

    async def _write(self, task: str, change: Callable[[TaskRecord], TaskRecord], *, implicit: bool = True) -> TaskRecord:
        validate_task_name(task)
        async with self._write_lock:
            record = await asyncio.to_thread(self._read, task, implicit)
            updated = change(record)
            if updated == record:  # a no-op (e.g. the active version re-sent): nothing to write or tell
                return updated
            await asyncio.to_thread(self._persist, updated)
            # The next request reads the pointer afresh. One that read it while it was written has
            # told the listeners already.
            noticed = self._resolved.pop(task, None)
        if noticed is None or noticed[0].version != updated.active:
            self._notify(task, record.active, updated.active)
        return updated

    # -- files -----------------------------------------------------------------------------------
    def _read(self, task: str, implicit: bool = True) -> TaskRecord:
        """The task's record: HISTORY.json reconciled with the ACTIVE pointer (the authority).
        `implicit`: without an ACTIVE pointer, the task's only version is its active one (it is
        what the task serves)."""
        if not self.store.has_task(task):
            raise TaskNotFound(f"task {task!r} not found")
        text = self.store.read_pointer(task, HISTORY_FILE)
        record = TaskRecord(name=task)
        if text is not None:
            try:
                record = replace(TaskRecord.from_json(text), name=task)
            except (ValueError, KeyError, TypeError) as err:
                log.warning("task %s: ignoring unreadable %s (%s)", task, HISTORY_FILE, err)
        try:
            if implicit or self.store.read_pointer(task, ACTIVE_FILE) is not None:
                active = self.store.active_version(task)
            else:
                active = None
        except (TaskUnavailable, TaskNotFound):  # a broken pointer, or no version yet
            active = None
        if active != record.active:
            record = replace(record, active=active)
            if active is not None and (not record.stack or record.stack[-1] != active):
                record = replace(record, stack=(*record.stack, active))
        return record

    def _persist(self, record: TaskRecord) -> None:
        # History first: if we die between the two writes, ACTIVE (the authority) is still the old
        # version and the next read reconciles the history with it.
        self._write_history(record)
        pointer = self.store.read_pointer(record.name, ACTIVE_FILE)
        if record.active is not None and (pointer is None or pointer.strip() != record.active):
            self.store.write_pointer(record.name, ACTIVE_FILE, record.active + "\n")

    def _write_history(self, record: TaskRecord) -> None:
        data = json.loads(record.to_json())
        self.store.write_pointer(record.name, HISTORY_FILE, json.dumps(data, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def recording_activation(root: Path, task: str, version: str, meta: dict[str, Any], *, created: bool) -> Iterator[None]:
    """Around a write of `ACTIVE` from outside the service (`write_bundle`: `adaptserve train
    --store`, `pet`, `zeroshot`): once it succeeded, record the version's upload and activation in
    HISTORY.json as an upload through the service records them, so the versions listing shows it and
    a rollback goes back to the version it replaced. That one is read before the write: once ACTIVE
    moved, a task without a history has forgotten it. `created`: the files were written now.

    Best effort: ACTIVE is the authority, so a history that cannot be read or written (logged) only
    leaves rollback knowing less, never fails the publish; and a service writing the history at the
    same moment may lose one of the two entries (it serialises only its own writes)."""
    registry = LocalRegistry(LocalStore(root))
    try:
        before: TaskRecord | None = registry._read(task, implicit=not created)
    except (AdaptserveError, OSError) as err:
        log.warning("task %s: cannot read its %s (%s); %s@%s is not recorded there", task, HISTORY_FILE, err, task, version)
        before = None
    yield
    if before is None:
        return
    after = activated(with_upload(before, version, meta, registry.history_max, created=created), version, registry.history_max)
    if after != before:  # the active version published again: nothing happened
        try:
            registry._write_history(after)
        except OSError as err:
            log.warning("task %s: %s@%s is active, but its %s cannot be written (%s)", task, task, version, HISTORY_FILE, err)
