"""The registry: rollback-stack logic, the local backend's files, and the Redis backend (against
a real redis-server started here): seeding, transactions, the feed, resync, outages, data loss,
refused credentials."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from service.engine.types import TaskKey
from service.errors import Conflict, RegistryUnavailable, StoreUnavailable, TaskNotFound, VersionNotFound
from service.registry.base import TaskRecord, activated, rolled_back, with_upload, without_version
from service.registry import open_registry
from service.registry.local import LocalRegistry
from service.settings import Settings
from service.store import ACTIVE_FILE, HISTORY_FILE, LocalStore
from tests.aio import async_test, wait_until
from tests.fakes import write_task
from tests.hotswap.bundles import files, make_bundle
from tests.hotswap.conftest import AUTH_ADMIN, AUTH_READER
from tests.hotswap.servers import RedisServer, eventually


def test_rollback_walks_back_the_activation_stack_skipping_missing_versions() -> None:
    record = TaskRecord("t")
    for version in ("v1", "v2", "v3", "v1"):
        record = activated(record, version, history_max=10)
    assert record.stack == ("v1", "v2", "v3", "v1")
    record = rolled_back(record, exists=lambda v: True, history_max=10)
    assert (record.active, record.stack) == ("v3", ("v1", "v2", "v3"))
    record = rolled_back(record, exists=lambda v: v != "v2", history_max=10)  # v2 was deleted
    assert (record.active, record.stack) == ("v1", ("v1",))
    with pytest.raises(Conflict):
        rolled_back(record, exists=lambda v: True, history_max=10)
    with pytest.raises(Conflict, match="active version"):
        without_version(record, "v1", history_max=10)
    assert [h["action"] for h in record.history] == ["activate"] * 4 + ["rollback"] * 2
    assert len(activated(record, "v9", history_max=2).history) == 2


@async_test
async def test_the_local_registry_activates_a_deleted_version_written_back_into_the_store(tmp_path: Path) -> None:
    """One replica: the files are the truth. A version deleted, then published again straight into
    the store (`adaptserve train --store` with the same seed), can be activated."""
    write_task(tmp_path, "t", "v1", active=True)
    write_task(tmp_path, "t", "v2")
    store = LocalStore(tmp_path)
    registry = LocalRegistry(store)

    async def remove_files() -> None:
        store.delete_version(TaskKey("t", "v2"))

    assert (await registry.forget_version("t", "v2", remove_files)).deleted == ("v2",)
    with pytest.raises(VersionNotFound):
        await registry.activate("t", "v2")
    write_task(tmp_path, "t", "v2")
    record = await registry.activate("t", "v2")
    assert record.active == "v2" and record.deleted == ()


@async_test
async def test_the_local_registry_follows_a_bare_active_write(tmp_path: Path) -> None:
    write_task(tmp_path, "t", "v1", active=True)
    registry = LocalRegistry(LocalStore(tmp_path))
    changes: list[tuple] = []
    registry.subscribe(lambda *change: changes.append(change))
    write_task(tmp_path, "t", "v2")
    await registry.activate("t", "v2")
    assert (tmp_path / "t" / ACTIVE_FILE).read_text().strip() == "v2"
    assert json.loads((tmp_path / "t" / HISTORY_FILE).read_text())["stack"] == ["v1", "v2"]
    write_task(tmp_path, "t", "v3")
    (tmp_path / "t" / ACTIVE_FILE).write_text("v3")  # e.g. `adaptserve train --store`
    assert await registry.resolve("t") == TaskKey("t", "v3")
    record = await registry.record("t")
    assert (record.active, record.stack) == ("v3", ("v1", "v2", "v3"))
    assert (await registry.rollback("t", lambda v: True)).active == "v2"
    assert changes == [("t", "v1", "v2"), ("t", "v3", "v2")]
    with pytest.raises(VersionNotFound):
        await registry.activate("t", "v7")


@async_test
async def test_the_local_registry_hears_a_task_another_process_deleted(tmp_path: Path) -> None:
    """A task deleted from a shared store by another replica (or by hand) is told to the listeners
    as a delete made here is (they drop its cached copies and metric series), once: by the first
    request that finds it gone, or by the periodic listing of the store when no request comes. A
    lost store directory is not a delete."""
    for task in ("asked", "unasked", "kept"):
        write_task(tmp_path / "store", task, "v1", active=True)
    registry = LocalRegistry(LocalStore(tmp_path / "store"), resync_s=0.01)
    heard: list[tuple] = []
    registry.subscribe(lambda *change: heard.append(change))
    for task in ("asked", "unasked", "kept"):
        await registry.resolve(task)
    await registry.start()
    try:
        shutil.rmtree(tmp_path / "store" / "asked")  # the other replica's delete
        for _ in range(2):
            with pytest.raises(TaskNotFound):
                await registry.resolve("asked")
        assert heard == [("asked", "v1", None)]
        moved = (tmp_path / "store").rename(tmp_path / "moved")
        await asyncio.sleep(0.1)  # several listings fail: nothing is taken for deleted
        moved.rename(tmp_path / "store")
        shutil.rmtree(tmp_path / "store" / "unasked")
        await wait_until(lambda: len(heard) == 2)
        await asyncio.sleep(0.1)
        assert heard == [("asked", "v1", None), ("unasked", "v1", None)]
        assert await registry.resolve("kept") == TaskKey("kept", "v1")
    finally:
        await registry.stop()


@async_test
async def test_the_local_registry_hears_an_activation_another_process_made(tmp_path: Path) -> None:
    """ACTIVE moved by another replica (an activation, a rollback) is told to the listeners as an
    activation made here is (the old version leaves the device): by the first request that reads
    it, once, with no read of its own; with no request, by the comparison with the store, for a
    task with a copy in the cache tiers only (the bound on what that comparison reads)."""
    store = tmp_path / "store"
    for task in ("asked", "cached", "uncached"):
        write_task(store, task, "v1", active=True)
        write_task(store, task, "v2")
    registry = LocalRegistry(LocalStore(store), resync_s=0.01)
    heard: list[tuple] = []
    registry.subscribe(lambda *change: heard.append(change), holdings=lambda: {"cached": {"v1"}})
    for task in ("asked", "cached", "uncached"):
        await registry.resolve(task)
    (store / "asked" / ACTIVE_FILE).write_text("v2\n")  # the other replica's activation
    for _ in range(2):
        assert await registry.resolve("asked") == TaskKey("asked", "v2")
    assert heard == [("asked", "v1", "v2")]
    await registry.start()
    try:
        for task in ("cached", "uncached"):
            (store / task / ACTIVE_FILE).write_text("v2\n")
        await wait_until(lambda: len(heard) == 2)
        await asyncio.sleep(0.1)
        assert heard == [("asked", "v1", "v2"), ("cached", "v1", "v2")]
        await registry.activate("asked", "v1")  # a write here: heard once
        assert heard[2:] == [("asked", "v2", "v1")]
    finally:
        await registry.stop()


@async_test
async def test_the_local_registry_hears_versions_and_tasks_another_process_deleted_that_it_holds(tmp_path: Path) -> None:
    """The comparison with the store tells the listeners of a version deleted by another replica
    that this one holds a copy of, and of a deleted task it holds only metric series of (it never
    served a version: a 503). What it holds nothing of is not its business. Its own delete of a
    task with no active version is heard too."""
    store = tmp_path / "store"
    write_task(store, "t", "v1")
    write_task(store, "t", "v2", active=True)
    for task in ("unserved", "mine", "other"):
        write_task(store, task, "v1")
        write_task(store, task, "v2")  # two versions, no ACTIVE: a 503
    held = {"t": {"v1", "v2"}, "unserved": set(), "mine": set()}
    registry = LocalRegistry(LocalStore(store), resync_s=0.01)
    heard: list[tuple] = []
    deleted: list[tuple] = []

    def on_change(task: str, old: str | None, new: str | None) -> None:  # as TaskAdmin's: what it drops goes
        heard.append((task, old, new))
        held.pop(task, None)

    def on_deleted(task: str, versions: tuple[str, ...]) -> None:
        deleted.append((task, versions))
        held[task].difference_update(versions)

    registry.subscribe(on_change, on_deleted, lambda: held)
    assert await registry.resolve("t") == TaskKey("t", "v2")
    await registry.delete_task("mine", lambda: asyncio.to_thread(shutil.rmtree, store / "mine"))
    assert heard == [("mine", None, None)]
    await registry.start()
    try:
        shutil.rmtree(store / "t" / "v1")
        await wait_until(lambda: deleted == [("t", ("v1",))])
        for task in ("unserved", "other"):
            shutil.rmtree(store / task)
        await wait_until(lambda: len(heard) == 2)
        await asyncio.sleep(0.1)
        assert heard == [("mine", None, None), ("unserved", None, None)]
        assert deleted == [("t", ("v1",))]
    finally:
        await registry.stop()


@async_test
async def test_a_local_store_gone_keeps_what_was_resolved_and_known_never_raises(tmp_path: Path) -> None:
    """A local store's directory gone (an unmounted volume): a task resolved before keeps its
    version (its copy in memory serves, as with Redis or S3), one never resolved is a 503, and
    `known`, which picks a metrics label after the answer was sent, never raises (it used to raise
    StoreUnavailable: two ERROR tracebacks per request). A deleted task is not kept."""
    root = tmp_path / "store"
    for task in ("t", "u", "gone"):
        write_task(root, task, "v1", active=True)
    registry = LocalRegistry(LocalStore(root))
    assert await registry.resolve("t") == TaskKey("t", "v1") and await registry.resolve("gone") == TaskKey("gone", "v1")
    await registry.delete_task("gone", lambda: asyncio.to_thread(shutil.rmtree, root / "gone"))
    moved = root.rename(tmp_path / "moved")
    assert await registry.resolve("t") == TaskKey("t", "v1")
    for task in ("u", "gone"):
        with pytest.raises(StoreUnavailable):
            await registry.resolve(task)
    assert registry.known("t") and not registry.known("u") and not registry.known("other")
    moved.rename(root)
    write_task(root, "t", "v2", active=True)
    assert await registry.resolve("t") == TaskKey("t", "v2")  # the store again, as soon as it answers


@async_test
async def test_a_local_store_refusing_access_keeps_what_was_resolved_and_known_never_raises(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As with the store's directory gone, when it is there but refuses this user (EACCES: a volume
    mounted with another owner): a task resolved before keeps its version and `known` never raises
    (it raised PermissionError, escaping the metrics label after every answer)."""
    import errno
    import os

    root = tmp_path / "store"
    for task in ("t", "u"):
        write_task(root, task, "v1", active=True)
    registry = LocalRegistry(LocalStore(root))
    assert await registry.resolve("t") == TaskKey("t", "v1")
    real_stat, prefix = os.stat, str(root.resolve())

    def refused(path, *args, **kwargs):
        if str(path).startswith(prefix):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refused)
    assert await registry.resolve("t") == TaskKey("t", "v1")
    with pytest.raises(StoreUnavailable):
        await registry.resolve("u")
    assert registry.known("t") and not registry.known("u")


