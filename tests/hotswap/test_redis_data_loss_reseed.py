"""A Redis that loses its data while the replicas stay connected (FLUSHALL / FLUSHDB by an
operator, keys evicted under `maxmemory`, a failover to an empty primary behind the same address)
must be re-seeded from the store's ACTIVE pointers, as one that restarts empty is. Before, only a
reconnect re-seeded: the periodic resync read the now-empty task set and dropped every task from
every replica's map, so each one answered 404 `task_not_found` for tasks whose files and ACTIVE
pointers were intact in the store."""
from __future__ import annotations

from pathlib import Path

from service.engine.types import TaskKey
from service.store import LocalStore
from tests.aio import async_test, wait_until
from tests.fakes import write_task
from tests.hotswap.servers import RedisServer


@async_test
async def test_a_flushed_redis_is_reseeded_from_the_store_at_the_next_resync(tmp_path: Path) -> None:
    from service.registry.redis_registry import RedisRegistry

    write_task(tmp_path / "store", "t", "v1", active=True)
    server = RedisServer(tmp_path / "redis").start()
    registry = RedisRegistry(server.url, LocalStore(tmp_path / "store"), timeout_s=0.5, reconnect_min_s=0.05,
                             reconnect_max_s=0.2, resync_s=0.1)
    await registry.start()
    try:
        await wait_until(lambda: registry.connected and registry.resyncs >= 1)
        assert await registry.resolve("t") == TaskKey("t", "v1")
        client = server.client()
        client.flushall()
        seen = registry.resyncs
        await wait_until(lambda: registry.resyncs >= seen + 3)  # several periodic resyncs, no reconnect
        assert registry.known("t")
        assert await registry.resolve("t") == TaskKey("t", "v1")
        assert client.sismember("adaptserve:tasks", "t") and client.exists("adaptserve:seeded")
        client.close()
    finally:
        await registry.stop()
        server.kill()
