"""Task stores: where bundles live, `<root>/<task>/<version>/{adapter_config.json, adapter_model.safetensors}`.

`BundleStore` holds what every backend shares (which version is active, listings) over a few
primitives each backend implements; `LocalStore` is a directory, `service.store_s3.S3Store` a
bucket with the same layout. A version is immutable once published: it is written to a temporary
place, made durable, then appears under its name in one step. Publishing a version that is already
stored intact changes nothing; publishing it over a damaged copy (a file missing, or files that no
longer hash to the version id) replaces that copy, again in one step.

The active version of a task is the id written in its `ACTIVE` pointer, or, without one, the only
version present. Names from requests are checked against a safe pattern before any path or key
is built from them, and versions read back are checked the same way.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from service.engine.types import TaskKey
from service.errors import ConfigurationError, InvalidTaskName, StoreUnavailable, TaskNotFound, TaskUnavailable, VersionNotFound

log = logging.getLogger(__name__)

TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Versions are content hashes or human ids such as `v3`; same alphabet, upper case allowed.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The ids `service.engine.bundle.content_version` makes: a version so named is checked against
# its files every time it is loaded (bit rot, a partial copy, a hand edit), others are not.
CONTENT_HASH_RE = re.compile(r"^[0-9a-f]{16}$")

ACTIVE_FILE = "ACTIVE"
HISTORY_FILE = "HISTORY.json"  # the local registry's activation history (service.registry.local)
POINTERS = (ACTIVE_FILE, HISTORY_FILE)  # the only small files a store keeps beside versions
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def validate_task_name(name: str) -> str:
    """Return `name` if it is a safe task name, else raise `InvalidTaskName`."""
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name):
        shown = name[:80] + "..." if isinstance(name, str) and len(name) > 80 else name
        raise InvalidTaskName(
            f"invalid task name {shown!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def is_version_id(version: object) -> bool:
    """Whether `version` has the form of a version id (`VERSION_RE`): the one test of it, for ids
    from requests and from the store alike."""
    return isinstance(version, str) and VERSION_RE.fullmatch(version) is not None


def validate_version(task: str, version: str) -> str:
    """Return `version` if it is a safe version id, else raise `VersionNotFound` (such a version
    cannot exist, and the id never reaches a path). Every route taking a version id checks it
    here first, so any id not of the form gets this message, and any other id missing from the
    store gets "has no version" (content hashes and hand-made ids such as `v3` or `ZZZ` alike)."""
    if not is_version_id(version):
        shown = version[:80] + "..." if isinstance(version, str) and len(version) > 80 else version
        raise VersionNotFound(f"task {task!r} has no version {shown!r} (not a valid version id: use 1-128 "
                              "characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit)")
    return version


@dataclass(frozen=True)
class TaskListing:
    """One row of `list_tasks()`: a task and its active version, or why it has none."""

    name: str
    version: str | None
    error: str | None = None


class BundleStore:
    """What every store backend offers. Subclasses implement the primitives below; the
    methods after them are shared. All of it is blocking IO: call it from a thread."""

    # Whether reading a pointer is cheap enough to do on the event loop for every request.
    cheap_pointers: bool = False

    # -- primitives ------------------------------------------------------------------------------
    def task_names(self) -> list[str]:
        """Every task present (valid names only), sorted."""
        raise NotImplementedError

    def has_task(self, name: str) -> bool:
        """Whether `name` is a valid name with something stored under it (never raises)."""
        raise NotImplementedError

    def versions(self, task: str) -> list[str]:
        """The version ids published for `task`, sorted; TaskNotFound if it has nothing. A published
        version with a file missing or damaged is listed (it exists, and activating it is refused
        naming what is wrong); a version still being written or deleted is not."""
        raise NotImplementedError

    def has_version(self, task: str, version: str) -> bool:
        """Whether `version` of `task` is stored (whole or damaged, as `versions` lists it)."""
        return is_version_id(version) and version in self.versions(task)

    def missing_files(self, key: TaskKey) -> list[str]:
        """The files of a stored version that are not in the store itself (never a local copy of
        it): empty for a whole version, else what an activation must name when it refuses it."""
        present = self.file_sizes(key.name, [validate_version(key.name, key.version)]).get(key.version, {})
        return [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in present]

    def file_sizes(self, task: str, versions: list[str]) -> dict[str, dict[str, int]]:
        """{version: {file name: bytes}} for those of `versions` still stored, each naming the bundle
        files the store holds (a stat per file, or one listing of the task: nothing is read). What a
        listing shows a version's damage by, without hashing every file (`stored_problem`)."""
        raise NotImplementedError

    def read_pointer(self, task: str, pointer: str) -> str | None:
        """A small text file beside the versions (`ACTIVE`, `HISTORY.json`); None if absent."""
        raise NotImplementedError

    def write_pointer(self, task: str, pointer: str, text: str) -> None:
        """Replace a pointer atomically and durably."""
        raise NotImplementedError

    def fetch(self, key: TaskKey) -> Path:
        """A local directory holding the bundle of `key` (TaskUnavailable if it is not stored)."""
        raise NotImplementedError

    def put_version(self, task: str, version: str, config_bytes: bytes, weights_bytes: bytes) -> bool:
        """Publish a version durably: when this returns, both files are stored under `version`.
        Returns False when that version was already there intact (same content, same id); True
        when it was written: new, or replacing a damaged copy (see `bundle_intact`)."""
        raise NotImplementedError

    def delete_version(self, key: TaskKey) -> None:
        raise NotImplementedError

    def delete_task(self, task: str) -> None:
        """Remove a task and every version of it."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def drop_local_copy(self, key: TaskKey) -> None:
        """Remove this replica's local copy of a version that another replica deleted from the shared
        store (an S3 store's disk cache). A store whose files are the only copy (a local directory,
        shared by the replicas) has nothing of its own to drop. Never raises. Called on the event
        loop (the change feed's listeners): the copy leaves its place at once, and what may take
        long (removing large files) is left to a thread."""

    def drop_local_task(self, task: str) -> None:
        """As `drop_local_copy`, for every version of a task that another replica deleted."""

    # -- shared ----------------------------------------------------------------------------------
    def list_tasks(self) -> list[TaskListing]:
        """Every task, sorted, each with its active version or the reason it has none. Never
        raises for one broken task. A directory with no version yet is not listed."""
        return [listing for name in self.task_names() if (listing := self.listing(name)) is not None]

    def listing(self, task: str) -> TaskListing | None:
        """`task` as `list_tasks` lists it: its active version or the reason it has none; None
        where it is not listed (gone, or no version yet)."""
        try:
            return TaskListing(task, self.active_version(task))
        except TaskNotFound:
            return None
        except TaskUnavailable as err:
            return TaskListing(task, None, err.message)

    def active_version(self, task: str, versions: list[str] | None = None) -> str:
        """The version `task` serves: the id in its ACTIVE pointer, else its only version.
        `versions`: the task's `versions()` where the caller has just listed them (not listed again)."""
        validate_task_name(task)
        pointer = self.read_pointer(task, ACTIVE_FILE)
        if pointer is not None:
            version = pointer.strip()
            if not is_version_id(version):
                raise TaskUnavailable(f"task {task!r}: ACTIVE names an invalid version id {version!r}")
            if not (version in versions if versions is not None else self.has_version(task, version)):
                raise TaskUnavailable(f"task {task!r}: ACTIVE names version {version!r}, which is not in the store")
            return version
        versions = self.versions(task) if versions is None else versions
        if not versions:  # a first upload still writing its files, or one that stopped: not a task yet
            raise TaskNotFound(f"task {task!r} not found: it has no version in the store yet")
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
        """The local directory holding the bundle of `key` (fetched first where it is remote),
        its content checked against its version id: what the task cache loads from."""
        path = self.fetch(key)
        verify_bundle(path, key, self.describe())
        return path

    def pin_implicit_active(self, task: str) -> None:
        """Before a second version is added to a task that serves its only version without an
        ACTIVE pointer, write that pointer: otherwise the task would have two versions and no
        ACTIVE, which serves nothing, between the new version landing and the registry update."""
        if not self.has_task(task) or self.read_pointer(task, ACTIVE_FILE) is not None:
            return
        versions = self.versions(task)
        if len(versions) == 1:
            self.write_pointer(task, ACTIVE_FILE, versions[0] + "\n")


class LocalStore(BundleStore):
    """Bundles in a directory. Stateless: every call looks at the disk, so another process
    (`adaptserve train --store`) writing a new `ACTIVE` file switches versions without a restart."""

    cheap_pointers = True

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ConfigurationError(
                f"task store {str(root)!r} is not a directory; give an existing store with --store "
                "(the server also reads ADAPTSERVE_STORE)"
            )
        self.root = root.resolve()

    def describe(self) -> str:
        return f"local:{self.root}"

    def task_names(self) -> list[str]:
        try:
            entries = list(self.root.iterdir())
        except OSError as err:
            raise self._unavailable(err) from err
        return sorted(e.name for e in entries if e.is_dir() and TASK_NAME_RE.fullmatch(e.name))

    def has_task(self, name: str) -> bool:
        if not TASK_NAME_RE.fullmatch(name):
            return False
        if self._is_dir(self.root / name):
            return True
        self._require_root()  # "no such task" only from a store that is there to ask
        return False

    # What a write that died (a crash, a kill, a full disk) can leave behind: a version's temporary
    # directory, a deleted task or version not yet removed, a damaged copy swapped aside, a pointer's
    # temporary file. Never visible as tasks or versions (their names start with a dot).
    LEFTOVER = re.compile(r"^\.(tmp-|deleted-|replaced-|ACTIVE\.|HISTORY\.json\.).*")

    def sweep_leftovers(self, older_than_s: float = 3600.0) -> int:
        """Remove leftovers of writes that died, at least `older_than_s` old (a replica sharing the
        store may be writing one right now); the number removed. Run when the server starts."""
        cutoff = time.time() - older_than_s
        removed = 0
        try:
            dirs = [self.root, *(self.root / name for name in self.task_names())]
        except StoreUnavailable:
            return 0
        for parent in dirs:
            try:
                entries = [e for e in parent.iterdir() if self.LEFTOVER.match(e.name)]
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.lstat().st_mtime > cutoff:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed += 1
                except OSError as err:
                    log.warning("store: cannot remove the leftover %s (%s)", entry, _reason(err))
        if removed:
            log.info("store: removed %d leftovers of interrupted writes from %s", removed, self.describe())
        return removed

    def _require_root(self) -> None:
        """StoreUnavailable (503) when the store's directory itself is gone or unreadable (an
        unmounted volume, a renamed directory): every task then looks absent, and a 404, a listing
        without tasks or a delete that skips the files would each tell a lie about them."""
        try:
            if not self.root.is_dir():
                raise FileNotFoundError(2, "No such directory")
            os.listdir(self.root)
        except OSError as err:
            raise self._unavailable(err) from err

    def _is_dir(self, path: Path) -> bool:
        """`path.is_dir()`, where an error other than "not there" (EACCES: the store's directory
        lost its permissions, as a volume mounted with another owner does; EIO) is the store's 503:
        `Path.is_dir` raises those, and a bare OSError would be a 500 (and `Registry.known`, which
        must never raise, would raise it)."""
        try:
            return path.is_dir()
        except OSError as err:
            raise self._unavailable(err) from err

    def _unavailable(self, err: OSError) -> StoreUnavailable:
        return StoreUnavailable(f"the task store {self.describe()} cannot be read ({_reason(err)}); "
                                "check that its volume is mounted and readable")

    def versions(self, task: str) -> list[str]:
        task_dir = self._task_dir(task)
        try:
            return sorted(entry.name for entry in task_dir.iterdir() if entry.is_dir() and is_version_id(entry.name))
        except OSError as err:
            raise TaskUnavailable(f"task {task!r}: its directory in the store cannot be listed ({_reason(err)})") from err

    def has_version(self, task: str, version: str) -> bool:
        return is_version_id(version) and (self._task_dir(task) / version).is_dir()

    def file_sizes(self, task: str, versions: list[str]) -> dict[str, dict[str, int]]:
        task_dir = self._task_dir(task)
        sizes: dict[str, dict[str, int]] = {}
        for version in versions:
            path = task_dir / validate_version(task, version)
            if not path.is_dir():  # deleted since it was listed
                continue
            sizes[version] = {}
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                try:
                    info = (path / name).stat()
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    sizes[version][name] = info.st_size
        return sizes

    def read_pointer(self, task: str, pointer: str) -> str | None:
        path = self._task_dir(task) / _pointer(pointer)
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as err:  # EIO, EACCES, a stale NFS handle: this task cannot say what it serves
            raise TaskUnavailable(f"task {task!r}: its {pointer} file in the store cannot be read ({_reason(err)})") from err

    def write_pointer(self, task: str, pointer: str, text: str) -> None:
        task_dir = self._task_dir(task)
        tmp = task_dir / f".{_pointer(pointer)}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, task_dir / pointer)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(task_dir)

    def fetch(self, key: TaskKey) -> Path:
        if not is_version_id(key.version):
            raise TaskUnavailable(f"invalid version id {key.version!r} for task {key.name!r}")
        path = self._task_dir(key.name) / key.version
        if not path.is_dir():
            raise TaskUnavailable(f"task {key.name!r} has no version {key.version!r} in the store")
        return path

    def put_version(self, task: str, version: str, config_bytes: bytes, weights_bytes: bytes) -> bool:
        from service.engine.bundle import write_bundle_files  # temp dir, fsync each file, rename, fsync dir

        validate_task_name(task)
        validate_version(task, version)
        self._require_root()  # never re-create a task's directory under a store that went away
        task_dir = self.root / task
        target = task_dir / version
        key = TaskKey(task, version)
        try:
            if not task_dir.is_dir():
                task_dir.mkdir(exist_ok=True)
                _fsync_dir(self.root)  # the new task directory's own entry must survive a crash too
            if bundle_intact(target, key):
                return False
            if os.path.lexists(target):
                log.warning("task %s: stored version %s is damaged (a file missing, or files that do not hash to its id); "
                            "replacing it with the copy being published", task, version)
            self.pin_implicit_active(task)
            write_bundle_files(target, config_bytes, weights_bytes)  # swaps out a damaged copy in one step
        except OSError as err:
            # Another replica placed the same version (same content, same id) between our check and
            # our rename: its copy is as good as ours.
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and bundle_intact(target, key):
                return False
            raise StoreUnavailable(f"the task store {self.describe()} cannot store task {task!r} version {version}: "
                                   f"{err.strerror or err}") from err  # a full disk is the store's state, not a bug
        return True

    def delete_version(self, key: TaskKey) -> None:
        path = self._task_dir(key.name) / validate_version(key.name, key.version)
        # Rename first: the version disappears in one step, then the files go.
        doomed = path.parent / f".deleted-{key.version}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:  # another replica's delete of it (or of the task) got there first
            raise VersionNotFound(f"task {key.name!r} has no version {key.version!r} (it was deleted meanwhile)") from None
        _fsync_dir(path.parent)
        shutil.rmtree(doomed, ignore_errors=True)

    def delete_task(self, task: str) -> None:
        path = self._task_dir(task)
        doomed = self.root / f".deleted-{task}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:  # another replica's delete of it got there first
            raise TaskNotFound(f"task {task!r} not found (it was deleted meanwhile)") from None
        _fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def _task_dir(self, task: str) -> Path:
        path = self.root / validate_task_name(task)
        if not self._is_dir(path):
            self._require_root()
            raise TaskNotFound(f"task {task!r} not found")
        return path


def verify_bundle(path: Path, key: TaskKey, where: str) -> None:
    """TaskUnavailable unless the bundle in `path` hashes to `key.version` (content-hash ids only).

    A version is immutable and named by its content, so any difference is corruption (a flipped
    bit, a truncated copy, a hand edit) and serving it would give answers nobody validated."""
    if not CONTENT_HASH_RE.fullmatch(key.version):
        return
    from service.engine.bundle import content_version  # hashlib only; kept beside the writer

    blobs = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            blobs.append((path / name).read_bytes())
        except OSError as err:
            raise TaskUnavailable(f"task {key} in {where}: its {name} cannot be read ({_reason(err)}); "
                                  "upload the bundle again (the same files repair it) or activate another version") from err
    config, weights = blobs
    got = content_version(config, weights)
    if got != key.version:
        raise TaskUnavailable(
            f"task {key} in {where} is corrupt: its files hash to {got}, not to their version id; "
            "re-upload the bundle or activate another version"
        )


def stored_problem(sizes: dict[str, int], uploaded_bytes: object, where: str) -> str | None:
    """Why a stored version cannot serve, judged by its files' sizes alone (`file_sizes`): a file
    missing, or files whose total is not the `uploaded_bytes` recorded when it was published (None:
    not uploaded through the API, so only missing files tell). A changed file of the same size is
    found only by a load, which hashes the files."""
    repair = "upload the bundle again (the same files repair it) or delete the version"
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in sizes]
    if missing:
        return f"{' and '.join(missing)} missing from {where}; {repair}"
    total = sum(sizes.values())
    if isinstance(uploaded_bytes, int) and not isinstance(uploaded_bytes, bool) and total != uploaded_bytes:
        return (f"its files in {where} hold {total} bytes, not the {uploaded_bytes} uploaded: they changed "
                f"after it was published; {repair}")
    return None


def bundle_intact(path: Path, key: TaskKey) -> bool:
    """Whether `path` holds both files of `key`, hashing to its version id (content-hash ids).

    Publishing a version again is a no-op only then; otherwise the stored copy is damaged (bit
    rot, a truncated or partial copy, a hand edit) and publishing the same content repairs it."""
    if not all((path / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE)):
        return False
    try:
        verify_bundle(path, key, str(path))
    except TaskUnavailable:
        return False
    return True


def _reason(err: OSError) -> str:
    return f"{type(err).__name__}: {err.strerror or err}"


def _pointer(name: str) -> str:
    if name not in POINTERS:  # pointer names are constants of this module, never request strings
        raise ValueError(f"unknown pointer {name!r}")
    return name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(settings, flags: Mapping[str, str] | None = None) -> BundleStore:  # settings: service.settings.Settings
    """The store the settings name: a local directory, or an S3-compatible bucket. `flags`: the
    settings a command line set (field -> flag), which its set-up errors name by their flag."""
    if settings.store_backend == "s3":
        from service.store_s3 import S3Store

        return S3Store.from_settings(settings, flags)
    store = LocalStore(settings.store)
    store.sweep_leftovers()
    return store