@async_test
async def test_a_local_store_outage_is_warned_once_however_long_and_its_end_is_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stale-serving WARNING is once per outage (it was once per 30 s: a long outage repeated
    it), and the store answering again is logged, so the next outage warns again."""
    import logging
    import time

    root = tmp_path / "store"
    write_task(root, "t", "v1", active=True)
    registry = LocalRegistry(LocalStore(root))
    assert await registry.resolve("t") == TaskKey("t", "v1")
    caplog.set_level(logging.INFO, logger="service.registry.local")
    clock = [time.monotonic()]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    for outage in range(2):
        moved = root.rename(tmp_path / "moved")
        for _ in range(3):
            clock[0] += 60.0  # a minute between requests, the whole time without the store
            assert await registry.resolve("t") == TaskKey("t", "v1")
        moved.rename(root)
        assert await registry.resolve("t") == TaskKey("t", "v1")
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "service.registry.local"]
    assert [level for level, _ in said] == ["WARNING", "INFO", "WARNING", "INFO"], said
    assert all("answers again" in message for level, message in said if level == "INFO")


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, tmp_path: Path):
    """A real redis-server; `parametrize("redis_server", [{"password": ...}], indirect=True)` passes
    its start options."""
    server = RedisServer(tmp_path / "redis").start(**getattr(request, "param", {}))
    yield server
    server.kill()


def _registry(url: str, store: LocalStore, **kwargs):
    from service.registry.redis_registry import RedisRegistry

    return RedisRegistry(url, store, timeout_s=0.5, reconnect_min_s=0.05, reconnect_max_s=0.2, **kwargs)


@pytest.fixture(params=["local", "redis"])
def backend(request: pytest.FixtureRequest) -> RedisServer | None:
    """None for the local registry, else the real redis-server of a Redis registry."""
    return request.getfixturevalue("redis_server") if request.param == "redis" else None


@async_test
async def test_a_first_upload_comes_from_nothing_and_resending_the_active_version_records_nothing(
    backend: RedisServer | None, tmp_path: Path
) -> None:
    (tmp_path / "store").mkdir()
    store = LocalStore(tmp_path / "store")
    registry = LocalRegistry(store) if backend is None else _registry(backend.url, store)
    await registry.start()
    try:
        await wait_until(lambda: registry.status()["connected"])
        write_task(tmp_path / "store", "t", "v1")  # stored as put_version leaves a new task: no ACTIVE yet
        first = await registry.add_version("t", "v1", {"uploaded_at": 1.0}, activate=True)
        assert [(h["action"], h["version"], h["from"]) for h in first.history] == [("upload", "v1", None),
                                                                                    ("activate", "v1", None)]
        feed_length = backend.client().xlen("adaptserve:changes") if backend else 0
        again = await registry.add_version("t", "v1", {"uploaded_at": 2.0}, activate=True, created=False)
        assert again == first and await registry.activate("t", "v1") == first
        assert await registry.record("t") == first
        if backend:  # no write, so no feed entry for the other replicas either
            assert backend.client().xlen("adaptserve:changes") == feed_length
        # A re-upload that repaired the stored copy (created) is recorded, but activates nothing new.
        repaired = await registry.add_version("t", "v1", {"uploaded_at": 3.0}, activate=True, created=True)
        assert [h["action"] for h in repaired.history] == ["upload", "activate", "upload"]
        assert repaired.versions["v1"]["uploaded_at"] == 3.0 and repaired.stack == ("v1",)
    finally:
        await registry.stop()


@async_test
async def test_forgetting_a_version_of_an_unknown_task_is_task_not_found(backend: RedisServer | None, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    store = LocalStore(tmp_path / "store")
    registry = LocalRegistry(store) if backend is None else _registry(backend.url, store)
    await registry.start()

    async def nothing() -> None:
        raise AssertionError("no files to remove")

    try:
        await wait_until(lambda: registry.status()["connected"])
        with pytest.raises(TaskNotFound):
            await registry.forget_version("nope", "v1", nothing)
        write_task(tmp_path / "store", "t", "v1")
        with pytest.raises(VersionNotFound):
            await registry.forget_version("t", "v9", nothing)
    finally:
        await registry.stop()


@async_test
async def test_redis_registries_seed_from_the_store_share_writes_and_follow_the_feed(redis_server, tmp_path: Path) -> None:
    write_task(tmp_path / "store", "t", "v1")
    write_task(tmp_path / "store", "t", "v2")
    (tmp_path / "store" / "t" / ACTIVE_FILE).write_text("v1")
    store = LocalStore(tmp_path / "store")
    first, second = _registry(redis_server.url, store), _registry(redis_server.url, store)
    seen: list[tuple] = []
    second.subscribe(lambda *change: seen.append(change))
    await first.start()
    await second.start()
    try:
        await wait_until(lambda: first.connected and second.connected)
        assert await second.resolve("t") == TaskKey("t", "v1")  # seeded from ACTIVE, once
        await first.activate("t", "v2")
        assert await first.resolve("t") == TaskKey("t", "v2")  # read-your-writes, no feed needed
        await wait_until(lambda: second._records["t"].active == "v2", timeout_s=1)
        assert seen == [("t", "v1", "v2")]
        assert (tmp_path / "store" / "t" / ACTIVE_FILE).read_text().strip() == "v2"  # mirrored
        # Concurrent admins on both replicas: every write lands, none is lost.
        for i in range(10):  # an upload's files are stored before the registry records it (it checks)
            write_task(tmp_path / "store", "t", f"x{i}")
        await asyncio.gather(*(r.add_version("t", f"x{i}", {"i": i}, activate=False)
                               for i, r in enumerate([first, second] * 5)))
        record = await first.record("t")
        await wait_until(lambda: len(first._records["t"].versions) == 10)
        assert sorted(first._records["t"].versions) == sorted(f"x{i}" for i in range(10))
        assert record.active == "v2"
        # Delete: both stop serving it.
        removed: list[str] = []

        async def remove_files() -> None:
            removed.append("t")

        await second.delete_task("t", remove_files)
        await wait_until(lambda: "t" not in first._records, timeout_s=1)
        assert removed == ["t"]
        with pytest.raises(TaskNotFound):
            await first.resolve("t")
    finally:
        await first.stop()
        await second.stop()


def test_a_deleted_version_cannot_be_activated_until_it_is_uploaded_again() -> None:
    record = activated(activated(TaskRecord("t"), "v0", history_max=10), "v1", history_max=10)
    record = without_version(record, "v0", history_max=10)
    assert record.deleted == ("v0",) and TaskRecord.from_json(record.to_json()) == record
    with pytest.raises(VersionNotFound, match="deleted"):
        activated(record, "v0", history_max=10)
    again = with_upload(record, "v0", {"uploaded_at": 1.0}, history_max=10)
    assert again.deleted == () and activated(again, "v0", history_max=10).active == "v0"
    assert TaskRecord.from_json('{"name": "t", "active": "v1"}').deleted == ()  # a record written before tombstones


@contextlib.asynccontextmanager
async def _two_replicas(url: str, tmp_path: Path, versions: tuple[str, ...], active: str):
    """(store, replica a, replica b): two Redis registries over one store holding task t."""
    for version in versions:
        write_task(tmp_path / "store", "t", version)
    (tmp_path / "store" / "t" / ACTIVE_FILE).write_text(active)
    store = LocalStore(tmp_path / "store")
    a, b = _registry(url, store), _registry(url, store)
    await a.start()
    await b.start()
    try:
        await wait_until(lambda: a.connected and b.connected)
        yield store, a, b
    finally:
        await a.stop()
        await b.stop()


@async_test
async def test_an_activation_racing_a_delete_on_another_replica_is_refused(redis_server, tmp_path: Path) -> None:
    """Replica A deletes v0 (its record committed, its files not yet removed) while replica B
    activates v0, whose files B still finds: B's transaction reads the delete and is refused,
    so the task never points at files that are about to go."""
    committed, go_on = asyncio.Event(), asyncio.Event()
    async with _two_replicas(redis_server.url, tmp_path, ("v0", "v1"), "v1") as (store, a, b):

        async def remove_files() -> None:  # runs after A's record is committed: hold it there
            committed.set()
            await go_on.wait()
            store.delete_version(TaskKey("t", "v0"))

        try:
            deleting = asyncio.ensure_future(a.forget_version("t", "v0", remove_files))
            await committed.wait()
            assert store.has_version("t", "v0")  # B's own check of the files passes
            with pytest.raises(VersionNotFound, match="deleted"):
                await b.activate("t", "v0")
            go_on.set()
            await deleting
            record = await b.record("t")
            assert record.active == "v1" and not store.has_version("t", "v0")
        finally:
            go_on.set()


@async_test
async def test_an_activation_racing_a_task_delete_on_another_replica_is_refused(redis_server, tmp_path: Path) -> None:
    """Replica A deletes the whole task (its record gone, its files not yet) while replica B
    activates v0, whose files B still finds, and may already have applied A's delete from the
    feed: B's transaction finds the tombstone and is refused, so no record of the task comes
    back pointing at files that are about to go. An upload afterwards creates the task again."""
    committed, go_on = asyncio.Event(), asyncio.Event()
    async with _two_replicas(redis_server.url, tmp_path, ("v0", "v1"), "v1") as (store, a, b):

        async def remove_files() -> None:  # runs after A's delete is committed: hold it there
            committed.set()
            await go_on.wait()
            store.delete_task("t")

        try:
            deleting = asyncio.ensure_future(a.delete_task("t", remove_files))
            await committed.wait()
            await wait_until(lambda: not b.known("t"))  # the worst case: B has applied the delete
            assert store.has_version("t", "v0")  # B's own check of the files passes
            with pytest.raises(TaskNotFound, match="deleted less than 60 s ago"):
                await b.activate("t", "v0")
            go_on.set()
            await deleting
            for replica in (a, b):
                with pytest.raises(TaskNotFound):
                    await replica.record("t")
            write_task(tmp_path / "store", "t", "v2")
            record = await b.add_version("t", "v2", {"uploaded_at": 1.0}, activate=True)
            assert record.active == "v2"
            assert (await b.activate("t", "v2")).active == "v2"  # the tombstone is gone with the upload
        finally:
            go_on.set()


@async_test
async def test_a_delete_whose_end_redis_missed_holds_up_no_write_once_redis_is_back(redis_server, tmp_path: Path) -> None:
    """Redis dies while A removes a deleted version's files, so A cannot clear the mark that makes
    other writes of the task wait for the removal. Once Redis is back (same data) A clears it: an
    upload through B goes ahead at once instead of waiting out the mark's minute."""
    async with _two_replicas(redis_server.url, tmp_path, ("v0", "v1"), "v1") as (store, a, b):

        async def remove_files() -> None:  # A's record is committed, and marked as removing files
            assert redis_server.client().exists("adaptserve:removing:t")
            redis_server.kill()
            store.delete_version(TaskKey("t", "v0"))

        await a.forget_version("t", "v0", remove_files)
        redis_server.start()
        await wait_until(lambda: a.connected and b.connected, timeout_s=10)
        await wait_until(lambda: not redis_server.client().exists("adaptserve:removing:t"), timeout_s=10)
        write_task(tmp_path / "store", "t", "v2")
        assert (await b.add_version("t", "v2", {"uploaded_at": 1.0}, activate=True)).active == "v2"


