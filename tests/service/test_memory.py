"""Returning freed heap to the OS (`Trimmer`) and freezing the startup heap out of the GC."""
from __future__ import annotations

import ctypes
import gc
import logging
import os

import pytest
import torch
from fastapi.testclient import TestClient

from service.memory import (FullCollections, Trimmer, _malloc_trim, check_cache_budget, check_device_budget, freeze_startup_heap,
                            memory_limit_bytes)

GLIBC = _malloc_trim() is not None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_disabled_trimmer_returns_the_function_itself() -> None:
    def f(x: int) -> int:
        return x + 1

    trimmer = Trimmer(0.0)
    assert not trimmer.active
    assert trimmer.wrap(f) is f
    assert trimmer.maybe_trim() is False


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trims_at_most_once_per_interval_and_after_failures_too() -> None:
    clock = Clock()
    trimmer = Trimmer(5.0, clock=clock)
    calls = []

    def classify(items):
        calls.append(items)
        if items == "bad":
            raise ValueError("bad batch")
        return len(items)

    wrapped = trimmer.wrap(classify)
    assert wrapped("ab") == 2 and trimmer.trims == 0  # 0 s since start
    clock.now = 4.9
    wrapped("abc")
    assert trimmer.trims == 0
    clock.now = 5.0
    wrapped("abc")
    assert trimmer.trims == 1
    clock.now = 7.0
    wrapped("a")
    assert trimmer.trims == 1  # 2 s since the last trim
    clock.now = 10.5
    with pytest.raises(ValueError, match="bad batch"):
        wrapped("bad")
    assert trimmer.trims == 2  # the batch failed; the trim still ran, and the error passes through
    assert calls == ["ab", "abc", "abc", "a", "bad"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not GLIBC or not os.path.exists("/proc/self/statm"), reason="glibc on Linux")
def test_a_trim_gives_fragmented_free_heap_back_to_the_os() -> None:
    """The case serving creates: freed blocks below one still in use stay mapped (glibc trims only
    the top of the heap by itself) until malloc_trim hands their pages back."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 96 * 1024, 320  # below the 128 KiB mmap threshold: served from the heap
    blocks = [libc.malloc(size) for _ in range(count)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, size)  # touch every page
    for b in blocks[:-1]:
        libc.free(b)  # the last block stays: the freed ones are a hole below it, not the heap's top
    before = _rss_bytes()
    trimmer = Trimmer(1e-9)
    assert trimmer.maybe_trim()
    released = before - _rss_bytes()
    libc.free(blocks[-1])
    assert released > 0.5 * size * (count - 1), f"only {released / 2**20:.1f} MiB of {size * count / 2**20:.0f} returned"


def test_full_collections_wait_for_an_idle_forward_thread_or_four_intervals() -> None:
    clock = Clock()
    pacer = FullCollections(10.0, clock=clock)
    before = gc.get_threshold()
    clock.now = 100.0
    assert pacer.between_batches(idle=True) is False  # not installed (a test's app): CPython's schedule
    try:
        pacer.install()
        assert gc.get_threshold() == (*before[:2], FullCollections.OFF)  # CPython's own full passes off
        passes = gc.get_stats()[2]["collections"]
        assert pacer.between_batches(idle=True) is True and pacer.collections == 1
        assert gc.get_stats()[2]["collections"] == passes + 1  # a real full pass
        clock.now = 109.0
        assert pacer.between_batches(idle=True) is False  # within the interval
        clock.now = 110.0
        assert pacer.between_batches(idle=False) is False  # rows waiting: not now
        assert pacer.between_batches(idle=True) is True
        clock.now = 149.0
        assert pacer.between_batches(idle=False) is False
        clock.now = 150.0
        assert pacer.between_batches(idle=False) is True  # never idle for four intervals: it runs anyway
        assert pacer.collections == 3
    finally:
        gc.set_threshold(*before)


def test_full_collections_off_leave_cpythons_schedule() -> None:
    before = gc.get_threshold()
    pacer = FullCollections(0.0)
    pacer.install()
    assert gc.get_threshold() == before
    assert pacer.between_batches(idle=True) is False


def test_freeze_moves_live_objects_out_of_collections() -> None:
    marker = [[i] for i in range(1000)]  # lists: tracked by the collector
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= len(marker)
        collectable = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
        assert not any(id(m) in collectable for m in marker)
    finally:
        gc.unfreeze()
    assert id(marker[0]) in {id(o) for o in gc.get_objects(2)}


def test_the_memory_limit_is_this_machines_or_its_containers() -> None:
    limit = memory_limit_bytes()
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert limit is not None and 0 < limit <= physical


MiB = 2**20


@pytest.mark.parametrize("device, host, on_cpu, fits", [
    (256 * MiB, 512 * MiB, True, True),  # both tiers and the pools (up to the device tier's budget) host memory: 1 GiB of 1 GiB
    (256 * MiB, 513 * MiB, True, False),
    (400 * MiB, 300 * MiB, True, False),  # the tiers alone would fit, not with the pools
    (10**30, 0, True, False),  # a typo'd budget
    (10**30, 512 * MiB, False, True),  # on a GPU the device tier is not host memory
    (0, 2 * 1024 * MiB, False, False),
])
def test_a_cache_budget_beyond_the_memory_limit_is_named(device: int, host: int, on_cpu: bool, fits: bool) -> None:
    warning = check_cache_budget(device, host, on_cpu, limit=1024 * MiB)
    assert (warning is None) == fits
    if not fits:
        assert "ADAPTSERVE_CACHE_HOST_MAX_BYTES" in warning and "1,024 MiB this process can have" in warning
        assert ("ADAPTSERVE_CACHE_MAX_BYTES" in warning) == on_cpu
    assert check_cache_budget(device, host, on_cpu, limit=None) is None  # unknown: nothing to say



@pytest.mark.parametrize("flags, device_name, host_name", [
    ({}, "ADAPTSERVE_CACHE_MAX_BYTES", "ADAPTSERVE_CACHE_HOST_MAX_BYTES"),
    ({"cache_max_bytes": "--cache-max-bytes"}, "--cache-max-bytes", "ADAPTSERVE_CACHE_HOST_MAX_BYTES"),
    ({"cache_max_bytes": "--cache-max-bytes", "cache_host_max_bytes": "--cache-host-max-bytes"},
     "--cache-max-bytes", "--cache-host-max-bytes"),
])
def test_the_cache_budget_warning_names_each_setting_as_given(flags: dict, device_name: str, host_name: str) -> None:
    warning = check_cache_budget(2048 * MiB, 0, True, limit=1024 * MiB, flags=flags)
    assert f"(2 x {device_name} + {host_name}: on a CPU both tiers are host memory, and the slot pools" in warning
    assert host_name in check_cache_budget(0, 2048 * MiB, False, limit=1024 * MiB, flags=flags)


def test_the_app_names_the_cache_budget_as_the_command_line_gave_it(
    tmp_path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`adaptserve serve --cache-max-bytes ...` hands its flags to the app, whose start-up warns."""
    import service.app
    from service.settings import Settings
    from tests.fakes import FakeEngine
    from tests.service.api.harness import wait_ready

    monkeypatch.setattr(service.app, "memory_limit_bytes", lambda: 1024 * MiB)
    app = service.app.create_app(Settings(store=tmp_path, cache_max_bytes=4096 * MiB), engine=FakeEngine(),
                                 flags={"cache_max_bytes": "--cache-max-bytes"})
    with caplog.at_level(logging.WARNING, logger="service"), TestClient(app) as client:
        wait_ready(client)
    assert "(2 x --cache-max-bytes + ADAPTSERVE_CACHE_HOST_MAX_BYTES: on a CPU both tiers are host memory" in caplog.text


