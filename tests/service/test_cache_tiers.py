"""The task cache's tiers: device -> host memory -> store. Evicted tasks wait in host memory and
come back without a store read; the host tier has its own byte budget."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, replace

import pytest
import torch

from service.cache import TaskCache
from service.engine.types import TaskKey
from tests.aio import async_test, wait_until

A, B, C = TaskKey("a", "v1"), TaskKey("b", "v1"), TaskKey("c", "v1")


@dataclass(frozen=True, eq=False)
class Loaded:
    key: TaskKey
    nbytes: int
    where: str = "device"


class Tiers:
    """Counts store loads and copies between tiers; copies either way can be held on a gate."""

    def __init__(self) -> None:
        self.loads: list[TaskKey] = []
        self.to_host_calls = 0
        self.to_device_calls = 0
        self.host_gate: threading.Event | None = None
        self.device_gate: threading.Event | None = None

    def load(self, key: TaskKey) -> Loaded:
        self.loads.append(key)
        return Loaded(key, 40)

    def to_host(self, task: Loaded) -> Loaded:
        self.to_host_calls += 1
        if self.host_gate is not None:
            assert self.host_gate.wait(5)
        return replace(task, where="host")

    def to_device(self, task: Loaded) -> Loaded:
        self.to_device_calls += 1
        if self.device_gate is not None:
            assert self.device_gate.wait(5)
        return replace(task, where="device")

    def cache(self, host_max_bytes: int) -> TaskCache[Loaded]:
        return TaskCache(self.load, 100, host_max_bytes=host_max_bytes, to_host=self.to_host, to_device=self.to_device)


@async_test
async def test_evicted_tasks_wait_in_host_memory_and_come_back_without_a_store_read() -> None:
    tiers = Tiers()
    cache = tiers.cache(host_max_bytes=100)
    await cache.get(A)
    await cache.get(B)
    await cache.get(C)  # 120 > 100 bytes: A leaves the device for host memory
    assert cache.held() == {A, B, C}  # A being copied or copied: held either way
    await wait_until(lambda: cache.location(A) == "host")
    assert (cache.location(B), cache.location(C)) == ("device", "device")
    assert cache.peek(A).where == "host"
    back = await cache.get(A)  # promoted: B goes to host now
    assert back.where == "device" and tiers.loads == [A, B, C]
    await wait_until(lambda: cache.location(B) == "host")
    stats = cache.stats
    assert (stats.promotions, stats.demotions, stats.evictions, stats.loads) == (1, 2, 2, 3)
    assert (stats.bytes, stats.host_bytes, stats.host_entries) == (80, 40, 1)


@async_test
async def test_the_host_tier_has_its_own_budget() -> None:
    tiers = Tiers()
    cache = tiers.cache(host_max_bytes=40)
    for key in (A, B, C, TaskKey("d", "v1")):
        await cache.get(key)
    await wait_until(lambda: cache.stats.demotions == 2)
    assert cache.location(A) == "store" and cache.location(B) == "host"  # A was pushed out of host by B
    assert cache.stats.host_evictions == 1 and cache.held() == {B, C, TaskKey("d", "v1")}
    await cache.get(A)
    assert tiers.loads.count(A) == 2  # from the store again


@async_test
async def test_without_a_host_tier_evicted_tasks_go_back_to_the_store() -> None:
    tiers = Tiers()
    cache = tiers.cache(host_max_bytes=0)
    for key in (A, B, C):
        await cache.get(key)
    assert cache.location(A) == "store" and tiers.to_host_calls == 0


@async_test
async def test_a_task_asked_for_while_its_copy_to_host_runs_is_taken_back_from_the_device() -> None:
    tiers = Tiers()
    tiers.host_gate = threading.Event()
    cache = tiers.cache(host_max_bytes=100)
    first = await cache.get(A)
    cache.demote(A)
    assert cache.location(A) == "device"  # still whole on the device while it is copied
    again = await cache.get(A)
    assert again is first and tiers.to_device_calls == 0
    tiers.host_gate.set()
    await cache.close()
    assert cache.location(A) == "device" and cache.host_keys() == []  # the finished copy is dropped


@async_test
async def test_a_task_whose_copy_to_host_runs_is_counted_on_the_device_until_it_is_done() -> None:
    # It still holds its device memory: a gauge that dropped it at eviction would show room that
    # the device does not have while the copy runs.
    from service.metrics import Metrics

    tiers = Tiers()
    tiers.host_gate = threading.Event()
    cache = tiers.cache(host_max_bytes=100)
    for key in (A, B, C):  # 40 bytes each in a 100-byte device tier: C's load evicts A
        await cache.get(key)
    stats = cache.stats
    assert (stats.bytes, stats.copying_bytes, stats.copying_entries, stats.host_bytes) == (80, 40, 1, 0)
    metrics = Metrics()
    metrics.watch(cache_stats=lambda: cache.stats, queue_depth=lambda: 0, ready=lambda: True)
    text = metrics.render()[0].decode()
    assert "adaptserve_cache_bytes 120.0" in text and "adaptserve_cache_entries 3.0" in text
    tiers.host_gate.set()
    await cache.close()
    assert (stats.bytes, stats.copying_bytes, stats.copying_entries, stats.host_bytes) == (80, 0, 0, 40)
    tiers.host_gate = threading.Event()
    await cache.get(A)  # promoted back, evicting B, whose copy is held
    cache.drop(B)  # deleted mid-copy: it leaves every count at once
    assert (stats.copying_bytes, stats.copying_entries) == (0, 0)
    tiers.host_gate.set()
    await cache.close()


@async_test
async def test_a_promotion_that_finishes_after_its_version_was_deleted_is_not_cached() -> None:
    tiers = Tiers()
    tiers.device_gate = threading.Event()
    cache = tiers.cache(host_max_bytes=100)
    tiers.device_gate.set()
    await cache.get(A)
    cache.demote(A)
    await cache.close()
    tiers.device_gate.clear()
    promoting = asyncio.ensure_future(cache.get(A))
    await wait_until(lambda: tiers.to_device_calls == 1)
    cache.drop(A)  # heard while the host-to-device copy runs
    tiers.device_gate.set()
    assert (await promoting).where == "device"
    assert cache.location(A) == "store" and cache.peek(A) is None and cache.stats.bytes == 0
    assert cache.stats.promotions == 0


@async_test
async def test_tiers_in_one_memory_move_tasks_at_once_without_copies() -> None:
    """Serving on the CPU (no copy functions): eviction puts a task in the host tier in the same
    step, and a promotion hands the same object back, with no thread and no store read."""
    tiers = Tiers()
    cache = TaskCache(tiers.load, 100, host_max_bytes=100)
    first = await cache.get(A)
    await cache.get(B)
    await cache.get(C)  # A leaves the device
    assert cache.location(A) == "host" and cache.host_keys() == [A]  # no copy in flight
    back = await cache.get(A)  # B goes to host
    assert back is first and cache.location(B) == "host" and tiers.loads == [A, B, C]
    stats = cache.stats
    assert (stats.promotions, stats.demotions, stats.evictions, stats.loads) == (1, 2, 2, 3)
    assert (stats.bytes, stats.host_bytes, stats.host_entries) == (80, 40, 1)


@async_test
async def test_drop_task_forgets_every_version_in_every_tier() -> None:
    tiers = Tiers()
    cache = tiers.cache(host_max_bytes=100)
    old, new = TaskKey("a", "v1"), TaskKey("a", "v2")
    await cache.get(old)
    cache.demote(old)
    await cache.close()
    await cache.get(new)
    assert (cache.location(old), cache.location(new)) == ("host", "device")
    cache.drop_task("a")
    assert (cache.location(old), cache.location(new)) == ("store", "store")
    assert (cache.stats.bytes, cache.stats.host_bytes) == (0, 0)


def test_engine_tasks_move_between_devices(tmp_path) -> None:
    from service.engine.backbone import load_backbone
    from service.engine.task import Task
    from tests.factories import publish, random_head, random_lora, save_tiny_backbone

    backbone = load_backbone(save_tiny_backbone("bert", tmp_path / "bb"), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    version = publish(tmp_path / "store", "t", {"lora": random_lora(backbone.info, g), "head": random_head(backbone.info, g)},
                      ["a", "b"], fingerprint=backbone.info.fingerprint)
    from service.engine.engine import Engine

    task: Task = Engine(backbone).load_task(tmp_path / "store" / "t" / version, TaskKey("t", version))
    moved = task.to("cpu")
    assert moved is not task and moved.key == task.key and moved.nbytes == task.nbytes
    for name, tensor in moved.weights["lora"].tensors().items():
        assert torch.equal(tensor, task.weights["lora"].tensors()[name]) and tensor.device.type == "cpu"
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        on_gpu = task.to("cuda")
        assert all(t.device.type == "cuda" for t in on_gpu.weights["head"].tensors().values())


@pytest.mark.gpu
@async_test
async def test_the_host_tier_round_trips_real_tasks_through_cpu_memory_on_gpu(tmp_path) -> None:
    """On a GPU the host tier really moves weights: evicted tasks become CPU tensors and come
    back to the GPU answering exactly as before."""
    from service.engine.backbone import load_backbone
    from service.engine.engine import Engine
    from service.engine.types import ClassifyItem
    from tests.factories import publish, random_head, random_lora, save_tiny_backbone

    engine = Engine(load_backbone(save_tiny_backbone("bert", tmp_path / "bb"), device="cuda", dtype="float32"))
    info = engine.backbone.info
    g = torch.Generator().manual_seed(0)
    keys = []
    for name in ("a", "b"):
        version = publish(tmp_path / "store", name, {"lora": random_lora(info, g), "head": random_head(info, g)},
                          ["x", "y"], fingerprint=info.fingerprint)
        keys.append(TaskKey(name, version))

    def load(key: TaskKey):
        return engine.load_task(tmp_path / "store" / key.name / key.version, key)

    size = load(keys[0]).nbytes
    cache = TaskCache(load, size, host_max_bytes=10 * size, to_host=lambda t: t.to("cpu"),
                      to_device=lambda t: t.to(engine.backbone.device))
    first = await cache.get(keys[0])
    before = engine.classify([ClassifyItem(first, "great fun")])[0]
    await cache.get(keys[1])  # only one fits on the device: a goes to host memory
    await cache.close()
    host = cache.peek(keys[0])
    assert cache.location(keys[0]) == "host"
    assert all(t.device.type == "cpu" for w in host.weights.values() for t in w.tensors().values())
    back = await cache.get(keys[0])
    assert cache.stats.promotions == 1 and cache.stats.loads == 2
    assert all(t.device.type == "cuda" for w in back.weights.values() for t in w.tensors().values())
    after = engine.classify([ClassifyItem(back, "great fun")])[0]
    assert after.label == before.label and after.scores == pytest.approx(before.scores, abs=1e-6)
