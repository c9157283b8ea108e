"""Per-row task slots: stack the weights of the tasks in a batch into one table per tensor.

Slot 0 of every table is all zeros and stands for "this row's task has no weights here", so a
batched op over the table is a no-op for those rows. Tensors of different sizes (LoRA ranks,
adapter bottlenecks) are zero-padded to the largest in the batch, which leaves the products
unchanged because the padded rows and columns meet zeros on the other side.
"""
from __future__ import annotations

import math
import threading
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SlotTable:
    tables: tuple[Tensor, ...]  # each [S, *max_shape]; slot 0 is zeros
    slot: Tensor  # [B] slot of each row
    single: bool  # every row uses slot 1 (one task): callers may skip the gather

    def rows(self, i: int) -> Tensor:
        """Table i gathered per row: [B, *shape]."""
        return self.tables[i].index_select(0, self.slot)

    def select(self, rows: Tensor) -> "SlotTable":
        slot = self.slot.index_select(0, rows)
        return SlotTable(self.tables, slot, self.tables[0].shape[0] == 2 and bool((slot == 1).all()))


def build(per_part: Sequence[tuple[Tensor, ...] | None], row_part: Tensor) -> SlotTable | None:
    """per_part[j]: task j's tensors (same count and rank for every task) or None."""
    present = [(j, ts) for j, ts in enumerate(per_part) if ts is not None]
    if not present:
        return None
    n = len(present[0][1])
    tables = []
    for i in range(n):
        shape = [max(ts[i].shape[d] for _, ts in present) for d in range(present[0][1][i].dim())]
        ref = present[0][1][i]
        padded = [ref.new_zeros(shape)]
        for _, ts in present:
            t = ts[i]
            pad = []
            for d in reversed(range(t.dim())):
                pad += [0, shape[d] - t.shape[d]]
            padded.append(F.pad(t, pad) if any(pad) else t)
        tables.append(torch.stack(padded))
    # Built on the device from row_part, never read back: the trainer builds a table per (layer,
    # site) per batch, and a host copy or a check of the result there would wait for the GPU each time.
    if len(per_part) == 1:  # one task in the batch (every trainer batch): every row is slot 1
        return SlotTable(tuple(tables), torch.ones_like(row_part), True)
    slot = torch.zeros_like(row_part)
    for s, (j, _) in enumerate(present, start=1):
        slot.masked_fill_(row_part == j, s)
    return SlotTable(tuple(tables), slot, False)  # the per-row path: right for any mix of parts


def linear(x: Tensor, table: SlotTable, w: int, b: int | None = None) -> Tensor:
    """Per-row linear map y_b = x_b W[slot_b]^T (+ bias[slot_b]); x [B, T, in] -> [B, T, out]."""
    if table.single:
        y = x @ table.tables[w][1].T
        return y if b is None else y + table.tables[b][1]
    y = torch.bmm(x, table.rows(w).transpose(1, 2))
    return y if b is None else y + table.rows(b).unsqueeze(1)


# -- persistent device slots ---------------------------------------------------------------------
# `build` above stacks every task's tensors again for every batch: right for training (the tables
# must carry gradients back to the task tensors) but, at serving time, thousands of copies per
# forward for a 32-task batch. A `SlotPool` instead writes each task's tensors once into persistent
# device tables (as vLLM's LoRA slots do); a batch then only maps its rows to slots and gathers.

Key = Hashable
Entries = Mapping[Key, tuple[Tensor, ...]]
Layout = frozenset[tuple[Key, tuple[torch.Size, ...]]]  # a task's (key, tensor shapes) pairs


