"""Per-row task slots: stack the weights of the tasks in a batch into one table per tensor.

Slot 0 of every table is all zeros and stands for "this row's task has no weights here", so a
batched op over the table is a no-op for those rows. Tensors of different sizes (LoRA ranks,
adapter bottlenecks) are zero-padded to the largest in the batch, which leaves the products
unchanged because the padded rows and columns meet zeros on the other side.
"""
from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence

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
    slot_of_part = torch.zeros(len(per_part), dtype=torch.long)
    for s, (j, _) in enumerate(present, start=1):
        slot_of_part[j] = s
    slot = slot_of_part.to(row_part.device).index_select(0, row_part)
    return SlotTable(tuple(tables), slot, len(present) == 1 and bool((slot == 1).all()))


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
    reads (transposed, scaled, ...). A task gets its slot the first time a batch uses it; the slot
    goes back to the free list when the weights object is garbage-collected, i.e. the task cache
    dropped it and no batch in flight holds it. Slot 0 is all zeros in every table: rows whose task
    has nothing at a key read zeros, so batched ops leave them unchanged.
    """

    def __init__(self, entries: Callable[[Any], Entries]):
        self._entries = entries
        self._lock = threading.Lock()
        self._slot: dict[int, int] = {}  # id(weights) -> slot
        self._shapes: dict[int, dict[Key, tuple[torch.Size, ...]]] = {}  # slot -> key -> tensor shapes
        self._released: deque[int] = deque()  # slots of collected weights (appended by finalizers)
        self._free: list[int] = []
        self._next = 1
        self._capacity = 0  # slots per table, slot 0 included
        self._tables: dict[Key, tuple[Tensor, ...]] = {}

    def __len__(self) -> int:
        """Slots in use."""
        return len(self._slot)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._tables.values() for t in ts)

    def gather(self, parts: Sequence[Any | None], row_part: Tensor) -> "PoolRows":
        """Slots for this batch's tasks (writing any task not yet pooled), as per-row indices."""
        with self._lock:
            self._reclaim()
            part_slot = [0 if p is None else self._slot.get(id(p)) or self._add(p) for p in parts]
            shapes = [self._shapes[s] if s else {} for s in part_slot]
            tables = dict(self._tables)  # a snapshot: growth later replaces tables, never edits these
        slot = torch.tensor(part_slot, device=row_part.device).index_select(0, row_part)  # [B]
        # per key, the largest shape among this batch's tasks: tables are sliced to it, so one
        # large-rank task elsewhere in the pool costs this batch nothing
        widest: dict[Key, list[list[int]]] = {}
        for per_key in shapes:
            for key, sh in per_key.items():
                w = widest.get(key)
                if w is None:
                    widest[key] = [list(s) for s in sh]
                else:
                    for wi, si in zip(w, sh):
                        wi[:] = [max(a, b) for a, b in zip(wi, si)]
        views = {key: tuple(t[(slice(None), *(slice(0, n) for n in w))] for t, w in zip(tables[key], ws))
                 for key, ws in widest.items()}
        single = len({s for s in part_slot if s}) == 1 and all(s for s in part_slot)
        return PoolRows(views, slot, single, part_slot[0] if single else 0)

    # -- under the lock --------------------------------------------------------------------------
    def _add(self, weights: Any) -> int:
        entries = self._entries(weights)
        s = self._free.pop() if self._free else self._grab()
        self._shapes[s] = {key: tuple(t.shape for t in ts) for key, ts in entries.items()}
        try:
            for key, ts in entries.items():
                self._fit(key, ts)
                for table, t in zip(self._tables[key], ts):
                    table[(s, *(slice(0, n) for n in t.shape))] = t
        except BaseException:  # e.g. out of device memory while growing: free (and zero) the slot
            self._released.append((None, s))
            raise
        self._slot[id(weights)] = s
        weakref.finalize(weights, self._released.append, (id(weights), s))
        return s

    def _grab(self) -> int:
        s = self._next
        self._next += 1
        if s >= self._capacity:  # double every table
            cap = max(8, 2 * self._capacity)
            for key, ts in self._tables.items():
                self._tables[key] = tuple(_resized(t, (cap, *t.shape[1:])) for t in ts)
            self._capacity = cap
        return s

    def _fit(self, key: Key, ts: tuple[Tensor, ...]) -> None:
        """Make the tables of `key` exist and be at least as large as `ts` in every dimension."""
        cur = self._tables.get(key)
        if cur is None:
            cap = max(self._capacity, 8)
            self._capacity = cap
            self._tables[key] = tuple(t.new_zeros((cap, *t.shape)) for t in ts)
            return
        if any(t.shape[d] > c.shape[d + 1] for t, c in zip(ts, cur) for d in range(t.dim())):
            self._tables[key] = tuple(
                _resized(c, (c.shape[0], *(max(a, b) for a, b in zip(c.shape[1:], t.shape)))) for c, t in zip(cur, ts)
            )

    def _reclaim(self) -> None:
        while self._released:
            ident, s = self._released.popleft()
            if self._slot.get(ident) == s:
                del self._slot[ident]
            for key in self._shapes.pop(s, {}):
                for table in self._tables.get(key, ()):
                    table[s].zero_()  # a reused slot must not leak the old task's tensors
            self._free.append(s)


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

    def has(self, key: Key) -> bool:
        return key in self.views

    def rows(self, key: Key, i: int) -> Tensor:
        """Table i of `key`, gathered per row: [B, *shape]."""
        return self.views[key][i].index_select(0, self.slot)

    def one(self, key: Key, i: int) -> Tensor:
        """Table i of `key` for the single task of the batch: [*shape]."""
        return self.views[key][i][self.only]

    def select(self, rows: Tensor) -> "PoolRows":
        slot = self.slot.index_select(0, rows)
        return PoolRows(self.views, slot, self.single, self.only)


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
