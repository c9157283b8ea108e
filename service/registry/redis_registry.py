"""The Redis registry: task records in Redis, a Redis Stream as the change feed, and an in-memory
copy on every replica so a request resolves its version without a round trip.

Keys (`<p>` = `ADAPTSERVE_REDIS_PREFIX`):
    <p>:task:<name>   JSON TaskRecord (active version, rollback stack, history, version metadata)
    <p>:tasks         SET of task names (what a full resync reads)
    <p>:changes       STREAM of {task, active, origin}, trimmed to ~registry_stream_maxlen
    <p>:seeded        set once the registry was filled from the store's ACTIVE pointers (first use)
    <p>:deleted:<name>   a deleted task's tombstone (`DELETED_TTL_S`)
    <p>:removing:<name>  HASH of the deletes of the task whose files are being removed (one field each)

Why a Stream and not pub/sub: a pub/sub message sent while a replica is disconnected is gone,
and the replica cannot even tell that it missed something. A Stream has positions: a replica
notes the stream's last id *before* it takes a full snapshot, then reads every entry after that
id, so nothing that happens between snapshot and subscription can fall in a gap (it is at worst
applied twice, and applying is idempotent: an entry only says "re-read this task"). Plain XREAD
(no consumer groups): every replica must see every entry. The blocking read doubles as a
liveness check, and a reconnect always starts with a full resync, so a trimmed stream or a Redis
that lost its data cannot leave a replica stale for long.

Writes are optimistic transactions (WATCH the task key, read, change, MULTI: SET + SADD + XADD,
EXEC, retry on conflict), so concurrent admins on different replicas never lose an update and a
record and its feed entry always land together. While Redis is away, requests keep being served
from the in-memory map and admin writes get 503; a background loop reconnects with exponential
backoff and resyncs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import uuid
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError, WatchError

from service.engine.types import TaskKey
from service.errors import RegistryUnavailable, StoreUnavailable, TaskNotFound, VersionNotFound
from service.registry.base import (
    Registry, TaskRecord, activated, require_active, require_version, rolled_back, with_upload, without_version,
)
from service.store import ACTIVE_FILE, BundleStore, TaskListing, validate_task_name

log = logging.getLogger(__name__)

BLOCK_S = 1.0  # one blocking XREAD; also how soon a silently dead connection is noticed (plus the timeout)
_MAX_WATCH_RETRIES = 32  # optimistic transaction retries under contention on one task
_BATCH_REFRESH = 64  # more distinct tasks than this in one read: resync everything instead
# A deleted task's tombstone lives this long: an activation that checked the task's files before
# another replica deleted it reaches its transaction well within it (a file check takes
# milliseconds, an S3 listing seconds), sees the tombstone and is refused.
DELETED_TTL_S = 60
# A write that points the task at a version's files waits this long for another replica's delete of
# the same task to finish removing files: a rename on a local store, a few DELETEs on S3.
REMOVAL_WAIT_S = 10.0
_REMOVAL_POLL_S = 0.02


def _listing(task: str, record: TaskRecord) -> TaskListing:
    return TaskListing(task, record.active, None if record.active else "no active version")


def redact_url(url: str) -> str:
    """`redis://user:secret@host:6379/0` -> `redis://user:***@host:6379/0`, for logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit((parts.scheme, f"{user}***@{netloc}", parts.path, parts.query, parts.fragment))


