"""Hot swap: upload, activate, roll back and delete task versions while the server serves.

The order of every change is what makes it safe:
1. validate the upload completely (structure, then the engine's own parse against the
   backbone, then one probe forward of two rows whose scores must be finite) in a temporary
   directory outside the store: a refused upload touches nothing;
2. publish the version durably (`BundleStore.put_version`: temp, fsync, rename);
3. only then point the registry at it (activation), which tells every replica (feed).
A version about to become active (upload, activate, rollback) is loaded before the registry
flips, so it is never half-loaded and a version that cannot load is never activated.

Requests resolve the active version once, then hold that version's Task object through the
scheduler, so requests already admitted finish on the version they started with, and new
requests get the new one. On a change this replica demotes the old version to the host tier
(a rollback re-promotes it without touching the store) and prefetches the new one.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from service.engine.model_id import other_base_model
from service.engine.types import ClassifyItem, TaskKey
from service.errors import (
    AdaptserveError, BundleError, Conflict, Overloaded, RegistryUnavailable, TaskNotFound, TaskTooLarge, TaskUnavailable,
    UploadRejected, VersionNotFound,
)
from service.registry.base import TaskRecord
from service.store import CONFIG_FILE, WEIGHTS_FILE, stored_problem, validate_task_name, validate_version
from service.upload import BundleFiles, Part, UploadLimits, assemble

if TYPE_CHECKING:
    from service.state import EngineLike, ServiceState, TaskLike

log = logging.getLogger(__name__)

UPLOAD_RETRY_AFTER_S = 2  # a bundle at the default limits is read and validated in about a second or two
STORE_ATTEMPTS = 3  # an upload's files removed by a concurrent delete are written again, this many times in all


@dataclass(frozen=True)
class UploadResult:
    task: str
    version: str
    active: bool
    created: bool  # False: identical content was already stored, intact, under this version
    source: str
    kind: str
    warnings: tuple[str, ...] = ()  # stored, but probably not what was meant (`base_model_warnings`)


def load_upload(engine: "EngineLike", key: TaskKey, files: BundleFiles) -> "TaskLike":
    """Parse an assembled upload with the engine, exactly as serving will, from a directory outside
    the store: shapes, layer counts, NaN/Inf, labels vs head, backbone fingerprint. Then one probe
    forward of two short rows through the engine's own classify (so templates, demonstrations and
    exits run as they serve): finite weights can still overflow in arithmetic (a head of 3e38s)
    and would answer NaN scores. Blocking, in the upload's worker thread, like the parse.
    UploadRejected for anything the bundle provokes; the store is never touched."""
    try:
        with tempfile.TemporaryDirectory(prefix="adaptserve-upload-") as tmp:
            (Path(tmp) / CONFIG_FILE).write_bytes(files.config)
            (Path(tmp) / WEIGHTS_FILE).write_bytes(files.weights)
            task = engine.load_task(Path(tmp), key)
        pair = "a second short text" if task.input_kind == "pair" else None
        full_depth = None
        if task.has_exits:  # row 1 exits as the task's policy says, row 2 runs every layer to the head
            from service.methods.exits import ExitPolicy  # imports torch: only for exit tasks

            full_depth = ExitPolicy("off")
            if problems := task.exit_problems():
                raise BundleError(problems[0], problems=problems)
        probe = [ClassifyItem(task, "a short probe text", pair), ClassifyItem(task, "another one", pair, full_depth)]
        for answer in engine.classify(probe):  # a row with non-finite logits comes back as an error
            if isinstance(answer, Exception):
                raise BundleError("task outputs non-finite scores on a probe input: weights overflow "
                                  "(some tensor is finite but too large for the backbone's arithmetic)")
        return task
    except BundleError as err:
        raise UploadRejected(err.problems) from None
    except Exception as err:  # noqa: BLE001 - whatever a hostile bundle provokes is the bundle's problem
        log.warning("task %s: upload failed to load in the engine", key.name, exc_info=True)
        raise UploadRejected([f"the bundle cannot be loaded: {type(err).__name__}: {err}"]) from None


class TaskAdmin:
    """Every admin change of tasks, serialised per task within this replica."""

    def __init__(self, state: "ServiceState") -> None:
        self.state = state
        self.limits = UploadLimits.from_settings(state.settings)
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.max_uploads = state.settings.max_concurrent_uploads
        self._upload_slots = asyncio.Semaphore(self.max_uploads)
        state.registry.subscribe(self.on_change, self.on_versions_deleted, self.holdings)

    def _lock(self, task: str) -> asyncio.Lock:
        return self._locks.setdefault(task, asyncio.Lock())

    # -- uploads ---------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def upload_slot(self) -> AsyncIterator[None]:
        """One of `max_concurrent_uploads` places, or 429 at once: no queue, since a waiting upload
        would hold its connection (and soon its body) while it waits."""
        if self._upload_slots.locked():
            raise Overloaded(
                f"{self.max_uploads} uploads are already in progress on this replica (the limit); retry later",
                retry_after_s=UPLOAD_RETRY_AFTER_S,
            )
        async with self._upload_slots:  # not locked, and no await since the check: never waits
            yield

    async def upload(self, task: str, parts: list[Part], *, activate: bool) -> UploadResult:
        from service.engine.bundle import content_version

        validate_task_name(task)
        runtime = self.state.require_runtime()  # the engine validates the bundle
        self.state.registry.require_writable()  # fail before any work while the registry is away
        try:
            # Unpacking an archive, checking the safetensors header and hashing the content take a
            # CPU-second per ~500 MB: in a thread, so a large upload does not stall the requests
            # this replica serves meanwhile.
            files = await asyncio.to_thread(assemble, parts, self.limits)
            warnings = self.base_model_warnings(files)
            version = await asyncio.to_thread(content_version, files.config, files.weights)
            loaded = await self._validate_with_engine(task, version, files)
            if activate:  # refused before it is stored: a version that would serve must fit the device tier
                try:
                    runtime.cache.check_fits(TaskKey(task, version), loaded)
                except TaskTooLarge as err:
                    raise UploadRejected([err.message], too_large=True) from None
        except UploadRejected as err:  # an admin event: one line, whatever the access log says
            log.info("task %s: upload refused (%d problem%s): %s", task, len(err.problems),
                     "" if len(err.problems) == 1 else "s", "; ".join(err.problems)[:500])
            raise
        key = TaskKey(task, version)
        async with self._lock(task):
            self.state.registry.require_writable()
            if not activate and not await asyncio.to_thread(self._versions, task):
                # A task's only version is the one it serves (the store's rule): there is no way to
                # hold its first version back, so say so rather than serve it anyway.
                raise Conflict(f"task {task!r} has no version yet; its first version serves at once: "
                               "upload it without activate=false")
            meta = {"uploaded_at": round(time.time(), 3), "bytes": len(files.config) + len(files.weights),
                    "source": files.source, "kind": files.kind, "warnings": list(warnings)}
            for attempt in range(1, STORE_ATTEMPTS + 1):
                created = await asyncio.to_thread(self.state.store.put_version, task, version, files.config, files.weights)
                runtime.cache.forget_failure(key)  # its files are whole now (a damaged copy was just replaced)
                if activate:
                    runtime.cache.insert(key, loaded)  # warm before the flip: the first request does not load
                try:
                    record = await self.state.registry.add_version(task, version, meta, activate=activate,
                                                                   created=created)
                    break
                except VersionNotFound:
                    # A delete of the task or of this very version, made through another replica,
                    # removed the files between their writing and the registry's commit (which checks
                    # them): the upload comes after that delete, so its files are written again.
                    runtime.cache.drop(key)
                    if attempt == STORE_ATTEMPTS:
                        raise RegistryUnavailable(f"task {task!r}: deletes made through another replica kept "
                                                  f"removing version {version} as it was stored; retry") from None
                    log.info("task %s: version %s was removed by a delete made meanwhile; storing it again", task, version)
        log.info("task %s: %s version %s (%s upload)%s", task, "stored" if created else "re-sent", version,
                 files.source, ", now active" if record.active == version else "")
        for warning in warnings:
            log.warning("task %s: version %s: %s", task, version, warning)
        return UploadResult(task, version, record.active == version, created, files.source, files.kind, warnings)

    def base_model_warnings(self, files: BundleFiles) -> tuple[str, ...]:
        """A PEFT adapter whose config names another base model than the backbone (`model_id`): a
        warning, or UploadRejected where `upload_refuse_other_base_model` says so."""
        backbone = self.state.require_runtime().engine.backbone
        other = other_base_model(files.base_model, getattr(backbone, "model_id", None))
        if other is None:
            return ()
        if self.state.settings.upload_refuse_other_base_model:
            raise UploadRejected([f"{other} (this server refuses adapters for another base model: "
                                  "ADAPTSERVE_UPLOAD_REFUSE_OTHER_BASE_MODEL)"])
        return (other,)

    async def _validate_with_engine(self, task: str, version: str, files: BundleFiles) -> "TaskLike":
        engine = self.state.require_runtime().engine
        return await asyncio.to_thread(load_upload, engine, TaskKey(task, version), files)

    # -- activation ------------------------------------------------------------------------------
    async def activate(self, task: str, version: str) -> TaskRecord:
        validate_task_name(task)
        validate_version(task, version)
        self.state.registry.require_writable()
        async with self._lock(task):
            # TaskNotFound (404 task_not_found) when the task has nothing stored, as on every route.
            if not await asyncio.to_thread(self.state.store.has_version, task, version):
                raise VersionNotFound(f"task {task!r} has no version {version!r}")
            key = TaskKey(task, version)
            await self._preload(key)
            try:
                return await self.state.registry.activate(task, version)
            except (TaskNotFound, VersionNotFound):  # deleted meanwhile: the copy just loaded must not linger
                self.state.require_runtime().cache.drop(key)
                raise

    async def rollback(self, task: str) -> TaskRecord:
        validate_task_name(task)
        self.state.registry.require_writable()
        async with self._lock(task):
            versions = set(await asyncio.to_thread(self._versions, task))
            record = await self._record(task)
            target = record.rollback_target(versions.__contains__)
            if target is not None:
                await self._preload(TaskKey(task, target))
            return await self.state.registry.rollback(task, versions.__contains__)

    async def _preload(self, key: TaskKey) -> None:
        """Load the version about to serve; refuse the change if it cannot load. A load from the
        store checks the files against the id; a cached copy skips that, so its stored files are
        checked here: a version damaged on disk would serve only until the next restart or
        eviction, and every other replica loads from disk."""
        runtime = self.state.require_runtime()
        # The store itself, never a copy of it (an S3 store's local cache may still hold a version
        # whose object is gone from the bucket, which every other replica would then fail to load).
        missing = await asyncio.to_thread(self.state.store.missing_files, key)
        if missing:
            raise BundleError(f"version {key.version!r} of task {key.name!r} cannot be served, so it was not "
                              f"activated: {' and '.join(missing)} missing from {self.state.store.describe()}; "
                              "upload the bundle again (the same files repair it) or delete the version")
        try:
            if runtime.cache.peek(key) is not None:  # in any tier: get() would not read the store
                await asyncio.to_thread(self.state.store.bundle_dir, key)
            runtime.cache.forget_failure(key)  # judge today's files, not a load that failed a moment ago
            await runtime.cache.get(key)
        except TaskUnavailable as err:
            raise BundleError(f"version {key.version!r} of task {key.name!r} cannot be served, so it was not "
                              f"activated: {err.message}") from None

    # -- deletion --------------------------------------------------------------------------------
    async def delete_version(self, task: str, version: str) -> TaskRecord:
        validate_task_name(task)
        validate_version(task, version)
        self.state.registry.require_writable()
        key = TaskKey(task, version)

        async def remove_files() -> None:
            await asyncio.to_thread(self.state.store.delete_version, key)
            if self.state.runtime is not None:
                self.state.runtime.cache.drop(key)

        async with self._lock(task):
            record = await self.state.registry.forget_version(task, version, remove_files)
        log.info("task %s: version %s deleted", task, version)
        return record

    async def delete_task(self, task: str) -> None:
        validate_task_name(task)
        self.state.registry.require_writable()

        async def remove_files() -> None:
            await asyncio.to_thread(self.state.store.delete_task, task)

        async with self._lock(task):
            await self.state.registry.delete_task(task, remove_files)
        if self.state.runtime is not None:
            self.state.runtime.cache.drop_task(task)
        log.info("task %s deleted", task)

    # -- reads -----------------------------------------------------------------------------------
    async def versions(self, task: str) -> tuple[TaskRecord, list[dict[str, Any]], str | None]:
        """The task's record, a row per stored version, and why it has no active version (None
        when it has one): the reason the task listing gives, in its words."""
        validate_task_name(task)
        stored = await asyncio.to_thread(self._versions, task)
        record = await self._record(task, known_in_store=bool(stored))
        if not stored and record.active is None:  # as classify says it: 404 while a first upload writes
            await asyncio.to_thread(self.state.store.resolve, task)  # its files, 503 if ACTIVE names a lost one
        cache = self.state.runtime.cache if self.state.runtime is not None else None
        problems = await self.problems(task, record, stored)
        rows = []
        for version in stored:
            meta = record.versions.get(version, {})
            rows.append({
                "version": version,
                "active": version == record.active,
                "location": cache.location(TaskKey(task, version)) if cache is not None else "store",
                "uploaded_at": meta.get("uploaded_at"),
                "bytes": meta.get("bytes"),
                "source": meta.get("source"),
                "warnings": meta.get("warnings", []),  # none recorded before uploads kept them
                "problem": problems.get(version),
            })
        error = None
        if record.active is None:
            listing = await self.state.registry.listing(task)
            error = listing.error if listing is not None else "not in the registry: activate a version to register it"
        return record, rows, error

    async def problems(self, task: str, record: TaskRecord, versions: list[str]) -> dict[str, str]:
        """Why each of `versions` cannot serve, as far as this replica can tell without reading a
        file (listings run this on every call, so nothing is hashed): a file missing from the store
        or files whose size is not the one uploaded (`stored_problem`: a stat per file, or one
        listing), else the last load of it here, failed (a corrupt file of the right size shows
        once a request or an activation has tried it). Versions with no problem known are left out."""
        store = self.state.store
        try:
            sizes: dict[str, dict[str, int]] | None = await asyncio.to_thread(store.file_sizes, task, versions)
        except AdaptserveError:  # the store cannot say now: the listing's own reads answer for that
            sizes = None
        problems = {}
        for version in versions:
            stored = sizes.get(version) if sizes is not None else None
            problem = None if stored is None else stored_problem(stored, record.versions.get(version, {}).get("bytes"),
                                                                 store.describe())
            problem = problem or self.remembered_problem(TaskKey(task, version))
            if problem:
                problems[version] = problem
        return problems

    def remembered_problem(self, key: TaskKey) -> str | None:
        """The problem this replica knows of `key` without any I/O: its last load here, failed. What
        the all-task listing shows, which must not cost a store or registry read per task (on S3
        that is one LIST each); the versions listing of one task also checks its files."""
        runtime = self.state.runtime
        failed = runtime.cache.last_failure(key) if runtime is not None else None
        return f"its last load failed: {failed}" if failed else None

    async def _record(self, task: str, known_in_store: bool = True) -> TaskRecord:
        try:
            return await self.state.registry.record(task)
        except TaskNotFound:
            if known_in_store:  # stored but never registered (e.g. copied into a shared store)
                return TaskRecord(task)
            raise

    def _versions(self, task: str) -> list[str]:
        try:
            return self.state.store.versions(task)
        except TaskNotFound:
            return []

    # -- the change feed -------------------------------------------------------------------------
    def on_change(self, task: str, old: str | None, new: str | None) -> None:
        """A task's active version changed (own write or another replica's): keep tiers tidy."""
        runtime = self.state.runtime
        log.info("task %s: active version %s -> %s", task, old, new)
        if new is None:  # the task was deleted (an active version cannot be): its cache and metric series go
            self.state.metrics.forget_task(task)
            if runtime is not None:
                runtime.cache.drop_task(task)
            self.state.store.drop_local_task(task)  # on the loop: see on_versions_deleted
            return
        if runtime is None:
            return
        if old is not None:
            runtime.cache.demote(TaskKey(task, old))  # off the device; a rollback re-promotes it
        if self.state.settings.prefetch_on_activate and runtime.cache.location(TaskKey(task, new)) != "device":
            job = asyncio.ensure_future(self._prefetch(TaskKey(task, new)))
            self._background.add(job)
            job.add_done_callback(self._background.discard)

    def holdings(self) -> dict[str, set[str]]:
        """What this replica holds that a change made elsewhere must reach: task -> the versions with
        a copy in a cache tier; a task with metric series but no copy maps to an empty set."""
        held: dict[str, set[str]] = {task: set() for task in self.state.metrics.tasks()}
        if self.state.runtime is not None:
            for key in self.state.runtime.cache.held():
                held.setdefault(key.name, set()).add(key.version)
        return held

    def on_versions_deleted(self, task: str, versions: tuple[str, ...]) -> None:
        """Versions of a task were deleted (own write or another replica's): every tier forgets its
        copies, which nothing resolves to any more, and so does the store's local copy (an S3
        store's disk cache). A batch holding one finishes with it.

        The local copy leaves its place here on the event loop, not in a thread, before the next feed
        entry is applied, so a removal never races the fetch of the same version uploaded again
        right after (same content, same id): the store renames it aside at once and removes its
        files in a thread of its own (`S3Store._set_aside`), which may take long for large bundles."""
        runtime = self.state.runtime
        for key in (TaskKey(task, version) for version in versions):
            self.state.store.drop_local_copy(key)
            if runtime is None:
                continue
            if runtime.cache.peek(key) is not None:  # a first sync hears every tombstone: log only a copy let go
                log.info("task %s: version %s was deleted; its cached copy is dropped", task, key.version)
            runtime.cache.drop(key)

    async def _prefetch(self, key: TaskKey) -> None:
        runtime = self.state.runtime
        if runtime is None:
            return
        try:
            await runtime.cache.get(key)
        except Exception as err:  # noqa: BLE001 - its requests will report it; this is a heads-up
            log.warning("prefetching task %s failed: %s", key, getattr(err, "message", err))

    async def close(self) -> None:
        for job in list(self._background):
            job.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
