"""A loaded, validated, device-resident task version."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.engine.spec import BackboneInfo, TaskSpec
from service.engine.types import TaskKey
from service.methods.base import TaskWeights


@dataclass(frozen=True, eq=False)
class Task:
    key: TaskKey
    spec: TaskSpec
    weights: dict[str, TaskWeights]
    backbone: BackboneInfo = field(repr=False)
    bytes_on_disk: int = 0
    # a prompt task's template and special tokens, counted with every input (`Template.own_tokens`); 0 without a template
    prompt_tokens: int = 0

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    @property
    def input_kind(self) -> str:
        return self.spec.input_kind

    @property
    def max_length(self) -> int:
        return self.spec.max_length

    @property
    def overflow(self) -> str:
        """`truncate` or `refuse`: what an input longer than `spec.max_length` tokens gets."""
        return self.spec.overflow

    @property
    def has_exits(self) -> bool:
        """Whether the task has early-exit classifiers (so a per-request exit policy applies)."""
        return "exits" in self.weights

    @property
    def exit_count(self) -> int:
        """How many layers have an exit classifier (0 without exits): the most a patience can be."""
        exits = self.weights.get("exits")
        return 0 if exits is None else len(exits.layers)  # type: ignore[attr-defined]

    def exit_problems(self) -> list[str]:
        """What the task's stored early-exit policy asks that its exits cannot do (refused at upload)."""
        exits = self.weights.get("exits")
        return [] if exits is None else exits.policy_problems()  # type: ignore[attr-defined]

    def exit_threshold(self, policy: str) -> float | None:
        """The threshold a request naming only `policy` gets: this task's calibrated one (stored
        by `adaptserve train --early-exit`) or the policy's default (`ExitWeights.threshold_for`);
        None where no threshold applies (no exit classifiers, or `off`)."""
        exits = self.weights.get("exits")
        return None if exits is None or policy == "off" else exits.threshold_for(policy)  # type: ignore[attr-defined]

    @property
    def nbytes(self) -> int:
        """Bytes the task occupies on the engine's device (what the cache budget counts)."""
        return sum(w.nbytes() for w in self.weights.values())

    @property
    def trainable_params(self) -> int:
        return sum(w.trainable_params() for w in self.weights.values())

    def info(self) -> dict[str, Any]:
        return {
            "task": self.key.name,
            "version": self.key.version,
            "method": "+".join(m for m in self.spec.methods if m != "head") or "head",
            "methods": {m: w.config() for m, w in self.weights.items()},
            "labels": self.labels,
            "input_kind": self.input_kind,
            "max_length": self.spec.max_length,
            "overflow": self.spec.overflow,
            "trainable_params": self.trainable_params,
            "pct_of_backbone": round(100.0 * self.trainable_params / self.backbone.num_params, 4),
            "bytes_on_disk": self.bytes_on_disk,
            "resident_bytes": self.nbytes,
            **self.spec.metadata,
        }


    def to(self, device: torch.device | str) -> "Task":
        """The same task version with every weight tensor on `device` (the task cache's host tier
        keeps evicted tasks as CPU copies and promotes them back without re-reading the store).
        Tensors already on `device` are shared, not copied."""
        weights = {m: _move(w, torch.device(device)) for m, w in self.weights.items()}
        return dataclasses.replace(self, weights=weights)


def _move(value: Any, device: torch.device) -> Any:
    """Every tensor inside a (frozen) weights dataclass, dict, tuple or list moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _move(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    return value


def disk_bytes(bundle_dir: Path) -> int:
    return sum(p.stat().st_size for p in bundle_dir.iterdir() if p.is_file())
