"""The local task store: `<root>/<task>/<version>/{adapter_config.json, adapter_model.safetensors}`.

The active version of a task is the id written in `<root>/<task>/ACTIVE`, or, without that file,
the only version present. Names from requests are checked against a safe pattern before any path
is built from them, and versions read from disk are checked the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from service.engine.types import TaskKey
from service.errors import ConfigurationError, InvalidTaskName, TaskNotFound, TaskUnavailable

TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Versions are content hashes or human ids such as `v3`; same alphabet, upper case allowed.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

ACTIVE_FILE = "ACTIVE"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def validate_task_name(name: str) -> str:
    """Return `name` if it is a safe task name, else raise `InvalidTaskName`."""
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name):
        raise InvalidTaskName(
            f"invalid task name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class TaskListing:
    """One row of `LocalStore.list_tasks()`: a task and its active version, or why it has none."""

    name: str
    version: str | None
    error: str | None = None


class LocalStore:
    """Reads task bundles from a directory. Stateless: every call looks at the disk, so writing
    a new `ACTIVE` file switches versions without a restart."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ConfigurationError(
                f"task store {str(root)!r} is not a directory; set ADAPTSERVE_STORE or --store"
            )
        self.root = root.resolve()

    def list_tasks(self) -> list[TaskListing]:
        """Every task directory with a valid name, sorted, each with its active version or the
        reason it has none. Never raises for one broken task."""
        listings = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or not TASK_NAME_RE.fullmatch(entry.name):
                continue
            try:
                listings.append(TaskListing(entry.name, self.active_version(entry.name)))
            except TaskUnavailable as err:
                listings.append(TaskListing(entry.name, None, err.message))
        return listings

    def has_task(self, name: str) -> bool:
        """Whether `name` is a valid name with a directory in the store (no error either way)."""
        return bool(TASK_NAME_RE.fullmatch(name)) and (self.root / name).is_dir()

    def versions(self, task: str) -> list[str]:
        """The version ids present for `task`, sorted."""
        return sorted(
            entry.name
            for entry in self._task_dir(task).iterdir()
            if entry.is_dir() and VERSION_RE.fullmatch(entry.name)
        )

    def active_version(self, task: str) -> str:
        """The version `task` serves: the id in its ACTIVE file, else its only version."""
        task_dir = self._task_dir(task)
        active_file = task_dir / ACTIVE_FILE
        if active_file.is_file():
            version = active_file.read_text(encoding="utf-8", errors="replace").strip()
            if not VERSION_RE.fullmatch(version):
                raise TaskUnavailable(f"task {task!r}: ACTIVE names an invalid version id {version!r}")
            if not (task_dir / version).is_dir():
                raise TaskUnavailable(f"task {task!r}: ACTIVE names version {version!r}, which is not in the store")
            return version
        versions = self.versions(task)
        if not versions:
            raise TaskUnavailable(f"task {task!r} has no versions in the store")
        if len(versions) > 1:
            raise TaskUnavailable(
                f"task {task!r} has {len(versions)} versions ({', '.join(versions)}) and no ACTIVE "
                "file to choose one; write the version id to "
                f"{ACTIVE_FILE} in the task's directory"
            )
        return versions[0]

    def resolve(self, task: str) -> TaskKey:
        """The key of the version `task` serves now."""
        return TaskKey(task, self.active_version(task))

    def bundle_dir(self, key: TaskKey) -> Path:
        """The directory holding the bundle of `key`."""
        if not VERSION_RE.fullmatch(key.version):
            raise TaskUnavailable(f"invalid version id {key.version!r} for task {key.name!r}")
        path = self._task_dir(key.name) / key.version
        if not path.is_dir():
            raise TaskUnavailable(f"task {key.name!r} has no version {key.version!r} in the store")
        return path

    def _task_dir(self, task: str) -> Path:
        path = self.root / validate_task_name(task)
        if not path.is_dir():
            raise TaskNotFound(f"task {task!r} not found")
        return path
