"""A loaded, validated, device-resident task version."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    @property
    def input_kind(self) -> str:
        return self.spec.input_kind

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
            "trainable_params": self.trainable_params,
            "pct_of_backbone": round(100.0 * self.trainable_params / self.backbone.num_params, 4),
            "bytes_on_disk": self.bytes_on_disk,
            "resident_bytes": self.nbytes,
            **self.spec.metadata,
        }


def disk_bytes(bundle_dir: Path) -> int:
    return sum(p.stat().st_size for p in bundle_dir.iterdir() if p.is_file())