@pytest.mark.parametrize("budget, free, fits", [
    (256 * MiB, 512 * MiB, True),  # the tier and the pools' cap: twice the budget
    (256 * MiB, 511 * MiB, False),
    (80 * 1024 * MiB, 70 * 1024 * MiB, False),  # a budget the size of the card
])
def test_a_device_budget_beyond_the_free_device_memory_is_named(budget: int, free: int, fits: bool) -> None:
    warning = check_device_budget(budget, free, 80 * 1024 * MiB, "cuda:0", "--cache-max-bytes")
    assert (warning is None) == fits
    if not fits:
        assert "--cache-max-bytes" in warning and "cuda:0" in warning
        assert f"{free / MiB:,.0f} MiB of its 81,920 MiB are free" in warning


def test_the_app_checks_the_device_budget_against_the_gpu_it_serves_on(
    tmp_path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No GPU here: the engine says it is on cuda:0 and the card's free memory is given; the GPU
    check itself (tests/engine/test_gpu.py) reads a real card."""
    import service.app
    from service.settings import Settings
    from tests.fakes import FakeEngine
    from tests.service.api.harness import wait_ready

    asked = []
    monkeypatch.setattr(service.app, "device_free_bytes", lambda d: asked.append(str(d)) or (300 * MiB, 1024 * MiB))
    for budget, warned in ((100 * MiB, False), (200 * MiB, True)):
        caplog.clear()
        engine = FakeEngine()
        engine.backbone.device = torch.device("cuda:0")
        app = service.app.create_app(Settings(store=tmp_path, cache_max_bytes=budget), engine=engine)
        with caplog.at_level(logging.WARNING, logger="service"), TestClient(app) as client:
            wait_ready(client)
        assert ("ADAPTSERVE_CACHE_MAX_BYTES, 200 MiB) and the slot pools" in caplog.text) == warned
    assert asked == ["cuda:0", "cuda:0"]


def test_the_app_calls_on_ready_once_and_paces_full_collections_between_batches(tmp_path) -> None:
    """What `adaptserve serve` sets on the state (the second freeze, the pacer) reaches the running
    app: on_ready once the engine is up, the pacer from the forward thread around each batch."""
    import service.app
    from service.settings import Settings
    from tests.fakes import FakeEngine, write_task
    from tests.service.api.harness import wait_ready

    write_task(tmp_path, "sentiment", "v1")
    app = service.app.create_app(Settings(store=tmp_path), engine=FakeEngine())
    state = app.state.service
    ready_calls: list[bool] = []
    state.on_ready = lambda: ready_calls.append(state.runtime is not None)
    pacer = FullCollections(30.0)
    calls: list[bool] = []
    pacer.between_batches = calls.append  # type: ignore[method-assign]  (the hook, not a collection)
    state.full_collections = pacer
    with TestClient(app) as client:
        wait_ready(client)
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["hello"]}).status_code == 200
    assert ready_calls == [True]  # once, with the runtime in place
    assert calls and calls[-1] is True  # between batches, and idle after the only one
