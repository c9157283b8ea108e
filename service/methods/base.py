"""The contract between a parameter-efficient method and the shared encoder.

A method is one small module registered once by name. It has two halves:

* **parse**: turn its section of `adapter_config.json` plus its tensors into frozen, validated
  `TaskWeights` (all problems reported in one `BundleError`).
* **batch**: given the weights of the distinct tasks in a batch and a per-row index into them,
  build a `MethodBatch`: the per-forward tables the encoder's hook points read.

The encoder calls every hook of every `MethodBatch` in the plan; a method implements the hooks
it needs and inherits no-ops for the rest. Nothing here knows about requests or task names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from service.engine.spec import BackboneInfo


class TaskWeights:
    """One task's weights for one method, validated, on the engine's device."""

    method: ClassVar[str]

    def tensors(self) -> dict[str, Tensor]:
        """Canonical tensor names -> tensors, as written to `adapter_model.safetensors`."""
        raise NotImplementedError

    def trainable_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def config(self) -> dict[str, Any]:
        """This method's section of `adapter_config.json`."""
        raise NotImplementedError


class MethodBatch:
    """Per-forward state of one method for one batch. Rows index the batch dimension."""

    def prompt(self) -> tuple[Tensor, Tensor] | None:
        """Soft-prompt embeddings to prepend: ([B, P, E], lengths [B]) or None."""
        return None

    def position_shift(self) -> Tensor | None:
        """Per-row offset [B] added to text position ids (prefix tuning as PEFT runs it)."""
        return None

    def kv_prefix(self, layer: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """Key/value prefixes for one layer: (k [B, H, P, d], v [B, H, P, d], keep [B, P] bool)."""
        return None

    def linear_delta(self, layer: int, site: str, x: Tensor) -> Tensor | None:
        """Additive change to the output of linear `site` in `layer` for input x [B, T, in].
        Every method that changes a linear implements this (packed batches use it), even if it
        also has a faster `add_linear_delta`."""
        return None

    def adapts(self, layer: int, site: str) -> bool:
        """Whether some row's task changes linear `site` (or, for "attn"/"ffn", that sub-layer's
        output) in `layer`: the encoder skips the hook, and any repacking around it, if not.
        Conservative by default: any method that overrides a linear or sub-layer hook is asked."""
        cls = type(self)
        return any(getattr(cls, name) is not getattr(MethodBatch, name)
                   for name in ("linear_delta", "add_linear_delta", "after_sublayer"))

    def add_linear_delta(self, layer: int, site: str, x: Tensor, y: Tensor) -> Tensor:
        """y, the frozen linear's fresh output for x, plus this method's delta. The encoder owns y
        and reads it only through the return value, so an implementation may add in place."""
        d = self.linear_delta(layer, site, x)
        return y if d is None else y + d

    def packed_spans(self, layer: int, site: str, device) -> bool:
        """Whether this batch applies its work at `site` directly on packed positions (one small
        op per span of rows: `add_packed_delta` / `after_sublayer_packed`). If not, the encoder
        unpacks the input, calls `linear_delta` / `after_sublayer`, and packs the result."""
        return False

    def add_packed_delta(self, layer: int, site: str, xp: Tensor, yp: Tensor, packing) -> None:
        """Add the delta for packed positions xp [N, in] into yp [N, out], in place."""
        raise NotImplementedError

    def after_sublayer(self, layer: int, site: str, h: Tensor) -> Tensor:
        """Transform a sub-layer's output [B, T, H] before its residual + LayerNorm."""
        return h

    def after_sublayer_packed(self, layer: int, site: str, hp: Tensor, packing) -> Tensor:
        """`after_sublayer` on packed positions hp [N, H] (may write in place)."""
        raise NotImplementedError

    def select(self, rows: Tensor) -> "MethodBatch":
        """The same tables restricted to `rows` (early-exit compaction)."""
        return self


class Method:
    """A registered method: parses its bundle section and batches its tasks."""

    name: ClassVar[str]
    # Order in which methods apply when one task combines several (e.g. LoRA + head).
    order: ClassVar[int] = 50
    # "encoder": hooks into the shared forward (a MethodBatch in the Plan); "output": reads the
    # encoder's states to produce answers (heads, early-exit classifiers), batched by the engine.
    stage: ClassVar[str] = "encoder"

    def parse(
        self, section: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo
    ) -> TaskWeights:
        raise NotImplementedError

    def batch(self, parts: Sequence[TaskWeights | None], row_part: Tensor) -> MethodBatch | None:
        """Tables for one forward. `parts[j]` are task j's weights (None: task j lacks this
        method); `row_part[b]` is the task index of row b. Returns None if no row uses it."""
        raise NotImplementedError


REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: one registration per method, by name."""
    if cls.name in REGISTRY:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls()
    return cls


@dataclass
class Problems:
    """Collects every problem in a bundle so one error can name them all."""

    where: str
    items: list[str]

    def __init__(self, where: str):
        self.where = where
        self.items = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def check(self, cond: bool, msg: str) -> bool:
        if not cond:
            self.add(msg)
        return cond

    def raise_if_any(self) -> None:
        if self.items:
            from service.errors import BundleError

            raise BundleError(f"{self.where}: " + "; ".join(self.items), problems=[f"{self.where}: {i}" for i in self.items])


def take(tensors: Mapping[str, Tensor], name: str, shape: tuple[int, ...], problems: Problems) -> Tensor | None:
    """Fetch a required tensor and check its shape, recording a problem instead of raising."""
    t = tensors.get(name)
    if t is None:
        problems.add(f"missing tensor {name!r}")
        return None
    if tuple(t.shape) != tuple(shape):
        problems.add(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        return None
    if not torch.isfinite(t).all():
        problems.add(f"tensor {name!r} contains NaN or Inf")
        return None
    return t


def trainable(t: Tensor, backbone: BackboneInfo) -> Tensor:
    """Fresh weights for training (each method's `init`): a leaf tensor on the engine's device and
    dtype that collects gradients. Serving never calls this; parsed weights stay plain tensors."""
    return t.to(device=backbone.device, dtype=backbone.dtype).requires_grad_(True)
