"""Slim, frozen facts that validation needs: what the backbone looks like, what a task is.

`adapter_config.json` is parsed once into a `TaskSpec`; the stored artefact is not the serving
spec. Method weights are validated against `BackboneInfo` when a task is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

InputKind = Literal["single", "pair"]
# What a task does with an input longer than its max_length tokens: cut it (the tokenizer's
# truncation, the default) or refuse the request (413 naming the count and the limit).
Overflow = Literal["truncate", "refuse"]
OVERFLOWS: tuple[str, ...] = ("truncate", "refuse")
Pooling = Literal["cls", "mean", "pooler"]


@dataclass(frozen=True)
class BackboneInfo:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    embedding_size: int
    max_positions: int
    has_pooler: bool
    fingerprint: str
    dtype: torch.dtype
    device: torch.device
    num_params: int
    num_bytes: int
    # PEFT module path -> (layer position or None = every position, site)
    peft_paths: dict[str, tuple[int | None, str]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    # canonical site -> (in_features, out_features), read off the loaded modules
    site_shapes: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)
    kind: str = "encoder"  # "encoder" (bidirectional, BERT family) or "decoder" (causal LM)
    vocab_size: int = 0
    has_lm_head: bool = False

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.site_shapes)

    def site_shape(self, site: str) -> tuple[int, int]:
        """(in_features, out_features) of a canonical linear site."""
        return self.site_shapes[site]


@dataclass(frozen=True)
class TaskSpec:
    """What serving needs to know about one task version, validated."""

    name: str
    labels: tuple[str, ...]
    input_kind: InputKind
    max_length: int
    methods: tuple[str, ...]  # registered method names, in application order
    backbone_fingerprint: str | None
    template: Any = None  # service.engine.template.Template for prompt tasks, else None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    overflow: Overflow = "truncate"  # `"overflow"` in adapter_config.json; see OVERFLOWS