class RedisRegistry(Registry):
    backend = "redis"

    def __init__(
        self,
        url: str,
        store: BundleStore,
        *,
        prefix: str = "adaptserve",
        timeout_s: float = 2.0,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        resync_s: float = 60.0,
        history_max: int = 100,
        stream_maxlen: int = 10_000,
        url_setting: str = "ADAPTSERVE_REDIS_URL",
    ) -> None:
        super().__init__()
        self.url = url
        self.url_setting = url_setting  # the setting that gave `url`, as messages name it (flag or variable)
        self.store = store
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.resync_s = resync_s
        self.history_max = history_max
        self.stream_maxlen = stream_maxlen
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._records: dict[str, TaskRecord] = {}  # the in-memory map every request reads
        self._connected = False
        self._why_not: str | None = None  # why the last connection attempt failed, while not connected
        self._writer: aioredis.Redis | None = None
        self._follower: asyncio.Task[None] | None = None
        self._store_retry: asyncio.Task[None] | None = None  # lists the store again, while it failed at start
        self._feed_client: aioredis.Redis | None = None
        self._stopping = False
        self.resyncs = 0  # full resyncs done (first sync, reconnects, periodic)
        self.changes_applied = 0  # records changed by the feed or own writes
        self._unsaid_removals: set[tuple[str, str]] = set()  # (task, removal) done while Redis was away

    # -- keys ------------------------------------------------------------------------------------
    def _task_key(self, task: str) -> str:
        return f"{self.prefix}:task:{task}"  # task names are validated: no separators, no wildcards

    def _deleted_key(self, task: str) -> str:
        return f"{self.prefix}:deleted:{task}"

    def _removing_key(self, task: str) -> str:
        return f"{self.prefix}:removing:{task}"

    @property
    def _tasks_key(self) -> str:
        return f"{self.prefix}:tasks"

    @property
    def _stream_key(self) -> str:
        return f"{self.prefix}:changes"

    @property
    def _seeded_key(self) -> str:
        return f"{self.prefix}:seeded"

    def _client(self, socket_timeout: float) -> aioredis.Redis:
        # No client-side retries: our own loop reconnects with backoff, and an admin write should
        # fail in `timeout_s`, not after redis-py's default retries.
        return aioredis.Redis.from_url(
            self.url, socket_connect_timeout=self.timeout_s, socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        # Until Redis first answers, serve what the store's ACTIVE pointers say: every write
        # through this registry mirrors its active version there (a hint for exactly this case).
        try:
            await self._map_from_store()
        except Exception as err:  # noqa: BLE001 - a broken store must not stop the server coming up
            log.warning("registry: cannot list the store %s to serve its tasks until Redis answers (%s); "
                        "listing it again until one of them answers", self.store.describe(), err)
            self._store_retry = asyncio.create_task(self._map_from_store_later(), name="adaptserve-registry-store-seed")
        self._writer = self._client(socket_timeout=self.timeout_s)
        self._follower = asyncio.create_task(self._follow(), name="adaptserve-registry-feed")
        log.info("registry: Redis at %s, prefix %r", redact_url(self.url), self.prefix)

    async def _map_from_store(self) -> None:
        """Fill the in-memory map from the store's ACTIVE pointers, unless Redis (the authority) was
        read meanwhile. Raises what listing the store raises."""
        listings = await asyncio.to_thread(self.store.list_tasks)
        if self.resyncs:  # Redis answered while the store was listed: its records stand
            return
        for listing in listings:
            if listing.version is not None:
                self._records[listing.name] = TaskRecord(listing.name, listing.version, (listing.version,))

    async def _map_from_store_later(self) -> None:
        """The store could not be listed at start: list it again, with Redis's backoff, until it
        answers or Redis does. Without this, a replica that started while both were away served
        nothing until Redis came back, however long the store had been answering."""
        delay = self.reconnect_min_s
        while not self._stopping and not self.resyncs:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.reconnect_max_s)
            try:
                await self._map_from_store()
            except Exception:  # noqa: BLE001 - still away: said once, at start
                continue
            if not self.resyncs:
                log.warning("registry: the store %s answers; serving the %d tasks its ACTIVE pointers name "
                            "until Redis answers", self.store.describe(), len(self._records))
            return

    async def stop(self) -> None:
        self._stopping = True
        if self._store_retry is not None:
            self._store_retry.cancel()
            await asyncio.gather(self._store_retry, return_exceptions=True)
        if self._follower is not None:
            self._follower.cancel()
            # A cancellation that lands inside redis-py's read can be absorbed there (seen with
            # Python 3.11 + redis-py 8); closing the feed's connection ends that read for sure,
            # and the loop checks `_stopping`. Shutdown never waits on Redis for long.
            done, _ = await asyncio.wait({self._follower}, timeout=0.5)
            if not done and self._feed_client is not None:
                await _quietly(self._feed_client.connection_pool.disconnect())
                done, _ = await asyncio.wait({self._follower}, timeout=BLOCK_S + self.timeout_s)
            if not done:
                log.warning("registry: the feed did not stop in time; leaving it behind")
        if self._writer is not None:
            await _quietly(self._writer.aclose())

    def status(self) -> dict[str, Any]:
        status = {"backend": self.backend, "connected": self._connected, "tasks": len(self._records), "resyncs": self.resyncs}
        if not self._connected and self._why_not is not None:
            status["error"] = self._why_not
        return status

    @property
    def connected(self) -> bool:
        return self._connected

    # -- the feed --------------------------------------------------------------------------------
    async def _follow(self) -> None:
        """Connect, resync, follow the stream; on any failure back off and start over."""
        loop = asyncio.get_running_loop()
        delay = self.reconnect_min_s
        lost_at: float | None = None
        while not self._stopping:
            client = self._feed_client = self._client(socket_timeout=BLOCK_S + self.timeout_s)
            try:
                await client.ping()
                last_id = await self._stream_tail(client)  # before the snapshot: no gap after it
                await self._seed(client)
                await self._resync(client)
                await self._say_removals(client)
                self._connected = True
                self._why_not = None
                delay = self.reconnect_min_s
                if lost_at is not None:
                    log.warning("registry: Redis is back after %.1f s; resynced %d tasks", loop.time() - lost_at, len(self._records))
                    lost_at = None
                next_resync = loop.time() + self.resync_s
                while not self._stopping:
                    last_id = await self._read_feed(client, last_id)
                    if loop.time() >= next_resync:
                        # A Redis that lost its data without dropping the connection (FLUSHALL, keys
                        # evicted, a failover to an empty primary) is re-seeded here as one that
                        # restarted empty is on reconnect; otherwise this resync would read an empty
                        # task set and drop every task. One EXISTS when nothing was lost.
                        await self._seed(client)
                        await self._resync(client)
                        await self._say_removals(client)
                        next_resync = loop.time() + self.resync_s
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, StoreUnavailable) as err:
                # StoreUnavailable: seeding a Redis that lost its data (or a first one) reads the
                # store, which is down too; the replica serves what it knows and retries both.
                if self._stopping:
                    return
                why = _why_not(err, self.url_setting)
                refused_before = self._why_not is not None and _REFUSED in self._why_not
                # Once per outage, and again only if it turns from an outage into refused credentials
                # or back (the text of a connection error changes as Redis goes down: not news).
                if self._connected or lost_at is None or (_REFUSED in why) != refused_before:
                    log.warning(
                        "registry: %s; serving the %d tasks this replica knows and refusing admin changes "
                        "until it answers", why, len(self._records),
                    )
                    lost_at = lost_at if lost_at is not None and not self._connected else loop.time()
                self._why_not = why
                self._connected = False
            except Exception:  # a bug must not end the feed for good
                log.exception("registry: feed loop failed; reconnecting")
                self._connected = False
                lost_at = lost_at or loop.time()
            finally:
                await _quietly(client.aclose())
            if self._stopping:
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: replicas do not reconnect in step
            delay = min(delay * 2, self.reconnect_max_s)

    async def _say_removals(self, client: aioredis.Redis) -> None:
        """The deletes whose end `_removed` could not tell Redis: told now, so writes of their
        tasks wait no longer (rather than until the marker expires)."""
        for task, removal in sorted(self._unsaid_removals):
            await client.hdel(self._removing_key(task), removal)
            self._unsaid_removals.discard((task, removal))

    async def _stream_tail(self, client: aioredis.Redis) -> bytes | str:
        last = await client.xrevrange(self._stream_key, count=1)
        return last[0][0] if last else "0-0"

    async def _read_feed(self, client: aioredis.Redis, last_id: bytes | str) -> bytes | str:
        response = await client.xread({self._stream_key: last_id}, count=1024, block=int(BLOCK_S * 1000))
        streams = response.items() if isinstance(response, dict) else (response or [])
        tasks: set[str] = set()
        for _, entries in streams:
            for entry_id, fields in entries:
                last_id = entry_id
                task = fields.get(b"task") or fields.get("task")
                if task:
                    tasks.add(task.decode() if isinstance(task, bytes) else task)
        if len(tasks) > _BATCH_REFRESH:
            await self._resync(client)
            return last_id
        raws = {task: await client.get(self._task_key(task)) for task in sorted(tasks)}
        if None in raws.values() and not await client.exists(self._seeded_key):
            # A record gone because Redis lost its data (FLUSHALL after the entry was written), not
            # because the task was deleted: re-seed and resync (`_resync`) instead of dropping it.
            await self._resync(client)
            return last_id
        for task, raw in raws.items():
            self._apply(task, _decode(raw, task))
        return last_id

    async def _resync(self, client: aioredis.Redis) -> None:
        """Replace the whole in-memory map with what Redis holds now. A Redis that lost its data
        around the read (the `seeded` marker gone before or after it: FLUSHALL between `_seed` and
        here) is seeded and read again: a snapshot of a flushed Redis is not the registry, and
        applying it would drop every task from this replica."""
        for _ in range(3):
            async with client.pipeline(transaction=True) as pipe:
                pipe.exists(self._seeded_key)
                pipe.smembers(self._tasks_key)
                seeded, members = await pipe.execute()
            if seeded:
                names = sorted(n.decode() if isinstance(n, bytes) else n for n in members)
                raws = await client.mget([self._task_key(n) for n in names]) if names else []
                if await client.exists(self._seeded_key):
                    break
            await self._seed(client)
        else:
            raise RedisError("Redis lost its data again while this replica read it")
        fresh = {name: record for name, raw in zip(names, raws, strict=True) if (record := _decode(raw, name)) is not None}
        old = self._records
        self._records = fresh
        self.resyncs += 1
        for task in sorted(set(old) | set(fresh)):
            self._heard(task, old.get(task), fresh.get(task))

    async def _seed(self, client: aioredis.Redis) -> None:
        """First use of this Redis (no `seeded` marker): register every task of the store with
        the version its ACTIVE pointer names, so adopting Redis needs no migration step. A Redis
        that lost its data is re-seeded the same way, with a warning. Replicas starting together may all seed:
        each task is created only if absent (SET NX), and the marker is set only once seeding is
        complete, so no replica resyncs against a half-seeded registry."""
        if await client.exists(self._seeded_key):
            return
        listings = await asyncio.to_thread(self.store.list_tasks)
        seeded = 0
        for listing in listings:
            if listing.version is None:
                continue
            record = activated(TaskRecord(listing.name), listing.version, self.history_max, action="seed")
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(self._task_key(listing.name), record.to_json(), nx=True)
                pipe.sadd(self._tasks_key, listing.name)
                created, _ = await pipe.execute()
            if created:
                await client.xadd(self._stream_key, self._entry(listing.name, record), maxlen=self.stream_maxlen, approximate=True)
                seeded += 1
        await client.set(self._seeded_key, self.origin, nx=True)
        if seeded and self.resyncs:  # this replica read a seeded registry from it before: its data is gone
            log.warning("registry: Redis lost its data (FLUSHALL, keys evicted under maxmemory, or a restart or "
                        "failover without persistence); re-seeded %d tasks from the active versions in %s (their "
                        "activation history, rollback stacks and upload metadata are gone)", seeded,
                        self.store.describe())
        elif seeded:
            log.info("registry: seeded Redis with %d tasks from %s", seeded, self.store.describe())

    def _entry(self, task: str, record: TaskRecord | None) -> dict[str, str]:
        return {"task": task, "active": (record.active if record else None) or "", "origin": self.origin}

    def _apply(self, task: str, record: TaskRecord | None) -> None:
        before = self._records.get(task)
        if record is None:
            self._records.pop(task, None)
        else:
            self._records[task] = record
        self._heard(task, before, record)

    def _heard(self, task: str, before: TaskRecord | None, after: TaskRecord | None) -> None:
        """Tell the listeners what changed from `before` to `after`: the active version, and the
        versions deleted since (their tombstones in the record; a resync after an outage finds the
        ones deleted meanwhile too). A whole task deleted is only an active version gone to None."""
        old, new = (before.active if before else None), (after.active if after else None)
        if old != new:
            self.changes_applied += 1
            self._notify(task, old, new)
        if after is not None:
            known = set(before.deleted) if before is not None else set()
            self._notify_deleted(task, tuple(v for v in after.deleted if v not in known))

    # -- reads -----------------------------------------------------------------------------------
    async def resolve(self, task: str) -> TaskKey:
        validate_task_name(task)
        return require_active(self._records.get(task), task)

    def known(self, task: str) -> bool:
        return task in self._records

    async def list_tasks(self) -> list[TaskListing]:
        return [_listing(name, record) for name, record in sorted(self._records.items())]

    async def listing(self, task: str) -> TaskListing | None:
        record = self._records.get(task)
        return _listing(task, record) if record is not None else None

    async def record(self, task: str) -> TaskRecord:
        validate_task_name(task)
        record = self._records.get(task)
        if record is None:
            raise TaskNotFound(f"task {task!r} not found")
        return record

    # -- writes ----------------------------------------------------------------------------------
    def require_writable(self) -> None:
        if not self._connected:
            why = self._why_not or "the Redis registry is unreachable"
            raise RegistryUnavailable(
                f"admin changes are refused until the Redis registry answers: {why} "
                "(classification keeps serving the versions this replica knows)"
            )

    async def add_version(self, task: str, version: str, meta: dict[str, Any], *, activate: bool,
                          created: bool = True) -> TaskRecord:
        def change(record: TaskRecord | None) -> TaskRecord:
            record = with_upload(record or TaskRecord(task), version, meta, self.history_max, created=created)
            return activated(record, version, self.history_max) if activate else record

        return await self._transact(task, change, whole=version)  # type: ignore[return-value]

    async def activate(self, task: str, version: str) -> TaskRecord:
        """A stored task Redis has no record of (copied into the store) is registered here, unless
        another replica deleted it since its files were checked (the tombstone says so)."""
        validate_task_name(task)
        require_version(await asyncio.to_thread(self._versions, task), task, version)
        return await self._transact(task, lambda record: activated(record or TaskRecord(task), version, self.history_max),  # type: ignore[return-value]
                                    refuse_deleted=True)

    async def rollback(self, task: str, exists: Callable[[str], bool]) -> TaskRecord:
        def change(record: TaskRecord | None) -> TaskRecord:
            if record is None:
                raise TaskNotFound(f"task {task!r} not found")
            return rolled_back(record, exists, self.history_max)

        return await self._transact(task, change)  # type: ignore[return-value]

    async def forget_version(self, task: str, version: str, remove_files: Callable[[], Awaitable[None]]) -> TaskRecord:
        validate_task_name(task)
        stored = await asyncio.to_thread(self._versions, task)
        if not stored:  # as the local registry answers: the task itself is unknown
            raise TaskNotFound(f"task {task!r} not found")
        if version not in stored:
            raise VersionNotFound(f"task {task!r} has no version {version!r}")

        def change(record: TaskRecord | None) -> TaskRecord:
            return without_version(record or TaskRecord(task), version, self.history_max)

        removal = uuid.uuid4().hex
        updated = await self._transact(task, change, removal=removal)
        try:
            await remove_files()
        finally:
            await self._removed(task, removal)
        return updated  # type: ignore[return-value]

    async def delete_task(self, task: str, remove_files: Callable[[], Awaitable[None]]) -> None:
        validate_task_name(task)
        in_store = await asyncio.to_thread(self.store.has_task, task)

        def change(record: TaskRecord | None) -> None:
            if record is None and not in_store:
                raise TaskNotFound(f"task {task!r} not found")
            return None

        removal = uuid.uuid4().hex
        await self._transact(task, change, removal=removal)
        try:
            if in_store:
                await remove_files()
        finally:
            await self._removed(task, removal)

    async def _removed(self, task: str, removal: str) -> None:
        """A delete's files are gone: writes waiting on it go ahead. Redis away: said when it is
        back (or the field leaves with its key's expiry)."""
        try:
            await self._writer.hdel(self._removing_key(task), removal)  # type: ignore[union-attr]
        except (RedisError, OSError):
            self._unsaid_removals.add((task, removal))

    def _versions(self, task: str) -> list[str]:
        try:
            return self.store.versions(task)
        except TaskNotFound:
            return []

    async def _transact(self, task: str, change: Callable[[TaskRecord | None], TaskRecord | None], *,
                        refuse_deleted: bool = False, whole: str | None = None,
                        removal: str | None = None) -> TaskRecord | None:
        """WATCH/GET/MULTI/SET+SADD+XADD/EXEC with retries on conflict; then apply locally at once
        (read-your-writes on this replica, without waiting for our own feed entry).
        `refuse_deleted`: TaskNotFound instead of a new record for a task deleted moments ago.
        `whole`: a version the new record names (an upload's), whose files must be in the store when
        it commits, as must those of a version it makes active (`_require_whole`).
        `removal`: this write is a delete whose files go next; `_removed` says when they are gone."""
        validate_task_name(task)
        self.require_writable()
        assert self._writer is not None
        key = self._task_key(task)
        for attempt in (1, 2):  # a pooled connection may have died with the old Redis: one fresh try
            try:
                new = await self._commit(key, task, change, refuse_deleted, whole, removal)
                break
            except WatchError:
                raise RegistryUnavailable(f"task {task!r} is being changed concurrently; retry") from None
            except (RedisError, OSError) as err:
                await self._writer.connection_pool.disconnect()
                if attempt == 2:
                    raise RegistryUnavailable(
                        f"the Redis registry cannot be reached ({type(err).__name__}); admin changes are "
                        "refused until it returns"
                    ) from None
        self._apply(task, new)
        if new is not None and new.active is not None:
            await self._mirror(task, new.active)
        return new

    async def _mirror(self, task: str, version: str) -> None:
        """Mirror the active version into the store's ACTIVE pointer, then read Redis again and
        mirror once more if it moved meanwhile. Two replicas' writes can land in the pointer in
        the wrong order (the mirror runs after EXEC, outside any lock they share), but whichever
        writes last checks Redis after its write, so the pointer ends at what Redis says."""
        for _ in range(4):
            await asyncio.to_thread(self._mirror_active, task, version)
            try:
                now = _decode(await self._writer.get(self._task_key(task)), task)  # type: ignore[union-attr]
            except (RedisError, OSError):
                return  # Redis went away: the pointer keeps what this write committed
            if now is None or now.active is None or now.active == version:
                return
            version = now.active

    async def _commit(self, key: str, task: str, change: Callable[[TaskRecord | None], TaskRecord | None],
                      refuse_deleted: bool = False, whole: str | None = None,
                      removal: str | None = None) -> TaskRecord | None:
        assert self._writer is not None
        deleted, removing = self._deleted_key(task), self._removing_key(task)
        loop = asyncio.get_running_loop()
        wait_until = loop.time() + REMOVAL_WAIT_S
        async with self._writer.pipeline(transaction=True) as pipe:
            conflicts = 0
            while conflicts < _MAX_WATCH_RETRIES:
                try:
                    await pipe.watch(key, deleted, removing)
                    old = _decode(await pipe.get(key), task)
                    if old is None and refuse_deleted and await pipe.exists(deleted):
                        raise TaskNotFound(
                            f"task {task!r} was deleted less than {DELETED_TTL_S} s ago, so a version of it found in "
                            "the store is not registered again yet (it may be a copy the delete is removing); "
                            "upload the bundle to create the task again now")
                    new = change(old)  # may raise Conflict / TaskNotFound: the pipeline is reset on exit
                    if new is not None and new == old:  # a no-op (e.g. the active version re-sent): no write, no feed entry
                        return new
                    if not await self._require_whole(pipe, task, old, new, whole):
                        if loop.time() > wait_until:
                            raise RegistryUnavailable(
                                f"a delete of task {task!r} on another replica is still removing its files after "
                                f"{REMOVAL_WAIT_S:.0f} s; retry")
                        await pipe.reset()
                        await asyncio.sleep(_REMOVAL_POLL_S)
                        continue
                    pipe.multi()
                    if removal is not None:  # WATCHed by every write that needs files whole: they wait for it
                        pipe.hset(removing, removal, self.origin)
                        pipe.expire(removing, DELETED_TTL_S)
                    if new is None:
                        pipe.delete(key)
                        pipe.srem(self._tasks_key, task)
                        pipe.set(deleted, "1", ex=DELETED_TTL_S)
                    else:
                        pipe.set(key, new.to_json())
                        pipe.sadd(self._tasks_key, task)
                        if old is None:  # created again (an upload): the tombstone no longer applies
                            pipe.delete(deleted)
                    pipe.xadd(self._stream_key, self._entry(task, new), maxlen=self.stream_maxlen, approximate=True)
                    await pipe.execute()
                    return new
                except WatchError:
                    conflicts += 1
        raise WatchError(f"gave up after {_MAX_WATCH_RETRIES} conflicting writes")

    async def _require_whole(self, pipe: Any, task: str, old: TaskRecord | None, new: TaskRecord | None,
                             whole: str | None) -> bool:
        """Inside the WATCH of a write: whether the files of `whole` and of the version `new` makes
        active are in the store. False while a delete of the task (on any replica) is removing files:
        the caller waits for it. VersionNotFound when they are missing: a delete that committed
        after this write's own checks removed them (an upload stores them again). A delete
        committing from here to EXEC changes a WATCHed key, so this write is retried."""
        versions = {whole} if whole is not None else set()
        if new is not None and new.active is not None and new.active != (old.active if old else None):
            versions.add(new.active)
        if not versions:
            return True
        if await pipe.exists(self._removing_key(task)):
            return False
        for version in sorted(versions):
            try:
                whole_now = not await asyncio.to_thread(self.store.missing_files, TaskKey(task, version))
            except TaskNotFound:  # the task's whole directory went
                whole_now = False
            if not whole_now:
                raise VersionNotFound(f"task {task!r} has no version {version!r}: a delete made meanwhile, on "
                                      "another replica, removed its files")
        return True

    def _mirror_active(self, task: str, version: str) -> None:
        """Best effort: the store's ACTIVE pointer follows Redis, for replicas that start while
        Redis is away (Redis stays the authority: it overrides the pointer on connect)."""
        try:
            if self.store.has_task(task):
                self.store.write_pointer(task, ACTIVE_FILE, version + "\n")
        except Exception as err:  # noqa: BLE001
            log.warning("registry: could not mirror task %s's active version into the store: %s", task, err)


