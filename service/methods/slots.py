"""Per-row task slots: stack the weights of the tasks in a batch into one table per tensor.

Slot 0 of every table is all zeros and stands for "this row's task has no weights here", so a
batched op over the table is a no-op for those rows. Tensors of different sizes (LoRA ranks,
adapter bottlenecks) are zero-padded to the largest in the batch, which leaves the products
unchanged because the padded rows and columns meet zeros on the other side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