@async_test
async def test_a_version_deleted_on_one_replica_is_heard_by_the_other(redis_server, tmp_path: Path) -> None:
    """B's deletion listener hears what A deleted, through the feed or, for a delete made while B
    was away from Redis, through the resync when it is back; the active version is untouched."""
    async with _two_replicas(redis_server.url, tmp_path, ("v0", "v1", "v2"), "v2") as (store, a, b):
        changes: list[tuple] = []
        deleted: list[tuple] = []
        b.subscribe(lambda *change: changes.append(change), lambda *gone: deleted.append(gone))

        async def remove_files() -> None:
            pass

        await a.forget_version("t", "v0", remove_files)
        await wait_until(lambda: deleted == [("t", ("v0",))], timeout_s=1)
        b._records["t"] = replace(b._records["t"], deleted=())  # as if B had been away for that delete
        await b._resync(b._writer)
        assert deleted == [("t", ("v0",)), ("t", ("v0",))] and changes == []


@async_test
async def test_the_active_pointer_ends_at_what_redis_says_when_mirrors_land_out_of_order(redis_server, tmp_path: Path) -> None:
    """Two replicas' pointer writes can land in the wrong order; the late one reads Redis again."""
    async with _two_replicas(redis_server.url, tmp_path, ("v1", "v2"), "v1") as (_, a, b):
        await b.activate("t", "v2")  # Redis and the pointer: v2
        await a._mirror("t", "v1")  # A's mirror of an older write, landing after B's
        assert (tmp_path / "store" / "t" / ACTIVE_FILE).read_text().strip() == "v2"