_REFUSED = "Redis refused this replica's credentials"


def _why_not(err: BaseException, url_setting: str) -> str:
    """Why Redis did not serve this replica, for the log, /readyz and the admin 503: a refused
    password (a configuration to fix, not an outage to wait out) says so, naming the setting that
    holds it (`url_setting`), and so does a store that could not be read to seed Redis. Never the
    URL, which may hold the password; Redis's own messages do not quote it."""
    if isinstance(err, StoreUnavailable):
        return f"Redis needs seeding from the task store, which cannot be read ({err.message})"
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if isinstance(err, AuthenticationError) or (
        isinstance(err, ResponseError) and str(err).startswith(("NOAUTH", "WRONGPASS"))
    ):
        return f"{_REFUSED} ({text}); check the user and password in {url_setting}"
    return f"Redis unreachable ({text})"


async def _quietly(closing: Awaitable[Any]) -> None:
    try:
        await closing
    except Exception:  # noqa: BLE001 - closing a connection to a Redis that is already gone
        pass


def _decode(raw: bytes | str | None, task: str) -> TaskRecord | None:
    if raw is None:
        return None
    try:
        return TaskRecord.from_json(raw)
    except (ValueError, KeyError, TypeError) as err:
        log.error("registry: unreadable record for task %s in Redis (%s); treating it as absent", task, err)
        return None
