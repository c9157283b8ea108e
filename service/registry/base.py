"""The registry: which version of each task is active, the activation history, per-version
metadata, and a change feed that tells this replica when any of that changes.

Two backends share this interface and the pure record logic below:
* `LocalRegistry` (default): the store's `ACTIVE` and `HISTORY.json` files; one replica.
* `RedisRegistry` (`ADAPTSERVE_REDIS_URL`): records in Redis, a Redis Stream as the change feed,
  an in-memory map per replica so a request never waits on Redis.

A request resolves its task's active version exactly once (`resolve`), and the batch then holds
that version's Task object, so a swap never changes the weights under a request in flight.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Iterable

from service.engine.types import TaskKey
from service.errors import Conflict, TaskNotFound, TaskUnavailable, VersionNotFound
from service.store import TaskListing, validate_task_name

# Called on the event loop after a task's active version changed: (task, old, new); new None = deleted.
ChangeListener = Callable[[str, "str | None", "str | None"], None]
# Called on the event loop after versions of a task were deleted (never its active one): (task, versions).
DeletionListener = Callable[[str, "tuple[str, ...]"], None]
# What a subscriber holds of each task, read now and then: task -> the versions it has copies of (a
# task it holds only something without a version of, e.g. metric series, maps to an empty set).
Holdings = Callable[[], "dict[str, set[str]]"]


@dataclass(frozen=True)
class TaskRecord:
    """Everything the registry knows about one task. Immutable: mutations return a new record."""

    name: str
    active: str | None = None
    # Versions that were active, oldest first, the active one last: rollback pops the top.
    stack: tuple[str, ...] = ()
    # Audit log, oldest first: {"at": unix time, "action": activate|rollback|upload|delete_version, "version", "from"}.
    history: tuple[dict[str, Any], ...] = ()
    # version -> metadata recorded at upload (uploaded_at, bytes, source, kind, warnings).
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Versions deleted since their last upload, most recent last: an activation that raced the
    # delete on another replica reads them in its own transaction and is refused, instead of
    # pointing the task at files about to go.
    deleted: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {"name": self.name, "active": self.active, "stack": list(self.stack), "history": list(self.history),
             "versions": self.versions, "deleted": list(self.deleted)},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "TaskRecord":
        data = json.loads(text)
        return cls(
            name=str(data["name"]),
            active=data.get("active"),
            stack=tuple(str(v) for v in data.get("stack") or ()),
            history=tuple(dict(h) for h in data.get("history") or ()),
            versions={str(k): dict(v) for k, v in (data.get("versions") or {}).items()},
            deleted=tuple(str(v) for v in data.get("deleted") or ()),
        )

    def describe(self) -> dict[str, Any]:
        return {"active": self.active, "rollback_to": self.rollback_target(), "history": list(self.history)}

    def rollback_target(self, exists: Callable[[str], bool] = lambda v: True) -> str | None:
        """The version a rollback would activate: the nearest earlier entry of the stack that
        differs from the active one and still exists."""
        for version in reversed(self.stack[:-1]):
            if version != self.active and exists(version):
                return version
        return None


def _log(record: TaskRecord, action: str, version: str | None, history_max: int, **extra: Any) -> tuple[dict[str, Any], ...]:
    entry = {"at": round(time.time(), 3), "action": action, "version": version, "from": record.active, **extra}
    return (*record.history, entry)[-history_max:]


def with_upload(record: TaskRecord, version: str, meta: dict[str, Any], history_max: int, *,
                created: bool = True) -> TaskRecord:
    """Record an uploaded version's metadata (does not activate it). `created`: the upload wrote the
    version's files (new, or repairing a damaged copy). An upload of a version already stored
    intact and already recorded changed nothing, and records nothing: its first upload stays."""
    if not created and version in record.versions:
        return record
    versions = {**record.versions, version: dict(meta)}
    return replace(record, versions=versions, deleted=tuple(v for v in record.deleted if v != version),
                   history=_log(record, "upload", version, history_max))


def activated(record: TaskRecord, version: str, history_max: int, action: str = "activate") -> TaskRecord:
    """Make `version` active, pushing it on the rollback stack. Activating the active version is a
    no-op: no history entry, no stack change. A version deleted since its last upload is refused."""
    if record.active == version:
        return record
    if version in record.deleted:
        raise VersionNotFound(f"task {record.name!r} has no version {version!r} (it was deleted; upload it again to use it)")
    stack = record.stack
    if record.active is not None and (not stack or stack[-1] != record.active):
        stack = (*stack, record.active)  # an activation the registry did not see (e.g. a bare ACTIVE write)
    if not stack or stack[-1] != version:
        stack = (*stack, version)
    return replace(record, active=version, stack=stack[-history_max:], history=_log(record, action, version, history_max))


def rolled_back(record: TaskRecord, exists: Callable[[str], bool], history_max: int) -> TaskRecord:
    """Re-activate the previously active version, popping the current one off the stack."""
    target = record.rollback_target(exists)
    if target is None:
        raise Conflict(f"task {record.name!r} has no earlier version to roll back to")
    stack = list(record.stack)
    while stack and stack[-1] != target:
        stack.pop()
    return replace(record, active=target, stack=tuple(stack), history=_log(record, "rollback", target, history_max))


def without_version(record: TaskRecord, version: str, history_max: int) -> TaskRecord:
    """Forget a version; refused for the active one (delete the task, or activate another first)."""
    if version == record.active:
        raise Conflict(
            f"version {version!r} is the active version of task {record.name!r}; activate another "
            "version first, or delete the whole task"
        )
    versions = {k: v for k, v in record.versions.items() if k != version}
    stack = tuple(v for v in record.stack if v != version)
    deleted = (*(v for v in record.deleted if v != version), version)[-history_max:]
    return replace(record, versions=versions, stack=stack, deleted=deleted,
                   history=_log(record, "delete_version", version, history_max))


class Registry:
    """The interface the service uses; see the module docstring for the backends."""

    backend: str = "?"

    def __init__(self) -> None:
        self._listeners: list[ChangeListener] = []
        self._deletion_listeners: list[DeletionListener] = []
        self._holdings: list[Holdings] = []

    def subscribe(self, listener: ChangeListener, on_deleted: DeletionListener | None = None,
                  holdings: Holdings | None = None) -> None:
        """`listener` hears every change of a task's active version, `on_deleted` every deletion of
        versions that were not active (a deleted task is `listener`'s new None), whichever replica
        made it. `holdings`: what the subscriber holds, for a backend with no feed of the other
        replicas' changes, which compares it with the store now and then (`LocalRegistry`)."""
        self._listeners.append(listener)
        if on_deleted is not None:
            self._deletion_listeners.append(on_deleted)
        if holdings is not None:
            self._holdings.append(holdings)

    def _held(self) -> dict[str, set[str]]:
        """Every subscriber's holdings together."""
        held: dict[str, set[str]] = {}
        for holdings in self._holdings:
            for task, versions in holdings().items():
                held.setdefault(task, set()).update(versions)
        return held

    def _notify(self, task: str, old: str | None, new: str | None) -> None:
        if old == new:
            return
        for listener in self._listeners:
            listener(task, old, new)

    def _notify_task_deleted(self, task: str, active: str | None) -> None:
        """The whole task was deleted: the listeners hear its active version go to None, even where
        it had none (it answered 503, and its metric series must go all the same)."""
        for listener in self._listeners:
            listener(task, active, None)

    def _notify_deleted(self, task: str, versions: tuple[str, ...]) -> None:
        if not versions:
            return
        for listener in self._deletion_listeners:
            listener(task, versions)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin following the registry (connect, sync, subscribe); never blocks on a dead backend."""

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend, "connected": True}

    # -- reads (every request) -------------------------------------------------------------------
    may_block = False  # whether `resolve` may wait on I/O (callers then bound it by their deadline)

    async def resolve(self, task: str) -> TaskKey:
        """The version `task` serves now: TaskNotFound / TaskUnavailable when there is none."""
        raise NotImplementedError

    def known(self, task: str) -> bool:
        """Whether `task` names a task this replica knows; cheap and never raises (metrics labels)."""
        raise NotImplementedError

    async def list_tasks(self) -> list[TaskListing]:
        raise NotImplementedError

    async def listing(self, task: str) -> TaskListing | None:
        """`task` as `list_tasks` lists it (why it has no active version, in the same words); None
        where that lists no such task."""
        raise NotImplementedError

    async def record(self, task: str) -> TaskRecord:
        """The task's full record (TaskNotFound if the registry has none)."""
        raise NotImplementedError

    # -- writes (admin) --------------------------------------------------------------------------
    def require_writable(self) -> None:
        """Raise RegistryUnavailable (503) now if a write cannot succeed, before any work is done."""

    async def add_version(self, task: str, version: str, meta: dict[str, Any], *, activate: bool,
                          created: bool = True) -> TaskRecord:
        """Record an uploaded (already durable) version, and make it active if asked. `created`: the
        store wrote its files (see `with_upload`); a re-sent version already active changes nothing."""
        raise NotImplementedError

    async def activate(self, task: str, version: str) -> TaskRecord:
        raise NotImplementedError

    async def rollback(self, task: str, exists: Callable[[str], bool]) -> TaskRecord:
        raise NotImplementedError

    async def forget_version(self, task: str, version: str, remove_files: Callable[[], Awaitable[None]]) -> TaskRecord:
        """Refuse if `version` is active; else drop it from the record and run `remove_files`."""
        raise NotImplementedError

    async def delete_task(self, task: str, remove_files: Callable[[], Awaitable[None]]) -> None:
        """Stop serving `task` everywhere, then run `remove_files`."""
        raise NotImplementedError


def require_active(record: TaskRecord | None, task: str) -> TaskKey:
    """The key a request resolves to, from a record (or the 404/503 explaining why none)."""
    if record is None:
        raise TaskNotFound(f"task {task!r} not found")
    if record.active is None:
        raise TaskUnavailable(f"task {task!r} has no active version")
    return TaskKey(task, record.active)


def require_version(versions: Iterable[str], task: str, version: str) -> None:
    if version not in set(versions):
        raise VersionNotFound(f"task {task!r} has no version {version!r}")


__all__ = [
    "ChangeListener", "DeletionListener", "Holdings", "Registry", "TaskRecord", "activated", "rolled_back", "with_upload", "without_version",
    "require_active", "require_version", "validate_task_name",
]