class Budget:
    """One byte cap shared by every pool on it (all the methods' pools share `BUDGET`): a pool's
    tables may grow (in slots or in width) only while the pools together stay within `max_bytes`
    (None: no cap).

    Each pool keeps its own tables and evicts its own slots; the budget tells it how many bytes the
    other pools hold and, when that leaves it short, lets it `claim` up to a fair share: the cap
    split evenly among the pools holding tables. A pool over its share then gives back (evicting
    its least recently batched slots and rebuilding its tables smaller), so one method's pool that
    filled the cap in a burst does not leave another's to evict on every new task. Two pools growing
    at once in two threads could each count the other's size from before; serving runs one forward
    at a time, so that does not arise there (and a pool busy in another thread is not asked)."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self._pools: weakref.WeakSet[SlotPool] = weakref.WeakSet()

    def join(self, pool: "SlotPool") -> None:
        self._pools.add(pool)

    def nbytes(self) -> int:
        """Bytes of every pool's tables."""
        return sum(p.nbytes() for p in list(self._pools))

    def room(self, pool: "SlotPool") -> int | None:
        """Bytes `pool`'s tables may take: the cap less what the other pools hold (None: no cap)."""
        if self.max_bytes is None:
            return None
        return self.max_bytes - sum(p.nbytes() for p in list(self._pools) if p is not pool)

    def claim(self, pool: "SlotPool", want: int) -> int | None:
        """`room(pool)`, after asking the other pools to give back what `pool` lacks of `want` bytes,
        up to its fair share: the pools over their share give back (down to it, the largest first),
        and every pool asked first drops the slots of tasks since collected."""
        room = self.room(pool)
        if room is None or want <= room:
            return room
        others = sorted((p for p in list(self._pools) if p is not pool and p.nbytes()), key=SlotPool.nbytes, reverse=True)
        share = self.max_bytes // (len(others) + 1)  # type: ignore[operator]
        short = min(want, share) - room
        for p in others:
            if short <= 0:
                break
            before = p.nbytes()
            p.give_back(max(share, before - short) if before > share else None)
            short -= before - p.nbytes()
        return self.room(pool)


# The service's budget, set from the cache's device budget by `configure`.
BUDGET = Budget()


# Per-row work on packed positions can run as one small matmul per span of rows sharing a task
# (no padded copies: the SGMV idea) or as one padded bmm over every row (unpack, bmm, pack). On
# CPU, measured on MiniLM (bench/engine_methods.py, bench/engine_lora.py): spans win when few rows
# of the batch use the method (8 LoRA rows of 32: the mixed batch went from 0.66x to 0.73x of
# base) and for the wide FFN linears (LoRA on all six sites: 0.49x -> 0.81x); the bmm wins when
# every row takes part in the attention-block sites (32 LoRA q,v rows: 0.95x vs 0.85x). On a GPU
# the many small matmuls cost more launches than the padded copies: always the bmm.
SPAN_MAX_SHARE = 0.5


def spans(device: torch.device) -> bool:
    """Whether this device runs per-row work as per-span matmuls at all (CPU) or never (GPU)."""
    return device.type == "cpu"


def use_spans(device: torch.device, rows_using: int, rows: int, wide: bool = False) -> bool:
    """Spans for this site: on CPU, for wide linears, or when at most SPAN_MAX_SHARE of the rows
    use the method there."""
    return spans(device) and (wide or rows_using <= SPAN_MAX_SHARE * rows)