@async_test
async def test_a_redis_registry_keeps_serving_through_an_outage_and_resyncs(redis_server, tmp_path: Path) -> None:
    write_task(tmp_path / "store", "t", "v1")
    write_task(tmp_path / "store", "t", "v2")
    (tmp_path / "store" / "t" / ACTIVE_FILE).write_text("v1")
    registry = _registry(redis_server.url, LocalStore(tmp_path / "store"))
    await registry.start()
    try:
        await wait_until(lambda: registry.connected)
        redis_server.kill()
        await wait_until(lambda: not registry.connected, timeout_s=5)
        assert await registry.resolve("t") == TaskKey("t", "v1")  # from memory
        with pytest.raises(RegistryUnavailable):
            await registry.activate("t", "v2")
        redis_server.start()
        # A change made behind the replica's back (no feed entry): only a resync can show it.
        raw = redis_server.client()
        record = json.loads(raw.get("adaptserve:task:t"))
        raw.set("adaptserve:task:t", json.dumps(record | {"active": "v2"}))
        await wait_until(lambda: registry.connected, timeout_s=5)
        assert await registry.resolve("t") == TaskKey("t", "v2")
        resyncs = registry.resyncs
        raw.client_kill_filter(_type="normal", skipme=True)  # drop its connections: it reconnects and resyncs
        await wait_until(lambda: registry.resyncs > resyncs, timeout_s=5)
    finally:
        await registry.stop()


