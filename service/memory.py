"""Keeping a long-running replica's memory flat.

Two things grow a CPython + torch server's footprint that no cache budget sees:

* **Freed heap the allocator keeps.** Every batch allocates activations whose sizes change with the
  batch's rows and lengths (packed positions, per-span deltas). glibc's malloc serves the big ones
  from its arenas and, once freed, keeps those pages mapped for reuse; with sizes that never repeat
  exactly, the free holes fragment and RSS creeps up batch after batch (measured with
  `python -m bench.chaos`: +31-52 MiB over 10 minutes with a 24 MiB cache budget; with
  `MALLOC_MMAP_THRESHOLD_=131072`, which sends those allocations to mmap and back to the OS on
  free, it stayed flat). `malloc_trim(0)` hands the free pages of every arena back to the kernel
  (madvise) without moving anything, so `Trimmer` calls it from the forward thread at most once
  every `interval_s` seconds, after a batch: a few milliseconds on one batch in that many seconds,
  instead of an mmap + page faults on every large allocation of every batch.
* **The startup heap in every full GC pass.** Importing torch and transformers and loading the
  backbone leave hundreds of thousands of long-lived objects; CPython's oldest-generation
  collection walks all of them, on whichever thread triggers it, holding the GIL (the event loop
  and the forward thread both stall). `freeze_startup_heap` (called by `adaptserve serve` before
  the server starts) moves them to the permanent generation, so later collections only walk what
  serving allocated. It runs again once the server is ready (`state.on_ready`), for what start-up
  made after the first freeze (the backbone, its tokenizer, the warm-up).
* **Full collections at busy moments.** CPython runs an oldest-generation pass when enough
  objects have moved there since the last one: under load, every 5-15 s per replica, 20-50 ms
  with the GIL held, on whatever thread tripped it. A pass that lands mid-forward stops the
  forward and the event loop, so the rows that arrive meanwhile pile up behind it and ride the
  next, longer forward: the slowest requests of a load test (`bench/chaos.py`). `FullCollections`
  (installed by `adaptserve serve`, every `gc_full_interval_s`) turns CPython's own full passes
  off and runs them from the forward thread when it finds no rows waiting, or after four
  intervals without such a moment. The young generations keep CPython's schedule, and they
  collect almost all of serving's cyclic garbage.

All are no-ops where they do not apply (another libc; `interval_s` 0).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on another C library (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class Trimmer:
    """`trimmer.wrap(fn)` calls fn, then returns freed heap to the OS if `interval_s` has passed
    since the last trim. Thread-safe; `trims` counts the trims done."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._trim = _malloc_trim() if interval_s > 0 else None
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()
        self.trims = 0

    @property
    def active(self) -> bool:
        return self._trim is not None

    def maybe_trim(self) -> bool:
        if self._trim is None:
            return False
        now = self._clock()
        with self._lock:
            if now - self._last < self.interval_s:
                return False
            self._last = now
        self._trim(0)
        self.trims += 1
        return True

    def wrap(self, fn: Callable[..., R]) -> Callable[..., R]:
        if self._trim is None:
            return fn

        def trimmed(*args, **kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            finally:
                self.maybe_trim()

        return trimmed


class FullCollections:
    """Full garbage-collection passes when the forward thread is idle (module docstring).
    `install()` turns CPython's own full passes off (process-wide: `adaptserve serve` calls it,
    tests that build apps in one process do not); until then `between_batches` does nothing."""

    OFF = 2**31 - 1  # a gen-2 threshold CPython's count of gen-1 passes never reaches

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last = clock()
        self._installed = False
        self.collections = 0

    def install(self) -> None:
        if self.interval_s > 0:
            young, older, _ = gc.get_threshold()
            gc.set_threshold(young, older, self.OFF)
            self._installed = True

    def between_batches(self, idle: bool) -> bool:
        """Called by the forward thread before it takes its next batch; `idle`: no rows waiting.
        Returns whether it ran a full pass."""
        if not self._installed:
            return False
        now = self._clock()
        since = now - self._last
        if since < self.interval_s or (not idle and since < 4 * self.interval_s):
            return False
        self._last = now
        gc.collect()
        self.collections += 1
        return True


def freeze_startup_heap() -> int:
    """Collect, then move every object alive now out of the collector's reach (`gc.freeze`).
    Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d startup objects out of the garbage collector's passes", frozen)
    return frozen


def memory_limit_bytes() -> int | None:
    """The most memory this process can have: the cgroup's limit in a container (v2 or v1), else
    the machine's physical memory; None where neither can be read."""
    physical = None
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (physical is None or int(text) < physical):  # "max" or a huge v1 value: no limit
            return int(text)
    return physical


def check_cache_budget(device_bytes: int, host_bytes: int, on_cpu: bool, limit: int | None,
                       flags: Mapping[str, str] | None = None) -> str | None:
    """A warning when the task cache's tiers may hold more than the process can have (`limit`):
    on a CPU both tiers are host memory, and so are the methods' slot pools, which hold up to the
    device tier's budget again (`slots.configure`). None when they fit, or the limit is unknown.
    `flags`: the settings the command line set (field -> flag), named so; the others by their
    variable."""
    from service.settings import setting_name

    need = 2 * device_bytes + host_bytes if on_cpu else host_bytes
    if limit is None or need <= limit:
        return None
    host = setting_name("cache_host_max_bytes", flags)
    tiers = (f"2 x {setting_name('cache_max_bytes', flags)} + {host}: on a CPU both tiers are host memory, "
             "and the slot pools hold up to the device tier's budget again" if on_cpu else host)
    return (f"the task cache may grow to {need / 2**20:,.0f} MiB ({tiers}), more than the {limit / 2**20:,.0f} MiB "
            "this process can have: a full cache would be killed for memory; lower the budget")



def device_free_bytes(device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device's memory now, None for any other device."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def check_device_budget(device_bytes: int, free: int, total: int, device: str,
                        setting: str = "ADAPTSERVE_CACHE_MAX_BYTES") -> str | None:
    """A warning when the device tier and the methods' slot pools (one more cap of the same
    size, `service.methods.slots.configure`) may need more device memory than is free once the
    backbone is loaded. None when they fit. Past that, loads and promotions fail for memory:
    the tasks they were for get a 503 while the cache, counting bytes, still sees room.
    `setting`: the device budget's name as it was given (its flag or its variable)."""
    need = 2 * device_bytes
    if need <= free:
        return None
    return (f"the task cache's device tier ({setting}, {device_bytes / 2**20:,.0f} MiB) and the slot pools, which "
            f"share a cap of the same size, may need {need / 2**20:,.0f} MiB of {device} memory, but "
            f"{free / 2**20:,.0f} MiB of its {total / 2**20:,.0f} MiB are free with the backbone loaded: loads "
            "would fail for memory before the cache evicts; lower the budget")
