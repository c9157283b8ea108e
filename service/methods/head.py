"""Classification heads: pool the final hidden states, then a per-task linear classifier.

Pooling (stored per task):
* ``cls``    - the first position's hidden state,
* ``pooler`` - the backbone's own BERT pooler, tanh(W h_0 + b), as `BertForSequenceClassification`,
* ``mean``   - the mean over the text tokens (how all-MiniLM-L6-v2 was trained to embed sentences).
An optional task-owned ``dense`` + tanh layer precedes the classifier (RoBERTa's head shape).

Heads differ in label count: at serving time the classifiers sit in a slot pool padded to the
largest label count, and each row's logits are sliced back to its own labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.activations import ACT2FN

from service.engine.spec import BackboneInfo
from service.methods import slots
from service.methods.base import Method, MethodBatch, Problems, TaskWeights, register, take, trainable
from service.methods.lora import POOLER

POOLINGS = ("cls", "pooler", "mean", "last")
DENSE_ACTIVATIONS = ("tanh", "relu", "gelu")
# BERT's initializer_range: classifier weights ~ N(0, 0.02), bias 0 (`BertPreTrainedModel._init_weights`).
INIT_STD = 0.02


@dataclass(frozen=True)
class HeadWeights(TaskWeights):
    method = "head"
    pooling: str
    out_w: Tensor  # [labels, H]
    out_b: Tensor  # [labels]
    dense_w: Tensor | None = None  # [H, H]
    dense_b: Tensor | None = None
    dense_activation: str = "tanh"  # RoBERTa: tanh; DistilBERT's pre_classifier: relu; ELECTRA: gelu
    # L2-normalise the pooled vector first: with unit-norm rows in out_w the logits are cosine
    # similarities (times out_w's scale), which is how zero-shot label-description tasks score.
    normalize: bool = False

    @property
    def num_labels(self) -> int:
        return self.out_w.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        out = {"head.out.weight": self.out_w, "head.out.bias": self.out_b}
        if self.dense_w is not None:
            out.update({"head.dense.weight": self.dense_w, "head.dense.bias": self.dense_b})
        return out

    @classmethod
    def init(
        cls,
        info: BackboneInfo,
        *,
        num_labels: int,
        pooling: str = "cls",
        dense: bool = False,
        dense_activation: str = "tanh",
        generator: torch.Generator | None = None,
    ) -> "HeadWeights":
        """Fresh trainable weights: every matrix ~ N(0, 0.02), biases zero (BERT's classifier init)."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if pooling == "pooler" and not info.has_pooler:
            raise ValueError("pooling 'pooler' needs a backbone with a pooler layer; this one has none (use 'cls' or 'mean')")
        if dense_activation not in DENSE_ACTIVATIONS:
            raise ValueError(f"dense_activation must be one of {DENSE_ACTIVATIONS}, got {dense_activation!r}")
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"a classification head needs at least 2 labels, got {num_labels!r}")
        h = info.hidden_size
        normal = lambda *shape: torch.empty(*shape).normal_(0.0, INIT_STD, generator=generator)  # noqa: E731
        dense_w = trainable(normal(h, h), info) if dense else None
        dense_b = trainable(torch.zeros(h), info) if dense else None
        return cls(
            pooling=pooling,
            out_w=trainable(normal(num_labels, h), info),
            out_b=trainable(torch.zeros(num_labels), info),
            dense_w=dense_w,
            dense_b=dense_b,
            dense_activation=dense_activation,
        )

    def config(self) -> dict[str, Any]:
        cfg = {"pooling": self.pooling, "dense": self.dense_w is not None, "num_labels": self.num_labels}
        if self.dense_w is not None:
            cfg["dense_activation"] = self.dense_activation
        if self.normalize:
            cfg["normalize"] = True
        return cfg


