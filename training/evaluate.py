"""Score a published task through the serving path: `Engine.load_task` + `Engine.classify`.

This is what a client of the service would measure: the bundle as stored, parsed and validated
by the engine, batched by the engine; none of the trainer's task objects are involved.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from service.engine.engine import Engine
from service.engine.task import Task
from service.engine.types import ClassifyItem, TaskKey
from service.methods.exits import ExitPolicy
from service.store import LocalStore
from training.data import DataError, LabelledData
from training.metrics import Metrics, compute_metrics
from training.trainer import by_length


def load_published(engine: Engine, store: str | Path, name: str, version: str | None = None) -> Task:
    """The task's active (or given) version from a local store, loaded by the engine."""
    local = LocalStore(store)
    key = TaskKey(name, version) if version else local.resolve(name)
    return engine.load_task(local.bundle_dir(key), key)


def check_inputs(task: Task, data: LabelledData) -> None:
    """The data must have text pairs exactly when the task was trained on pairs."""
    if task.input_kind == "pair" and not data.has_pairs:
        raise DataError(f"{data.source}: task {task.key.name!r} classifies text pairs, but the file has no pair column")
    if task.input_kind != "pair" and data.has_pairs:
        raise DataError(f"{data.source}: task {task.key.name!r} classifies single texts, but the file has a pair column")


@dataclass(frozen=True)
class EarlyExitUse:
    """What early exit did in one evaluation: the policy every row ran under and where rows left.
    A served task with exit classifiers answers under its stored policy, so its accuracy is not
    the full-depth accuracy `adaptserve train` reports; this says which one was measured."""

    policy: ExitPolicy
    full_depth_forced: bool  # `full_depth=True` (`--no-early-exit`): policy off, whatever the task stores
    layers: int  # the backbone's depth: a row answered by the task's head left at this layer
    rows_by_layer: dict[int, int]  # exit layer (1-based) -> rows that left there

    @property
    def rows_early(self) -> int:
        return sum(n for layer, n in self.rows_by_layer.items() if layer < self.layers)

    @property
    def mean_exit_layer(self) -> float:
        rows = sum(self.rows_by_layer.values())
        return sum(layer * n for layer, n in self.rows_by_layer.items()) / rows if rows else float(self.layers)

    def describe(self) -> str:
        """One line for a person: the policy, why it applied, and how many rows left at which layer."""
        rows = sum(self.rows_by_layer.values())
        why = "full depth asked for" if self.full_depth_forced else "the task's stored policy, as the service answers"
        policy = "off" if self.policy.name == "off" else f"{self.policy.name} {self.policy.threshold:g}"
        where = ", ".join(f"layer {layer}: {n}" for layer, n in sorted(self.rows_by_layer.items()) if layer < self.layers)
        early = f"{self.rows_early} of {rows} rows left early ({where})" if self.rows_early else "no row left early"
        return (f"early exit: {policy} ({why}): {early}; {rows - self.rows_early} ran all {self.layers} layers; "
                f"mean exit layer {self.mean_exit_layer:.2f}")

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.name, "threshold": None if self.policy.name == "off" else self.policy.threshold,
                "full_depth_forced": self.full_depth_forced, "layers": self.layers,
                "rows_by_exit_layer": {str(k): v for k, v in sorted(self.rows_by_layer.items())},
                "rows_exited_early": self.rows_early, "mean_exit_layer": self.mean_exit_layer}


@dataclass(frozen=True)
class Evaluation:
    metrics: Metrics
    early_exit: EarlyExitUse | None  # None: the task has no exit classifiers (every row runs every layer)


def evaluate_served(engine: Engine, task: Task, data: LabelledData, batch_size: int = 64,
                    progress: bool = True) -> Metrics:
    """Accuracy, macro-F1 and per-class scores of `task` on `data` via `Engine.classify` (under the
    task's stored early-exit policy, if it has one: `evaluate_task` says what that did)."""
    return evaluate_task(engine, task, data, batch_size, progress).metrics


def evaluate_task(engine: Engine, task: Task, data: LabelledData, batch_size: int = 64, progress: bool = True,
                  full_depth: bool = False) -> Evaluation:
    """`evaluate_served`'s scores and, for a task with exit classifiers, the policy its rows ran
    under and how many left at each layer. `full_depth`: every row runs every layer (policy off)."""
    check_inputs(task, data)
    index = {name: i for i, name in enumerate(data.label_names)}
    pairs: Sequence[str | None] = data.text_pairs if data.text_pairs is not None else (None,) * len(data)
    override = ExitPolicy("off") if full_depth and task.has_exits else None  # None: the task's stored policy
    order = by_length(data)
    preds = [0] * len(data)
    exit_layers: Counter[int] = Counter()
    with tqdm(total=len(data), desc=f"evaluate {task.key}", unit="row", disable=not progress) as bar:
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            out = engine.classify([ClassifyItem(task, data.texts[r], pairs[r], exit_policy=override) for r in rows])
            for r, p in zip(rows, out):
                if isinstance(p, Exception):  # the task's weights produce non-finite scores
                    raise p
                preds[r] = index[p.label]
                exit_layers[p.exit_layer] += 1
            bar.update(len(rows))
    metrics = compute_metrics(predictions=preds, references=data.label_ids, label_names=data.label_names)
    if not task.has_exits:
        return Evaluation(metrics, None)
    policy = override or task.weights["exits"].policy  # type: ignore[attr-defined]
    return Evaluation(metrics, EarlyExitUse(policy, full_depth, engine.backbone.info.num_layers, dict(exit_layers)))
