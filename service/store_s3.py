"""A task store in an S3-compatible bucket, same layout as a local store under `s3_prefix`:

    <prefix><task>/ACTIVE, <prefix><task>/HISTORY.json
    <prefix><task>/<version>/adapter_config.json, <prefix><task>/<version>/adapter_model.safetensors

boto3 (`pip install adaptserve[s3]`): the reference S3 client, whose credential chain (env vars,
config files, instance and pod roles) is what operators expect; speaking SigV4 by hand would be
a liability. Works with AWS S3 and S3-compatible servers (`s3_endpoint_url`: MinIO, Ceph, moto).

Publishing a version PUTs the weights first and the config last, and deleting one removes the
weights first: the config object marks a version as published, so a version is listed once its
config exists, and until its config is gone (a delete that died half way leaves a version listed as
damaged, which a retried delete removes); each PUT is atomic and durable when it returns (S3 is
strongly consistent for new objects), so the registry never points at a version still being written.
A version whose weights object went missing is still listed (it exists, damaged: activating it is
refused with 422 naming the missing object), and so is one whose config alone went missing, once its
weights are older than `partial_grace_s` (younger, they may be a publish between its two PUTs).
Publishing a version whose objects are there but damaged (missing, or not hashing to the version id)
PUTs both again, each replacing its object in one step: that is how a re-upload repairs it. Bundles
are fetched into a local cache directory (download to a temp dir, verify the content hash, rename):
a version is immutable and named by its hash, so a cached copy never goes stale. The cache is
bounded (`s3_cache_max_bytes`): after a fetch, the copies used least recently go first, but never
one used within `CACHE_GRACE_S` (a path just handed out is being read), so the bound is soft. A
version or task deleted leaves the cache at once: on the replica that deleted it, and on every other
replica when it hears the delete (`drop_local_copy`, `drop_local_task`); a fetch of it in flight then
places nothing and fails, saying it was deleted (what it read may be the deleted version's). A drop
takes the copy out of the cache in one rename, at once and in the order the deletes are heard, and
removes its files in a background thread (a task's cached copies can be hundreds of MB, and a drop
heard from the feed runs on the event loop). A
fetch's temp dir left by a process killed mid-fetch (this one before a restart, or another sharing
the cache directory) is removed once it is older than any fetch can take (`STALE_FETCH_S`): when a
store starts on that cache directory, and after a fetch at most every `FETCH_SWEEP_EVERY_S`; never
one of this process's fetches in flight, however old.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from service.engine.types import TaskKey
from service.errors import ConfigurationError, StoreUnavailable, TaskNotFound, TaskUnavailable
from service.settings import setting_name
from service.store import (
    ACTIVE_FILE, CONFIG_FILE, CONTENT_HASH_RE, POINTERS, TASK_NAME_RE, WEIGHTS_FILE, BundleStore, is_version_id,
    validate_task_name, validate_version, verify_bundle,
)

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
CACHE_GRACE_S = 60.0  # a cached copy used this recently is never dropped: its reader may still be at it
# Weights without a config object are a publish between its two PUTs (the config follows at once: one
# small PUT, under 30 s even with the client's retries and timeouts in `from_settings`); older than
# this, they are a version whose config went missing (a hand delete, a write that died), listed so
# that it can be named, repaired by an upload, or deleted.
# Ten times that bound: LastModified is the bucket's clock, compared with this replica's.
PARTIAL_GRACE_S = 300.0
# A fetch's temp directory older than this is a leftover of a process killed mid-fetch: a fetch is two
# GETs, each bounded within a minute by the client's retries and timeouts in `from_settings` (a read
# that trickles could take longer), so an hour never catches one in flight, even one of another
# process sharing the cache directory. Removed when a store starts, and then by its fetches (below).
STALE_FETCH_S = 3600.0
# How often, at most, a fetch also sweeps such leftovers: a long-running replica must not keep what a
# process sharing its cache left until its own restart. One listing of the cache directory's top level
# (its task directories and temp dirs) and a stat per temp dir, once in ten minutes of fetches.
FETCH_SWEEP_EVERY_S = 600.0


def _s3_errors(method: F) -> F:
    """An S3 failure (network, 5xx, access denied) becomes a 503 naming the store, not a 500."""

    @functools.wraps(method)
    def wrapped(self: "S3Store", *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(self, *args, **kwargs)
        except (ClientError, BotoCoreError) as err:
            # The client hears what failed, not the endpoint's URL, the bucket's keys or a request id;
            # the log keeps the whole error.
            log.warning("task store %s: %s failed: %s", self.describe(), method.__name__, err)
            what = err.response.get("Error", {}).get("Code", "error") if isinstance(err, ClientError) else type(err).__name__
            raise StoreUnavailable(f"task store {self.describe()} failed ({what}); see the server log") from err

    return wrapped  # type: ignore[return-value]


class S3Store(BundleStore):
    cheap_pointers = False

    def __init__(self, client: Any, bucket: str, prefix: str, cache_dir: Path, *, pointer_ttl_s: float = 1.0,
                 cache_max_bytes: int = 0, cache_grace_s: float = CACHE_GRACE_S,
                 partial_grace_s: float = PARTIAL_GRACE_S) -> None:
        self.client = client
        self.partial_grace_s = partial_grace_s
        self.cache_max_bytes = cache_max_bytes
        self.cache_grace_s = cache_grace_s
        self.bucket = bucket
        self.prefix = prefix
        self.pointer_ttl_s = pointer_ttl_s
        # One cache directory per bucket and prefix, so two stores never share copies.
        self.cache_dir = Path(cache_dir) / hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:16]
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # e.g. a read-only root filesystem in a pod
            raise ConfigurationError(
                f"ADAPTSERVE_S3_CACHE_DIR: cannot create {str(self.cache_dir)!r} ({err.strerror or err}); "
                "point it at a writable directory such as a mounted emptyDir"
            ) from None
        self._pointer_cache: dict[tuple[str, str], tuple[str | None, float]] = {}
        self._lock = threading.Lock()  # the pointer cache, the fetches in flight and the sweep's clock
        self._fetching: set[str] = set()  # names of this process's fetches' temp dirs in flight: never swept
        self.fetch_sweep_every_s = FETCH_SWEEP_EVERY_S
        self._swept_at = time.monotonic()
        self._sweep_stale_fetches()
        self._trim_lock = threading.Lock()
        # Drops of a version (TaskKey) or of a whole task (its name) since the store was made, and the
        # lock a fetch places its copy under, so no copy lands after a drop that should have taken it.
        # One entry per version or task deleted while this replica ran: a few bytes each.
        self._drops: Counter[TaskKey | str] = Counter()
        self._drop_lock = threading.Lock()
        # Removes the files of dropped copies, one drop after another (its thread starts at the first).
        self._remover = ThreadPoolExecutor(1, thread_name_prefix="adaptserve-s3-cache-drop")

    @classmethod
    def from_settings(cls, settings: Any, flags: Mapping[str, str] | None = None) -> "S3Store":
        """The store `settings` name; its set-up errors name each setting as it was given (`flags`:
        the settings a command line set, field -> flag; the others by their variable)."""
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ConfigurationError(
                f"{setting_name('store_backend', flags)}=s3 needs boto3: pip install 'adaptserve[s3]'"
            ) from None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        try:
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=settings.s3_endpoint_url,
                region_name=region,
                # Standard retries for throttling and 5xx, two attempts in all; short connects and reads so
                # a dead or hung endpoint is an error within seconds (a bundle is a few hundred KB), not
                # the 2 minutes of botocore's defaults, which outlast any request's deadline.
                config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=10),
            )
        except ValueError as err:  # botocore: "Invalid endpoint: ...", a malformed region
            raise ConfigurationError(
                f"{setting_name('s3_endpoint_url', flags)} / AWS_REGION: {err}; an endpoint looks like https://s3.example.com"
            ) from None
        store = cls(client, settings.s3_bucket, settings.s3_prefix, settings.s3_cache_path,
                    pointer_ttl_s=settings.store_pointer_ttl_s, cache_max_bytes=settings.s3_cache_max_bytes)
        store.check_bucket(flags)
        return store

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def check_bucket(self, flags: Mapping[str, str] | None = None) -> None:
        """Fail at start-up, naming the setting to change, when the bucket cannot be used."""
        from botocore.exceptions import (
            BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError, ParamValidationError,
        )

        bucket, endpoint = setting_name("s3_bucket", flags), setting_name("s3_endpoint_url", flags)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ParamValidationError:
            # botocore's message is its regex of bucket names: say which setting holds the bad name.
            raise ConfigurationError(
                f"{bucket}: {self.bucket!r} is not a valid bucket name; S3 bucket names are 3-63 characters "
                "of lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit"
            ) from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                why = f"the bucket {self.bucket!r} does not exist; create it, or set {bucket} to an existing bucket"
            elif code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                why = (f"access to the bucket {self.bucket!r} is denied ({code}); check the credentials "
                       "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the instance/pod role) and that they may "
                       f"read and write that bucket")
            elif code in ("400", "301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
                why = f"the bucket {self.bucket!r} refused the request ({code}); check AWS_REGION / AWS_DEFAULT_REGION"
            else:
                why = str(err)
            raise ConfigurationError(f"task store {self.describe()} cannot be used: {why}") from None
        except NoCredentialsError:
            raise ConfigurationError(
                f"task store {self.describe()} cannot be used: no AWS credentials found; set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or give the instance/pod a role)"
            ) from None
        except EndpointConnectionError as err:
            raise ConfigurationError(
                f"task store {self.describe()} cannot be used: {err}; check {endpoint} and that the server is up"
            ) from None
        except BotoCoreError as err:
            raise ConfigurationError(f"task store {self.describe()} cannot be used: {err}") from None

    # -- keys --------------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def _list(self, prefix: str, delimiter: str | None = None) -> tuple[dict[str, float], list[str]]:
        """({object key: last modified, unix time}, common prefixes) under `prefix`, all pages."""
        keys: dict[str, float] = {}
        prefixes: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
            keys |= {obj["Key"]: obj["LastModified"].timestamp() for obj in page.get("Contents", [])}
            prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        return keys, prefixes

    # -- primitives --------------------------------------------------------------------------------
    @_s3_errors
    def task_names(self) -> list[str]:
        _, prefixes = self._list(self.prefix, "/")
        names = (p[len(self.prefix):].rstrip("/") for p in prefixes)
        return sorted(n for n in names if TASK_NAME_RE.fullmatch(n))

    @_s3_errors
    def has_task(self, name: str) -> bool:
        if not TASK_NAME_RE.fullmatch(name):
            return False
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(name, ""), MaxKeys=1)
        return bool(page.get("KeyCount") or page.get("Contents"))

    @_s3_errors
    def versions(self, task: str) -> list[str]:
        validate_task_name(task)
        keys, _ = self._list(self._key(task, ""))
        if not keys:
            raise TaskNotFound(f"task {task!r} not found")
        files: dict[str, dict[str, float]] = {}  # version -> {file name: last modified}
        for key, modified in keys.items():
            parts = key[len(self._key(task, "")):].split("/")
            if len(parts) == 2 and is_version_id(parts[0]):
                files.setdefault(parts[0], {})[parts[1]] = modified
        settled = time.time() - self.partial_grace_s
        return sorted(v for v, names in files.items()
                      if CONFIG_FILE in names or names.get(WEIGHTS_FILE, settled) < settled)

    @_s3_errors
    def file_sizes(self, task: str, versions: list[str]) -> dict[str, dict[str, int]]:
        validate_task_name(task)
        wanted, root = set(versions), self._key(task, "")
        sizes: dict[str, dict[str, int]] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root):
            for obj in page.get("Contents", []):
                version, _, name = obj["Key"][len(root):].partition("/")
                if version in wanted and name in (CONFIG_FILE, WEIGHTS_FILE):
                    sizes.setdefault(version, {})[name] = int(obj["Size"])
        return sizes

    @_s3_errors
    def read_pointer(self, task: str, pointer: str) -> str | None:
        validate_task_name(task)
        assert pointer in POINTERS
        now = time.monotonic()
        if pointer == ACTIVE_FILE:
            with self._lock:
                hit = self._pointer_cache.get((task, pointer))
            if hit is not None and now - hit[1] < self.pointer_ttl_s:
                return hit[0]
        text = self._get_text(self._key(task, pointer))
        if pointer == ACTIVE_FILE:
            with self._lock:
                self._pointer_cache[(task, pointer)] = (text, now)
        return text

    @_s3_errors
    def write_pointer(self, task: str, pointer: str, text: str) -> None:
        validate_task_name(task)
        assert pointer in POINTERS
        self.client.put_object(Bucket=self.bucket, Key=self._key(task, pointer), Body=text.encode("utf-8"))
        with self._lock:
            self._pointer_cache.pop((task, pointer), None)

    @_s3_errors
    def fetch(self, key: TaskKey) -> Path:
        validate_task_name(key.name)
        if not is_version_id(key.version):
            raise TaskUnavailable(f"invalid version id {key.version!r} for task {key.name!r}")
        target = self.cache_dir / key.name / key.version
        if target.is_dir():
            _touch(target)  # its mtime is its last use: the cache's LRU order, kept across restarts
            return target
        drops = self._drop_count(key)
        # Downloaded beside the task directories, not in one: a task dropped meanwhile takes its
        # directory, never a download in flight (the drop count below says what became of it).
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.cache_dir))
        with self._lock:
            self._fetching.add(tmp.name)
        try:
            blobs = {}
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                data = self._get_bytes(self._key(key.name, key.version, name))
                if data is None:
                    raise self._incomplete(key)
                blobs[name] = data
                (tmp / name).write_bytes(data)
            if CONTENT_HASH_RE.fullmatch(key.version):
                from service.engine.bundle import content_version

                got = content_version(blobs[CONFIG_FILE], blobs[WEIGHTS_FILE])
                if got != key.version:
                    raise TaskUnavailable(f"task {key} in {self.describe()} is corrupt: its content hashes to {got}")
            with self._drop_lock:
                # A delete of it heard since this download began (its objects may already be gone, or
                # go in a moment: a replica hears a delete before the deleting one removes them): the
                # copy must not land in the cache that delete just emptied, where it would sit until
                # the byte budget pushed it out. A fetch after the delete reads the bucket afresh.
                if self._drop_count(key) != drops:
                    raise TaskUnavailable(f"task {key} was deleted while this replica fetched it")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not target.is_dir():  # not a concurrent fetch of the same version that won the race
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with self._lock:
                self._fetching.discard(tmp.name)
        _touch(target)
        self._sweep_now_and_then()
        self.trim_cache()
        return target

    def trim_cache(self) -> list[TaskKey]:
        """Drop cached copies, least recently used first, until they fit `cache_max_bytes`; never
        one used within `cache_grace_s`. Returns what was dropped (it is fetched again on demand)."""
        if not self.cache_max_bytes:
            return []
        with self._trim_lock:
            entries, total = [], 0
            for task_dir in self.cache_dir.iterdir():
                if task_dir.name.startswith(".") or not task_dir.is_dir():  # a fetch in flight
                    continue
                for version_dir in task_dir.iterdir():
                    if version_dir.name.startswith(".") or not version_dir.is_dir():  # a fetch in flight
                        continue
                    try:
                        size = sum(f.stat().st_size for f in version_dir.iterdir())
                        used = version_dir.stat().st_mtime
                    except OSError:  # dropped by a delete meanwhile
                        continue
                    entries.append((used, size, version_dir))
                    total += size
            dropped: list[TaskKey] = []
            now = time.time()
            for used, size, version_dir in sorted(entries):
                if total <= self.cache_max_bytes or now - used < self.cache_grace_s:
                    break
                shutil.rmtree(version_dir, ignore_errors=True)
                total -= size
                dropped.append(TaskKey(version_dir.parent.name, version_dir.name))
            return dropped

    def _sweep_now_and_then(self) -> None:
        """`_sweep_stale_fetches`, unless it ran within `fetch_sweep_every_s`."""
        now = time.monotonic()
        with self._lock:
            if now - self._swept_at < self.fetch_sweep_every_s:
                return
            self._swept_at = now
        self._sweep_stale_fetches()

    def _sweep_stale_fetches(self) -> None:
        """Remove the temp directories of fetches that died half way (a killed process leaves its
        `.fetch-*` there, which `trim_cache` never counts): those untouched for `STALE_FETCH_S`,
        and never one of this process's fetches in flight. And dropped copies a process killed
        before it removed them (`_set_aside`): nothing reads one, whatever its age."""
        for doomed in self.cache_dir.glob(".drop-*"):
            shutil.rmtree(doomed, ignore_errors=True)
        now = time.time()
        with self._lock:
            in_flight = set(self._fetching)
        for tmp in self.cache_dir.glob(".fetch-*"):
            if tmp.name in in_flight:
                continue
            try:
                # A fetch writes its files at the end: the newest of them says when it was last at work.
                touched = max(f.stat().st_mtime for f in (tmp, *tmp.iterdir()))
            except OSError:  # not a directory, or finished or removed meanwhile
                continue
            if now - touched > STALE_FETCH_S:
                log.info("task store %s: removing %s, left by a fetch that never finished", self.describe(), tmp)
                shutil.rmtree(tmp, ignore_errors=True)

    def bundle_dir(self, key: TaskKey) -> Path:
        """The cached copy, checked against its hash; a copy that no longer matches (local disk
        trouble) is dropped and fetched again once (a download is checked as it lands)."""
        path = self.fetch(key)
        try:
            verify_bundle(path, key, f"the local cache of {self.describe()}")
        except TaskUnavailable:
            shutil.rmtree(path, ignore_errors=True)
            path = self.fetch(key)
        return path

    @_s3_errors
    def put_version(self, task: str, version: str, config_bytes: bytes, weights_bytes: bytes) -> bool:
        validate_task_name(task)
        validate_version(task, version)
        if self._stored_intact(task, version):
            return False
        self.pin_implicit_active(task)
        # Weights first, config last: a version is listed once its config exists. A config PUT that
        # fails leaves the weights where they are: every publish of this bundle writes that same object
        # (same content, same id, same key), so another replica's publish of it, between its own two
        # PUTs now, or the damaged version this one repairs may need it, and S3 cannot delete it only
        # if no other publish wrote it (same bytes, same ETag; a check for the config first would race
        # that publish's config PUT). Unlisted for `partial_grace_s`; the client's retry finishes it.
        self.client.put_object(Bucket=self.bucket, Key=self._key(task, version, WEIGHTS_FILE), Body=weights_bytes)
        self.client.put_object(Bucket=self.bucket, Key=self._key(task, version, CONFIG_FILE), Body=config_bytes)
        return True

    @_s3_errors
    def delete_version(self, key: TaskKey) -> None:
        validate_task_name(key.name)
        validate_version(key.name, key.version)
        # Weights first, config last (the reverse of a publish): a delete that fails half way leaves the
        # config, so the version stays listed (damaged, naming its missing weights) and the client's
        # retry of the delete finds it. Config first would leave weights alone, which `versions` hides
        # for `partial_grace_s` (they may be a publish in flight): a retry would get 404 and the
        # weights would stay, to reappear minutes later as a version nobody asked for.
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key.name, key.version, name))
        self.drop_local_copy(key)

    @_s3_errors
    def delete_task(self, task: str) -> None:
        validate_task_name(task)
        root = self._key(task, "")
        keys, _ = self._list(root)
        # Only the task's own objects: its pointers and its versions' two files. Anything else under
        # `<prefix><task>/` is not this store's to delete: above all another deployment's store whose
        # prefix sits inside this one's (this store at the bucket root, that one at `team-a/`: every
        # key of it is under `team-a/`, which looks like a task named team-a), or objects put there by
        # hand. A "task" with none of its own objects is not found, as its GET says.
        names = sorted(k for k in keys if self._task_object(k[len(root):]))
        if not names:
            raise TaskNotFound(f"task {task!r} not found")
        errors: list[dict[str, Any]] = []
        for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in names[start : start + 1000]]
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            # DeleteObjects answers 200 even when keys were refused (AccessDenied from a bucket policy,
            # an object lock): each is in Errors. The task is not deleted then; a retry finishes it.
            errors += answer.get("Errors", [])
        with self._lock:
            for pointer in POINTERS:
                self._pointer_cache.pop((task, pointer), None)
        self.drop_local_task(task)
        if errors:
            log.warning("task store %s: delete_task %s: %d object(s) not deleted: %s", self.describe(), task,
                        len(errors), errors[:5])
            codes = sorted({str(e.get("Code", "error")) for e in errors})
            raise StoreUnavailable(
                f"task store {self.describe()} refused to delete {len(errors)} object(s) of task {task!r} "
                f"({', '.join(codes)}), so it is only partly deleted; retry the delete (see the server log)")

    def drop_local_copy(self, key: TaskKey) -> None:
        # Names heard from the registry feed: a path is built only from valid ones (fetch caches no other).
        if TASK_NAME_RE.fullmatch(key.name) and is_version_id(key.version):
            with self._drop_lock:
                self._drops[key] += 1
                self._set_aside(self.cache_dir / key.name / key.version)

    def drop_local_task(self, task: str) -> None:
        if TASK_NAME_RE.fullmatch(task):
            with self._drop_lock:
                self._drops[task] += 1
                self._set_aside(self.cache_dir / task)

    def _set_aside(self, path: Path) -> None:
        """Take `path` out of the cache now, in one rename, and remove its files in the background.
        A drop heard from the feed runs on the event loop, where removing a task's cached copies
        (hundreds of MB: 0.25 s for 640 MB here) would hold up every request; the rename keeps the
        feed's order, so a copy of the same version fetched after the drop (uploaded again) lands
        in the freed place and the removal never touches it. A `.drop-*` a killed process left is
        removed by the next sweep (`_sweep_stale_fetches`)."""
        doomed = self.cache_dir / f".drop-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:  # no copy here
            return
        except OSError:  # cannot be renamed (EACCES, EBUSY): removed in place, as it can be
            shutil.rmtree(path, ignore_errors=True)
            return
        self._remover.submit(shutil.rmtree, doomed, ignore_errors=True)

    def _drop_count(self, key: TaskKey) -> int:
        """How often `key`, or its task, was dropped from the cache: a fetch that sees it change
        while it downloads places nothing."""
        return self._drops[key] + self._drops[key.name]

    # -- helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _task_object(rest: str) -> bool:
        """Whether a key, relative to `<prefix><task>/`, is one of the objects a task is made of."""
        parts = rest.split("/")
        if len(parts) == 1:
            return parts[0] in POINTERS
        return len(parts) == 2 and is_version_id(parts[0]) and parts[1] in (CONFIG_FILE, WEIGHTS_FILE)

    def _incomplete(self, key: TaskKey) -> TaskUnavailable:
        """Why `key` cannot be fetched, an object of it being absent: no such version, or which
        of its objects went missing."""
        missing = self.missing_files(key)
        if len(missing) == 2:
            return TaskUnavailable(f"task {key.name!r} has no version {key.version!r} in the store")
        return TaskUnavailable(f"task {key} in {self.describe()} is incomplete: {' and '.join(missing) or 'a file'} "
                               "missing; upload the bundle again (the same files repair it) or activate another version")

    def _stored_intact(self, task: str, version: str) -> bool:
        """Whether both objects of `version` are in the bucket and hash to its id (content-hash ids):
        publishing it again is a no-op only then, and otherwise repairs it (as `bundle_intact` locally)."""
        from service.engine.bundle import content_version

        blobs = []
        for name in (CONFIG_FILE, WEIGHTS_FILE):  # the small config first: a new version stops there
            data = self._get_bytes(self._key(task, version, name))
            if data is None:
                return False
            blobs.append(data)
        return not CONTENT_HASH_RE.fullmatch(version) or content_version(*blobs) == version

    def _get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def _get_text(self, key: str) -> str | None:
        data = self._get_bytes(key)
        return None if data is None else data.decode("utf-8", errors="replace")


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # dropped meanwhile: the caller's read fails and fetches it again
        pass