def pool(hidden: Tensor, keep: Tensor, text_start: Tensor, text_len: Tensor, how: str) -> Tensor:
    """[B, S, H] -> [B, H]. `cls`/`pooler` read position 0 (as HF and PEFT do, even behind a soft
    prompt); `mean` averages the text tokens only, never prompt or padding positions."""
    if how == "last":  # causal LMs: the last text token has seen the whole input
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), text_start + text_len - 1]
    if how == "mean":
        j = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        w = ((j >= text_start.unsqueeze(1)) & (j < (text_start + text_len).unsqueeze(1))).to(hidden.dtype)
        return (hidden * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
    return hidden[:, 0]


def _pool_entries(w: HeadWeights) -> dict:
    """The classifier as the pool keeps it: out^T [H, labels] and bias [labels]; label counts pad
    with zeros and each row's logits are sliced back to its task's labels."""
    return {("out", w.out_w.shape[1], w.out_w.device, w.out_w.dtype): (w.out_w.T, w.out_b)}


POOL = slots.SlotPool(_pool_entries)
_READS = {"pooler": "cls"}  # pooling kinds that start from another kind's vector


class HeadBatch(MethodBatch):
    def __init__(self, parts: Sequence[HeadWeights | None], row_part: Tensor):
        self.parts = parts
        self.row_part = row_part
        self.part_of_row: list[int] | None = None  # row_part on the host, when the engine knows it

    def select(self, rows: Tensor) -> "HeadBatch":
        return HeadBatch(self.parts, self.row_part.index_select(0, rows))

    def logits(self, hidden: Tensor, keep: Tensor, text_start: Tensor, text_len: Tensor, pooler, plan) -> list[Tensor | None]:
        """Per row: that row's task logits [labels] (None for rows whose task has no head).

        Every row is pooled once per pooling kind present and the pooler runs once over the batch
        (with any task's pooler LoRA from the batch's own tables); each row then keeps its task's
        choice. Serving projects all rows with one bmm over pooled classifiers; training (weights
        with gradients) projects per task."""
        # on a GPU, reading row_part back would wait here for the whole encoder to finish
        part_of_row = self.part_of_row if self.part_of_row is not None else self.row_part.tolist()
        present = sorted({j for j in part_of_row if self.parts[j] is not None})
        if not present:
            return [None] * hidden.shape[0]
        parts = self.parts

        def rows_where(pred) -> Tensor:  # [B] bool: rows whose task satisfies pred
            flags = slots.to_device([p is not None and pred(p) for p in parts], hidden.device)
            return flags.index_select(0, self.row_part)

        kinds = sorted({parts[j].pooling for j in present})
        reads = sorted({_READS.get(k, k) for k in kinds})  # the pooler reads what cls reads
        x = pool(hidden, keep, text_start, text_len, reads[0])  # [B, H]
        for how in reads[1:]:
            mask = rows_where(lambda p, h=how: _READS.get(p.pooling, p.pooling) == h).unsqueeze(1)
            x = torch.where(mask, pool(hidden, keep, text_start, text_len, how), x)
        if any(parts[j].normalize for j in present):
            x = torch.where(rows_where(lambda p: p.normalize).unsqueeze(1), F.normalize(x, dim=-1), x)
        if "pooler" in kinds:
            y = pooler(x)  # [B, H]
            for b in plan.batches:
                d = b.linear_delta(*POOLER, x)
                if d is not None:
                    y = y + d
            x = torch.where(rows_where(lambda p: p.pooling == "pooler").unsqueeze(1), torch.tanh(y), x)
        for j in present:  # task-owned dense layers (RoBERTa-shaped heads): rare, per task
            p = parts[j]
            if p.dense_w is not None:
                rows = slots.to_device([r for r, k in enumerate(part_of_row) if k == j], x.device, torch.long)
                x = x.index_copy(0, rows, ACT2FN[p.dense_activation](x.index_select(0, rows) @ p.dense_w.T + p.dense_b))
        out: list[Tensor | None] = [None] * hidden.shape[0]
        if slots.poolable([parts[j] for j in present]):
            pr = POOL.gather(parts, self.row_part)
            (key,) = pr.views
            if pr.single:
                z = torch.addmm(pr.one(key, 1), x, pr.one(key, 0))  # [B, Lmax]
            else:  # z_b = x_b W_b^T + b_b for every row at once
                z = torch.baddbmm(pr.rows(key, 1).unsqueeze(1), x.unsqueeze(1), pr.rows(key, 0)).squeeze(1)
            for r, j in enumerate(part_of_row):
                p = parts[j]
                if p is not None:
                    out[r] = z[r, : p.num_labels]
            return out
        for j in present:
            p = parts[j]
            rows = (self.row_part == j).nonzero().squeeze(1)
            z = x.index_select(0, rows) @ p.out_w.T + p.out_b  # [n, labels]
            for r, zr in zip(rows.tolist(), z):
                out[r] = zr
        return out


@register
class Head(Method):
    name = "head"
    order = 90
    stage = "output"

    def parse(self, section: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo) -> HeadWeights:
        problems = Problems("head")
        pooling = section.get("pooling", "cls")
        if pooling not in POOLINGS:
            problems.add(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if pooling == "pooler" and not backbone.has_pooler:
            problems.add("pooling 'pooler' needs a backbone with a pooler layer; this one has none (use 'cls' or 'mean')")
        h = backbone.hidden_size
        w = tensors.get("head.out.weight")
        n = w.shape[0] if w is not None and w.dim() == 2 else section.get("num_labels", 0)
        if not isinstance(n, int) or n < 2:
            problems.add(f"a classification head needs at least 2 labels, found {n}")
            n = 2
        out_w = take(tensors, "head.out.weight", (n, h), problems)
        out_b = take(tensors, "head.out.bias", (n,), problems)
        dense_w = dense_b = None
        if section.get("dense") or "head.dense.weight" in tensors:
            dense_w = take(tensors, "head.dense.weight", (h, h), problems)
            dense_b = take(tensors, "head.dense.bias", (h,), problems)
        act = section.get("dense_activation", "tanh")
        if act not in DENSE_ACTIVATIONS:
            problems.add(f"'dense_activation' must be one of {DENSE_ACTIVATIONS}, got {act!r}")
        problems.raise_if_any()
        cast = lambda t: None if t is None else t.to(device=backbone.device, dtype=backbone.dtype).contiguous()  # noqa: E731
        return HeadWeights(pooling=pooling, out_w=cast(out_w), out_b=cast(out_b), dense_w=cast(dense_w), dense_b=cast(dense_b), dense_activation=act,
                           normalize=bool(section.get("normalize", False)))

    def batch(self, parts: Sequence[TaskWeights | None], row_part: Tensor) -> HeadBatch | None:
        if all(p is None for p in parts):
            return None
        return HeadBatch(parts, row_part)  # type: ignore[arg-type]
