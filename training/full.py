"""Full fine-tuning, the baseline every parameter-efficient method is compared against.

The shared backbone is never touched: a deep copy is made trainable and driven by the same
`Encoder` code (a new `Family` view over the copy's modules). The result is a whole new backbone,
so it cannot be published as a task of the running service; `save_full` writes it as a backbone
folder plus a head-only store next to it, which `adaptserve serve --backbone ... --store ...` or
`adaptserve evaluate` can load (see `docs/training.md`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from service.engine.backbone import Backbone, fingerprint
from service.engine.bundle import write_bundle
from service.engine.encoder import Encoder
from service.engine.families import family_of
from service.methods.base import TaskWeights


def trainable_copy(backbone: Backbone) -> Backbone:
    """A deep copy of `backbone` whose parameters collect gradients; the original stays frozen."""
    model = copy.deepcopy(backbone.model).requires_grad_(True)
    family = family_of(model)
    return dataclasses.replace(backbone, model=model, family=family, encoder=Encoder(family))


@dataclass(frozen=True)
class FullArtifacts:
    backbone_dir: Path  # a Hugging Face model folder (weights + config + tokenizer)
    store: Path  # a task store holding the task's head, fingerprinted to that backbone
    version: str


def save_full(out_dir: Path, name: str, tuned: Backbone, spec_cfg: Mapping[str, Any], weights: Mapping[str, TaskWeights]) -> FullArtifacts:
    """Write `<out_dir>/backbone/` and `<out_dir>/store/<name>/<version>/` (head only)."""
    out_dir = Path(out_dir)
    backbone_dir = out_dir / "backbone"
    backbone_dir.mkdir(parents=True, exist_ok=True)
    tuned.model.save_pretrained(backbone_dir)
    tuned.tokenizer.save_pretrained(backbone_dir)
    cfg = dict(spec_cfg)
    cfg["backbone"] = {**dict(cfg.get("backbone") or {}), "fingerprint": fingerprint(tuned.model), "name": str(backbone_dir)}
    version = write_bundle(out_dir / "store", name, cfg, weights)
    return FullArtifacts(backbone_dir=backbone_dir, store=out_dir / "store", version=version)
