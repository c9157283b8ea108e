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
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from service.engine.backbone import Backbone, fingerprint, load_backbone
from service.engine.bundle import write_bundle
from service.engine.encoder import Encoder
from service.engine.families import family_of
from service.methods.base import TaskWeights
from training.config import ConfigError


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
    """Write `<out_dir>/backbone/` and `<out_dir>/store/<name>/<version>/` (head only).

    The backbone folder is written whole or not at all (a temp folder renamed into place). One
    already there is kept when it is this very backbone; another one is refused, since the tasks
    in `<out_dir>/store` are fingerprinted to it and would stop loading."""
    out_dir = Path(out_dir)
    backbone_dir = out_dir / "backbone"
    fp = fingerprint(tuned.model)
    if not holds_backbone(out_dir, fp):
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".backbone-", dir=out_dir))
        try:
            tuned.model.save_pretrained(tmp)
            tuned.tokenizer.save_pretrained(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700: a server running as another user must read it
            os.rename(tmp, backbone_dir)  # replaces an empty folder; fails on a non-empty one (a race)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # there only if something failed
    cfg = dict(spec_cfg)
    cfg["backbone"] = {**dict(cfg.get("backbone") or {}), "fingerprint": fp, "name": str(backbone_dir)}
    version = write_bundle(out_dir / "store", name, cfg, weights)
    return FullArtifacts(backbone_dir=backbone_dir, store=out_dir / "store", version=version)


def holds_backbone(out_dir: Path, fp: str | None = None) -> bool:
    """Whether `<out_dir>/backbone` already holds the backbone with fingerprint `fp` (False when
    it is absent or empty). Anything else there is refused with a `ConfigError` (`fp` None: any
    backbone there is, as `adaptserve train` checks before training)."""
    backbone_dir = Path(out_dir) / "backbone"
    if not os.path.lexists(backbone_dir) or (backbone_dir.is_dir() and not any(backbone_dir.iterdir())):
        return False
    there = None
    if fp is not None and backbone_dir.is_dir():
        try:
            there = load_backbone(backbone_dir, device="cpu", dtype="float32", small_batch_tokens=0).fingerprint
        except Exception:  # noqa: BLE001  (whatever fails to load is not a backbone this run could keep)
            there = None
        if there == fp:
            return True
    if fp is None:
        what = "a backbone from an earlier run"
    elif there is not None:
        what = f"another backbone ({there[:19]}...)"
    else:
        what = "something that is not a loadable backbone folder"
    raise ConfigError(
        f"--publish-full {out_dir}: {backbone_dir} already holds {what}, and the tasks in {Path(out_dir) / 'store'} are "
        "fingerprinted to it: writing over it would stop them loading; pass a new --publish-full DIR"
    )