def to_device(values: Sequence, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A host list as a tensor on `device`, without waiting for the device. A blocking copy from
    host memory (what `torch.tensor(values, device="cuda")` does) first drains every kernel queued
    before it; a non-blocking one from pageable memory is staged by the driver at once, so the
    list may go right after."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def poolable(parts: Sequence[object | None]) -> bool:
    """Serving weights go through the pool; weights that train (leaf tensors collecting gradients)
    must not, since a copy in a table would neither see optimizer steps nor pass gradients back."""
    for p in parts:
        if p is None:
            continue
        for t in p.tensors().values():  # type: ignore[attr-defined]
            if t.requires_grad:
                return False
    return torch.is_inference_mode_enabled() or not torch.is_grad_enabled()


class SlotPool:
    """Device tables of one method: for each key (e.g. a layer and site), tensor i of every pooled
    task sits at its slot of table i, zero-padded to the largest shape any task has there.

    `entries(weights)` says what a task contributes: key -> tensors in the layout the batched op
    reads (transposed, scaled, ...). A task gets its slot the first time a batch uses it. A slot is
    given back when the weights object is garbage-collected (the task cache dropped it and no batch
    holds it) or, once the pools on its `Budget` together reach the cap, when a batch needs room:
    the least recently batched slot of this pool that no batch in flight uses is evicted (its task
    is written again if it comes back). Slot 0 is all zeros in every table: rows whose task has
    nothing at a key read zeros, so batched ops leave them unchanged; a reused slot is zeroed first.

    Tables are rebuilt smaller (fewer slots, narrower) when collected tasks leave them at most a
    quarter used, when a widening would pass the cap, and when another pool claims its share. A
    rebuild makes new tensors and renumbers the pooled tasks' slots: batches in flight keep reading
    the tables and slots they took, which nothing writes again.
    """

    def __init__(self, entries: Callable[[Any], Entries], budget: Budget | None = None):
        """`budget`: the byte cap this pool shares (default `BUDGET`, the service's). A batch that
        needs more slots than fit still gets them."""
        self._entries = entries
        self._budget = BUDGET if budget is None else budget
        self._budget.join(self)
        self._bytes = 0  # of the tables, kept up to date under the lock: other pools read it
        self._lock = threading.Lock()
        self._slot: dict[int, int] = {}  # id(weights) -> slot
        self._owner: dict[int, int] = {}  # slot -> id(weights)
        # slot -> its (key, tensor shapes) pairs; hashable, so tasks of one layout count once per batch
        self._layout: dict[int, Layout] = {}
        self._layouts: Counter[Layout] = Counter()  # slots per layout: the widths the pooled tasks need
        self._lru: OrderedDict[int, None] = OrderedDict()  # slots in use, least recently batched first
        self._pins: Counter[int] = Counter()  # id(weights) -> batches in flight using its slot
        self._released: deque[int] = deque()  # id(weights) of collected weights
        self._unpinned: deque[frozenset[int]] = deque()  # the weights of finished batches
        self._free: list[int] = []
        self._next = 1
        self._capacity = 0  # slots per table, slot 0 included
        self._tables: dict[Key, tuple[Tensor, ...]] = {}
        self.evictions = 0

    def __len__(self) -> int:
        """Slots in use."""
        return len(self._slot)

    def nbytes(self) -> int:
        """Bytes of this pool's tables."""
        return self._bytes

    def gather(self, parts: Sequence[Any | None], row_part: Tensor) -> "PoolRows":
        """Slots for this batch's tasks (writing any task not yet pooled), as per-row indices. The
        slots stay pinned (not evictable) while the returned rows, or any selection of them, live."""
        # Tables are inference tensors, written only in inference mode (whatever mode the caller
        # is in: serving uses inference_mode, evaluation no_grad); reading them is fine in both.
        with self._lock, torch.inference_mode():
            self._reclaim()
            batch: set[int] = set()  # id(weights) of this batch's tasks: a later task's room never takes theirs
            for p in parts:
                if p is None:
                    continue
                s = self._slot.get(id(p))
                if s is None:
                    s = self._add(p, batch)
                self._lru.move_to_end(s)
                batch.add(id(p))
            # read after every task is in: making room for a later one may have renumbered the slots
            part_slot = [0 if p is None else self._slot[id(p)] for p in parts]
            pin = _Pin()
            self._pins.update(batch)
            weakref.finalize(pin, self._unpinned.append, frozenset(batch))
            layouts = {self._layout[s] for s in part_slot if s}  # tasks of the same method settings (most) count once
            tables = dict(self._tables)  # a snapshot: growth later replaces tables, never edits these
        slot = to_device(part_slot, row_part.device).index_select(0, row_part)  # [B]
        # per key, the largest shape among this batch's tasks: tables are sliced to it, so one
        # large-rank task elsewhere in the pool costs this batch nothing
        views = {key: tuple(t[(slice(None), *(slice(0, n) for n in w))] for t, w in zip(tables[key], ws))
                 for key, ws in _widest(layouts).items()}
        single = len({x for x in part_slot if x}) == 1 and all(part_slot)
        return PoolRows(views, slot, single, part_slot[0] if single else 0, pin)

    def give_back(self, max_bytes: int | None) -> None:
        """Drop the slots of collected tasks, then (`max_bytes` set) rebuild the tables within
        `max_bytes` as far as the slots no batch in flight uses allow: another pool on the budget
        claims room. Nothing is done while this pool is busy in another thread."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            with torch.inference_mode():
                self._reclaim()
                if max_bytes is not None and self._bytes > max_bytes:
                    self._fit_within(max_bytes, None, set())
        finally:
            self._lock.release()

    # -- under the lock --------------------------------------------------------------------------
    def _add(self, weights: Any, batch: set[int]) -> int:
        entries = self._entries(weights)
        need = sum(t.numel() * t.element_size() for ts in entries.values() for t in ts)  # one slot, this task alone
        if self._capacity:  # before the slot is taken: a widening within the cap may rebuild the tables
            self._widen(entries, batch)
        s = self._free.pop() if self._free else self._room(batch, need)
        layout = _layout(entries)
        self._layout[s] = layout
        self._layouts[layout] += 1
        self._lru[s] = None
        self._slot[id(weights)] = s
        self._owner[s] = id(weights)
        try:
            for key, ts in entries.items():
                self._fit(key, ts)
                for table, t in zip(self._tables[key], ts):
                    table[(s, *(slice(0, n) for n in t.shape))] = t
        except BaseException:  # e.g. out of device memory while growing: free (and zero) the slot
            self._release(s)
            raise
        weakref.finalize(weights, self._released.append, id(weights))
        return s

    def _room(self, batch: set[int], need: int) -> int:
        """A slot for a new task (`need`: its bytes in one slot): a new one while the byte cap
        allows (claiming up to a fair share from the other pools), else the least recently batched
        slot no batch in flight uses, else (everything pinned) a new one anyway."""
        if self._next >= self._capacity and self._tables:
            per = self._slot_bytes(need)
            room = self._budget.claim(self, 2 * self._capacity * per)  # what doubling takes
            if room is not None and (self._capacity + 1) * per > room:  # not one more slot fits
                victim = self._victim(batch)
                if victim is not None:
                    self._evict(victim)
                    return self._free.pop()
        return self._grab(need)

    def _widen(self, entries: Entries, batch: set[int]) -> None:
        """Make the tables as wide as a task of `entries` needs (a larger rank, a key they lack),
        held to the byte cap as growth is: when the widened tables would not fit (after claiming a
        fair share), the least recently batched slots no batch in flight uses are evicted and the
        tables rebuilt to the slots that fit (those in use stay, even past the cap)."""
        widths = {key: [list(c.shape[1:]) for c in cur] for key, cur in self._tables.items()}
        wider = False
        for key, ts in entries.items():
            w = widths.setdefault(key, [[0] * t.dim() for t in ts])
            for wi, t in zip(w, ts):
                wider |= any(n > c for n, c in zip(t.shape, wi))
                wi[:] = [max(c, n) for c, n in zip(wi, t.shape)]
        if not wider:
            return
        want = self._capacity * self._per_slot(widths, entries)
        room = self._budget.claim(self, want)
        if room is not None and want > room:
            self._fit_within(room, entries, batch)
        for key, ts in entries.items():
            self._fit(key, ts)

    def _fit_within(self, max_bytes: int, entries: Entries | None, batch: set[int]) -> None:
        """Rebuild the tables in at most `max_bytes`, as wide as the pooled tasks (and a task of
        `entries` about to be) need: the least recently batched slots that neither `batch` nor a
        batch in flight uses are evicted until the rest fit."""
        held = 1 if entries is None else 2  # slot 0, and the slot of the task about to be pooled
        extra = () if entries is None else (_layout(entries),)
        while True:
            widths = _widest((*self._layouts, *extra))
            fits = max_bytes // self._per_slot(widths, entries)
            victim = self._victim(batch) if len(self._lru) + held > fits else None
            if victim is None:
                break
            self._evict(victim)
        self._compact(max(len(self._lru) + held, min(fits, self._capacity)), widths)

    def _compact(self, capacity: int, widths: dict[Key, list[list[int]]]) -> None:
        """New tables of `capacity` slots and `widths` (keys left out are dropped; `_fit` makes a
        missing one), the pooled tasks moved to slots 1, 2, ... in LRU order."""
        capacity = capacity if widths else 0  # no task, nothing to hold: the next one starts afresh
        order = list(self._lru)
        moved = {s: i for i, s in enumerate(order, start=1)}
        tables: dict[Key, tuple[Tensor, ...]] = {}
        for key, ws in widths.items():
            cur = self._tables.get(key)
            if cur is None or not capacity:
                continue
            keep = to_device([0, *order], cur[0].device, torch.long)
            new = []
            for t, w in zip(cur, ws):
                out = t.new_zeros((capacity, *w))
                corner = tuple(slice(0, min(a, b)) for a, b in zip(w, t.shape[1:]))
                out[(slice(0, len(order) + 1), *corner)] = t.index_select(0, keep)[(slice(None), *corner)]
                new.append(out)
            tables[key] = tuple(new)
        self._tables = tables
        self._owner = {moved[s]: o for s, o in self._owner.items()}
        self._slot = {o: s for s, o in self._owner.items()}
        self._layout = {moved[s]: layout for s, layout in self._layout.items()}
        self._lru = OrderedDict((moved[s], None) for s in order)
        self._free = []
        self._next = len(order) + 1
        self._capacity = capacity
        self._measure()

    def _victim(self, batch: set[int]) -> int | None:
        """The least recently batched slot that neither `batch` nor a batch in flight uses."""
        return next((s for s in self._lru if self._owner[s] not in batch and not self._pins[self._owner[s]]), None)

    def _evict(self, s: int) -> None:
        self._release(s)
        self.evictions += 1

    def _per_slot(self, widths: dict[Key, list[list[int]]], entries: Entries | None = None) -> int:
        """Bytes of one slot of tables of `widths` (in the dtypes of the tables, or of `entries`
        for a key the tables lack)."""
        total = 0
        for key, ws in widths.items():
            like = self._tables[key] if key in self._tables else entries[key]  # type: ignore[index]
            total += sum(math.prod(w) * t.element_size() for w, t in zip(ws, like))
        return max(1, total)

    def _slot_bytes(self, need: int) -> int:
        """Bytes of one slot across every table once a task of `need` bytes is in (at least)."""
        return max(1, need, sum(math.prod(t.shape[1:]) * t.element_size() for ts in self._tables.values() for t in ts))

    def _grab(self, need: int) -> int:
        s = self._next
        self._next += 1
        if s >= self._capacity:  # double every table, within the byte cap (but always to hold slot s)
            cap = max(8, 2 * self._capacity)
            room = self._budget.claim(self, cap * self._slot_bytes(need))
            if room is not None:  # a task near the cap in size gets slot 0 and itself, not 8 slots
                cap = max(s + 1, min(cap, room // self._slot_bytes(need)))
            for key, ts in self._tables.items():
                self._tables[key] = tuple(_resized(t, (cap, *t.shape[1:])) for t in ts)
            self._capacity = cap
            self._measure()
        return s

    def _fit(self, key: Key, ts: tuple[Tensor, ...]) -> None:
        """Make the tables of `key` exist and be at least as large as `ts` in every dimension."""
        cur = self._tables.get(key)
        if cur is None:  # `_grab` sized the capacity already (the first task's slot comes from it)
            self._tables[key] = tuple(t.new_zeros((self._capacity, *t.shape)) for t in ts)
        elif any(t.shape[d] > c.shape[d + 1] for t, c in zip(ts, cur) for d in range(t.dim())):
            self._tables[key] = tuple(
                _resized(c, (c.shape[0], *(max(a, b) for a, b in zip(c.shape[1:], t.shape)))) for c, t in zip(cur, ts)
            )
        else:
            return
        self._measure()

    def _measure(self) -> None:
        self._bytes = sum(t.numel() * t.element_size() for ts in self._tables.values() for t in ts)

    def _release(self, s: int) -> None:
        """Forget slot s's task, zero its entries (a reused slot must not leak them), free it."""
        owner = self._owner.pop(s, None)
        if owner is not None and self._slot.get(owner) == s:
            del self._slot[owner]
        layout = self._layout.pop(s, None)
        if layout is not None:
            _drop(self._layouts, layout)
            for key, _ in layout:
                for table in self._tables.get(key, ()):
                    table[s].zero_()
        self._lru.pop(s, None)
        self._free.append(s)

    def _reclaim(self) -> None:
        while self._unpinned:
            for owner in self._unpinned.popleft():
                _drop(self._pins, owner)
        released = False
        while self._released:
            s = self._slot.get(self._released.popleft())
            if s is not None:  # not evicted meanwhile
                self._release(s)
                released = True
        if released:
            self._shrink()

    def _shrink(self) -> None:
        """Give memory back once the pooled tasks would fit in a quarter of the tables: rebuild them
        to twice the slots in use, as wide as those tasks need (no task left: no tables). Only when
        tasks were collected, so a batch pays nothing for it; halving the slots at most every time
        they halve twice leaves room to grow back before the next rebuild."""
        widths = _widest(self._layouts)
        capacity = 2 * (len(self._lru) + 1) if self._lru else 0
        if 4 * capacity * self._per_slot(widths) <= self._bytes:
            self._compact(capacity, widths)


class _Pin:
    """Held by a batch's PoolRows and every selection of them: while any lives, its slots stay."""


def _layout(entries: Entries) -> Layout:
    return frozenset((key, tuple(t.shape for t in ts)) for key, ts in entries.items())


def _widest(layouts: Iterable[Layout]) -> dict[Key, list[list[int]]]:
    """Per key, the largest shape of each tensor among `layouts`, dimension by dimension."""
    widest: dict[Key, list[list[int]]] = {}
    for layout in layouts:
        for key, sh in layout:
            w = widest.get(key)
            if w is None:
                widest[key] = [list(x) for x in sh]
            else:
                for wi, si in zip(w, sh):
                    wi[:] = [max(a, b) for a, b in zip(wi, si)]
    return widest


def _drop(counts: Counter, key: Hashable) -> None:
    """One fewer of `key`, forgotten at zero (the counts stay as many as the keys in use)."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


def configure(max_bytes: int | None) -> None:
    """Cap the methods' pools together at `max_bytes` of tables (the service passes its device-tier
    cache budget: the pools then hold at most about as much as the cache, padded)."""
    BUDGET.max_bytes = max_bytes


def pool_bytes() -> int:
    """Bytes the methods' pools hold now (the `adaptserve_slot_pool_bytes` gauge)."""
    return BUDGET.nbytes()


