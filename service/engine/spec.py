"""Slim, frozen facts that validation needs: what the backbone looks like, what a task is.

`adapter_config.json` is parsed once into a `TaskSpec`; the stored artefact is not the serving
spec. Method weights are validated against `BackboneInfo` when a task is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

InputKind = Literal["single", "pair"]
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

    def site_shape(self, site: str) -> tuple[int, int]:
        """(in_features, out_features) of a canonical linear site."""
        h, f = self.hidden_size, self.intermediate_size
        return {"ffn_in": (h, f), "ffn_out": (f, h)}.get(site, (h, h))


@dataclass(frozen=True)
class TaskSpec:
    """What serving needs to know about one task version, validated."""

    name: str
    labels: tuple[str, ...]
    input_kind: InputKind
    max_length: int
    methods: tuple[str, ...]  # registered method names, in application order
    backbone_fingerprint: str | None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