@async_test
async def test_a_flushed_redis_is_reseeded_from_the_store_at_the_next_resync(redis_server, tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A Redis that loses its data while the replicas stay connected (FLUSHALL, keys evicted under
    `maxmemory`, a failover to an empty primary behind the same address) is re-seeded from the
    store's ACTIVE pointers, as one that restarts empty is. Before, only a reconnect re-seeded: the
    periodic resync read the empty task set and dropped every task from every replica. The loss is
    a warning (the first seed of a new Redis is not): the tasks' history in Redis is gone."""
    write_task(tmp_path / "store", "t", "v1", active=True)
    registry = _registry(redis_server.url, LocalStore(tmp_path / "store"), resync_s=0.1)
    caplog.set_level(logging.INFO, logger="service.registry.redis_registry")
    await registry.start()
    try:
        await wait_until(lambda: registry.connected and registry.resyncs >= 1)
        assert await registry.resolve("t") == TaskKey("t", "v1")
        seeds = [(r.levelname, r.getMessage()) for r in caplog.records if "seeded" in r.getMessage()]
        assert [level for level, _ in seeds] == ["INFO"], seeds
        client = redis_server.client()
        client.flushall()
        seen = registry.resyncs
        await wait_until(lambda: registry.resyncs >= seen + 3)  # several periodic resyncs, no reconnect
        assert registry.known("t")
        assert await registry.resolve("t") == TaskKey("t", "v1")
        assert client.sismember("adaptserve:tasks", "t") and client.exists("adaptserve:seeded")
        client.close()
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == 1 and warned[0].startswith("registry: Redis lost its data"), warned
        assert "re-seeded 1 tasks from the active versions in local:" in warned[0]
    finally:
        await registry.stop()


@contextlib.asynccontextmanager
async def _synced(url: str, root: Path):
    """A Redis registry over a store holding task t@v1, seeded and read once by hand (no feed
    loop): the race tests place their Redis changes between its steps themselves."""
    write_task(root, "t", "v1", active=True)
    registry = _registry(url, LocalStore(root))
    client = registry._client(socket_timeout=2.0)
    try:
        await registry._seed(client)
        await registry._resync(client)
        assert await registry.resolve("t") == TaskKey("t", "v1")
        yield registry, client
    finally:
        await client.aclose()


@async_test
async def test_a_resync_of_a_redis_flushed_after_its_seed_check_seeds_it_again(redis_server, tmp_path: Path) -> None:
    """FLUSHALL between `_seed` (marker there) and the snapshot read: the empty snapshot is not
    applied. (The store away: the re-seed's read fails and the replica keeps what it knew; the store
    back: it seeds and the task is there.) Deterministic twin of the outage test below."""
    root = tmp_path / "store"
    async with _synced(redis_server.url, root) as (registry, client):
        await client.flushall()  # after the marker check a periodic resync would have made
        moved = root.rename(tmp_path / "moved")
        with pytest.raises(StoreUnavailable):
            await registry._resync(client)
        assert await registry.resolve("t") == TaskKey("t", "v1")  # not dropped by an empty snapshot
        moved.rename(root)
        await client.flushall()
        await registry._resync(client)
        assert await registry.resolve("t") == TaskKey("t", "v1") and await client.sismember(registry._tasks_key, "t")


@async_test
async def test_a_feed_entry_read_after_redis_lost_its_data_does_not_drop_the_task(redis_server, tmp_path: Path) -> None:
    """A feed entry written before a flush and read after it finds no record: that is lost data
    (the `seeded` marker is gone too), not a delete, so Redis is re-seeded instead of the task
    being dropped. (Keys deleted by hand here, the stream kept, to place the read after the loss.)"""
    async with _synced(redis_server.url, tmp_path / "store") as (registry, client):
        before = await registry._stream_tail(client)
        await client.xadd(registry._stream_key, {"task": "t", "active": "v1", "origin": "elsewhere"})
        await client.delete(registry._task_key("t"), registry._tasks_key, registry._seeded_key)
        await registry._read_feed(client, before)
        assert await registry.resolve("t") == TaskKey("t", "v1") and await client.exists(registry._seeded_key)


@async_test
async def test_a_flushed_redis_with_the_store_away_keeps_serving_and_names_the_store(redis_server, tmp_path: Path,
                                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The re-seed reads the store: with the store away too, the replica keeps what it knows,
    says why in the log and its status (not a traceback per retry, not "Redis unreachable" while
    Redis answers), and seeds once the store is back."""
    root = tmp_path / "store"
    write_task(root, "t", "v1", active=True)
    registry = _registry(redis_server.url, LocalStore(root), resync_s=0.1)
    await registry.start()
    try:
        await wait_until(lambda: registry.connected and registry.resyncs >= 1)
        client = redis_server.client()
        moved = root.rename(tmp_path / "moved")
        client.flushall()
        await wait_until(lambda: not registry.connected)
        assert await registry.resolve("t") == TaskKey("t", "v1")  # what it knew, still served
        assert registry.status()["error"].startswith("Redis needs seeding from the task store, which cannot be read")
        assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
        moved.rename(root)
        await wait_until(lambda: registry.connected, timeout_s=5)
        assert client.sismember("adaptserve:tasks", "t")
        client.close()
    finally:
        await registry.stop()


@pytest.mark.parametrize("flags, setting", [({}, "ADAPTSERVE_REDIS_URL"), ({"redis_url": "--redis-url"}, "--redis-url")],
                         ids=["variable", "flag"])
@pytest.mark.parametrize("redis_server", [{"password": "right-pass-123"}], indirect=True, ids=["password"])
@async_test
async def test_a_refused_password_is_named_as_such(redis_server, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   flags: dict[str, str], setting: str) -> None:
    """A Redis that refuses the replica's password is a configuration to fix, not an outage to wait
    out: the replica keeps serving what it knows, but the log, /readyz's registry status and the
    admin 503 say that the credentials were refused and which setting holds them, as it was given
    (before: only "unreachable", as for a network outage). The password is never shown."""
    write_task(tmp_path / "store", "t", "v1", active=True)
    url = f"redis://:wrong-pass-456@127.0.0.1:{redis_server.port}/0"
    settings = Settings(store=tmp_path / "store", redis_url=url, redis_timeout_s=0.5, redis_reconnect_min_s=0.05,
                        redis_reconnect_max_s=0.2)
    registry = open_registry(settings, LocalStore(tmp_path / "store"), flags)
    caplog.set_level(logging.WARNING, logger="service.registry.redis_registry")
    await registry.start()
    try:
        await wait_until(lambda: "error" in registry.status())
        status = registry.status()
        assert status["connected"] is False
        assert status["error"].startswith("Redis refused this replica's credentials")
        assert status["error"].endswith(f"; check the user and password in {setting}")
        with pytest.raises(RegistryUnavailable) as refused:
            registry.require_writable()
        assert "credentials" in str(refused.value)
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "refused this replica's credentials" in logged
        for text in (str(status), str(refused.value), logged):
            assert "wrong-pass-456" not in text and "right-pass-123" not in text
    finally:
        await registry.stop()


@async_test
async def test_a_registry_that_never_reached_redis_serves_the_store_pointers(tmp_path: Path) -> None:
    from tests.hotswap.servers import free_port

    write_task(tmp_path / "store", "t", "v1", active=True)
    registry = _registry(f"redis://127.0.0.1:{free_port()}/0", LocalStore(tmp_path / "store"))
    await registry.start()
    try:
        assert await registry.resolve("t") == TaskKey("t", "v1")
        assert registry.status()["connected"] is False
        with pytest.raises(RegistryUnavailable):
            registry.require_writable()
    finally:
        await registry.stop()


@async_test
async def test_a_replica_that_started_with_redis_and_the_store_away_serves_the_store_once_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down and the store unlistable at start (its volume not mounted yet): once the store
    answers, the replica serves what its ACTIVE pointers say while Redis stays away, as a replica
    that started with the store up does (before: nothing, until Redis answered); once Redis
    answers, Redis's records stand."""
    from tests.hotswap.servers import free_port

    root = tmp_path / "store"
    write_task(root, "t", "v1")
    write_task(root, "t", "v2", active=True)
    port = free_port()
    registry = _registry(f"redis://127.0.0.1:{port}/0", LocalStore(root))
    moved = root.rename(tmp_path / "moved")
    caplog.set_level(logging.INFO, logger="service.registry.redis_registry")
    await registry.start()
    redis_server = None
    try:
        assert not registry.known("t")
        moved.rename(root)
        await wait_until(lambda: registry.known("t"))
        assert await registry.resolve("t") == TaskKey("t", "v2") and not registry.connected
        assert any("answers; serving the 1 tasks its ACTIVE pointers name" in r.getMessage() for r in caplog.records)
        redis_server = RedisServer(tmp_path / "redis", port=port).start()
        client = redis_server.client()  # a registry other replicas filled: t at v1 there
        client.set("adaptserve:task:t", activated(TaskRecord("t"), "v1", 10).to_json())
        client.sadd("adaptserve:tasks", "t")
        client.set("adaptserve:seeded", "elsewhere")
        client.close()
        await wait_until(lambda: registry.connected)
        assert await registry.resolve("t") == TaskKey("t", "v1")  # Redis, not the pointer
    finally:
        await registry.stop()
        if redis_server is not None:
            redis_server.kill()


def test_redis_urls_are_redacted_for_logs() -> None:
    from service.registry.redis_registry import redact_url

    assert redact_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("rediss://user:s3cret@redis:6379/0") == "rediss://user:***@redis:6379/0"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"


def test_a_replica_on_redis_exports_the_registry_series_docs_metrics_md_names(make_client, redis_server) -> None:
    # The series only the Redis registry has (tests/service/api/test_metrics_doc.py checks the
    # rest on a local registry): exported here, and documented.
    from tests.service.api.test_metrics_doc import REDIS_ONLY, documented_series, exported_series

    client = make_client(redis_url=redis_server.url)
    exported = exported_series(client.get("/metrics").text)
    assert REDIS_ONLY | {"adaptserve_registry_connected"} <= exported
    assert exported - {"adaptserve_exit_layer"} <= documented_series(), sorted(exported - documented_series())


def test_the_versions_listing_says_why_a_task_has_no_active_version(make_client, info, backend: RedisServer | None,
                                                                    store: Path) -> None:
    """A task whose ACTIVE names a version that is not stored: its versions listing gives the reason
    the task listing gives (a Redis registry, which the store seeded without it, lists no such task
    and says how to register it), and none once an upload made a version active."""
    write_task(store, "t", "v1")
    write_task(store, "t", "v2")
    (store / "t" / ACTIVE_FILE).write_text("v9\n")
    client = make_client(**({"redis_url": backend.url} if backend else {}))
    eventually(lambda: client.get("/readyz").json()["registry"]["connected"])
    listed = {row["name"]: row for row in client.get("/v1/tasks", headers=AUTH_READER).json()["tasks"]}
    versions = client.get("/v1/tasks/t/versions", headers=AUTH_READER).json()
    assert versions["active"] is None and [row["version"] for row in versions["versions"]] == ["v1", "v2"]
    if backend is None:
        assert versions["error"] == listed["t"]["error"] and "ACTIVE names version 'v9'" in versions["error"]
    else:
        assert "t" not in listed and versions["error"] == "not in the registry: activate a version to register it"
    uploaded = client.post("/v1/tasks/t/versions", files=files(*make_bundle(info, seed=1)), headers=AUTH_ADMIN)
    assert uploaded.status_code == 201, uploaded.text
    assert client.get("/v1/tasks/t/versions", headers=AUTH_READER).json()["error"] is None


def test_a_replica_that_never_reached_redis_labels_and_counts_by_what_it_serves(make_client, info) -> None:
    """Redis down since start: the tasks served from the store's ACTIVE pointers are labelled by
    name (not `_unknown`), a name the store lacks still is not, and the refused upload is counted."""
    from tests.hotswap.servers import free_port
    from tests.hotswap.test_versions_api import classify_version, upload
    from tests.service.api.harness import admin_actions

    version = upload(make_client(), "sentiment", make_bundle(info, seed=1)).json()["version"]  # a local replica
    client = make_client(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5)
    assert client.get("/readyz").json()["registry"]["connected"] is False
    assert classify_version(client) == version
    assert client.post("/v1/tasks/made-up/classify", json={"inputs": ["x"]}, headers=AUTH_READER).status_code == 404
    refused = upload(client, "sentiment", make_bundle(info, seed=2))
    assert refused.status_code == 503 and refused.json()["error_type"] == "registry_unavailable"
    text = client.get("/metrics").text
    assert 'adaptserve_requests_total{status="200",task="sentiment"} 1.0' in text
    assert 'adaptserve_requests_total{status="404",task="_unknown"} 1.0' in text and "made-up" not in text
    assert admin_actions(text) == {("upload", "unavailable"): 1}


@pytest.mark.parametrize("deleted", ["task", "version"])
def test_an_upload_racing_a_delete_on_another_replica_never_leaves_a_version_without_files(
    make_client, info, redis_server, store: Path, deleted: str
) -> None:
    """Replica A deletes the task (or a held-back version) and is held after its commit, before its
    files go; meanwhile replica B uploads that version (the same content: an intact copy is
    re-sent as it is). Whichever order the two then take, the registry never names a version
    whose files the delete removed: B's commit waits for the removal, finds its files gone and
    writes them again, so the upload, which came last, holds."""
    import threading

    a, b = make_client(redis_url=redis_server.url), make_client(redis_url=redis_server.url)
    for client in (a, b):
        eventually(lambda c=client: c.get("/readyz").json()["registry"]["connected"])
    first, second = make_bundle(info, seed=1), make_bundle(info, seed=2)
    assert b.post("/v1/tasks/t/versions", files=files(*first), headers=AUTH_ADMIN).status_code == 201
    held = b.post("/v1/tasks/t/versions?activate=false", files=files(*second), headers=AUTH_ADMIN)
    assert held.status_code == 201, held.text
    version = held.json()["version"]

    entered, release = threading.Event(), threading.Event()
    a_store = a.app.state.service.store
    method = "delete_task" if deleted == "task" else "delete_version"
    remove = getattr(a_store, method)

    def held_removal(*args: object) -> None:  # runs after A's delete committed in Redis
        entered.set()
        release.wait(timeout=30)
        remove(*args)

    answers: dict[str, object] = {}
    path = "/v1/tasks/t" if deleted == "task" else f"/v1/tasks/t/versions/{version}"
    setattr(a_store, method, held_removal)
    deleting = threading.Thread(target=lambda: answers.update(delete=a.delete(path, headers=AUTH_ADMIN)))
    deleting.start()
    try:
        assert entered.wait(timeout=30)
        uploading = threading.Thread(
            target=lambda: answers.update(upload=b.post("/v1/tasks/t/versions", files=files(*second), headers=AUTH_ADMIN)))
        uploading.start()
        uploading.join(timeout=2)  # unfixed, B commits here, before A removes the files
    finally:
        release.set()
        deleting.join(timeout=30)
    uploading.join(timeout=30)
    assert answers["delete"].status_code == 200, answers["delete"].text
    upload = answers["upload"]
    assert upload.status_code in (200, 201) and upload.json()["active"], upload.text
    assert (store / "t" / version / "adapter_model.safetensors").is_file()
    record = json.loads(redis_server.client().get("adaptserve:task:t"))
    assert record["active"] == version and version not in record["deleted"]
    assert (store / "t" / ACTIVE_FILE).read_text().strip() == version
    for client in (a, b):
        eventually(lambda c=client: c.post("/v1/tasks/t/classify", json={"inputs": ["great fun"]},
                                           headers=AUTH_READER).json().get("version") == version)


@pytest.mark.parametrize("deleted", ["task", "version"])
def test_the_same_delete_through_two_replicas_at_once_answers_200_and_404(
    make_client, info, redis_server, store: Path, deleted: str
) -> None:
    """A and B delete the same version (or task) at once: both find it stored and commit, then B
    removes the files while A is held just before it does. A's removal finds nothing left and
    answers 404, as a delete of something already gone does, not a 503 or a 500."""
    import threading

    a, b = make_client(redis_url=redis_server.url), make_client(redis_url=redis_server.url)
    for client in (a, b):
        eventually(lambda c=client: c.get("/readyz").json()["registry"]["connected"])
    assert b.post("/v1/tasks/t/versions", files=files(*make_bundle(info, seed=1)), headers=AUTH_ADMIN).status_code == 201
    held = b.post("/v1/tasks/t/versions?activate=false", files=files(*make_bundle(info, seed=2)), headers=AUTH_ADMIN)
    version = held.json()["version"]
    path = "/v1/tasks/t" if deleted == "task" else f"/v1/tasks/t/versions/{version}"

    entered, release = threading.Event(), threading.Event()
    a_store = a.app.state.service.store
    method = "delete_task" if deleted == "task" else "delete_version"
    remove = getattr(a_store, method)

    def held_removal(*args: object) -> None:  # A committed; B's whole delete runs now
        entered.set()
        release.wait(timeout=30)
        remove(*args)

    setattr(a_store, method, held_removal)
    answers: dict[str, object] = {}
    deleting = threading.Thread(target=lambda: answers.update(a=a.delete(path, headers=AUTH_ADMIN)))
    deleting.start()
    try:
        assert entered.wait(timeout=30)
        answers["b"] = b.delete(path, headers=AUTH_ADMIN)
    finally:
        release.set()
        deleting.join(timeout=30)
    assert answers["b"].status_code == 200, answers["b"].text
    expected = "task_not_found" if deleted == "task" else "version_not_found"
    assert answers["a"].status_code == 404 and answers["a"].json()["error_type"] == expected, answers["a"].text
    assert not (store / "t" / version).exists()