def _resized(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A zero tensor of `shape` holding `t` in its leading corner."""
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


@dataclass(frozen=True)
class PoolRows:
    """One batch's view of a pool: per key the tables sliced to the batch's widest task, and the
    slot of every row."""

    views: dict[Key, tuple[Tensor, ...]]
    slot: Tensor  # [B]
    single: bool  # every row has the same (pooled) task: callers may skip the gather
    only: int  # that task's slot when single, else 0
    pin: _Pin | None = None  # keeps this batch's slots from eviction while the rows live

    def has(self, key: Key) -> bool:
        return key in self.views

    @cached_property
    def host_slots(self) -> list[int]:
        """Per-row slots as a host list (one device sync per batch, for span loops)."""
        return self.slot.tolist()

    def use_spans(self, device: torch.device, wide: bool = False) -> bool:
        """`use_spans` for this batch's rows: how many of them have a slot here."""
        if not spans(device):
            return False
        return use_spans(device, sum(1 for s in self.host_slots if s), len(self.host_slots), wide)

    def rows(self, key: Key, i: int) -> Tensor:
        """Table i of `key`, gathered per row: [B, *shape]."""
        return self.views[key][i].index_select(0, self.slot)

    def one(self, key: Key, i: int) -> Tensor:
        """Table i of `key` for the single task of the batch: [*shape]."""
        return self.views[key][i][self.only]

    def select(self, rows: Tensor) -> "PoolRows":
        slot = self.slot.index_select(0, rows)
        return PoolRows(self.views, slot, self.single, self.only, self.pin)


class OneKey:
    """Pool rows of a method with a single key per backbone (prefixes, soft prompts), behind the
    same `rows(i)` / `select` calls as a per-batch `SlotTable`."""

    def __init__(self, rows: PoolRows):
        self.pool_rows = rows
        (self.key,) = rows.views

    def rows(self, i: int) -> Tensor:
        return self.pool_rows.rows(self.key, i)

    def select(self, rows: Tensor) -> "OneKey":
        return OneKey(self.pool_rows.select(rows))
