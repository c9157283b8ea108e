"""Score a published task through the serving path: `Engine.load_task` + `Engine.classify`.

This is what a client of the service would measure: the bundle as stored, parsed and validated
by the engine, batched by the engine; none of the trainer's task objects are involved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from service.engine.engine import Engine
from service.engine.task import Task
from service.engine.types import ClassifyItem, TaskKey
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


def evaluate_served(engine: Engine, task: Task, data: LabelledData, batch_size: int = 64,
                    progress: bool = True) -> Metrics:
    """Accuracy, macro-F1 and per-class scores of `task` on `data` via `Engine.classify`."""
    check_inputs(task, data)
    index = {name: i for i, name in enumerate(data.label_names)}
    pairs: Sequence[str | None] = data.text_pairs if data.text_pairs is not None else (None,) * len(data)
    order = by_length(data)
    preds = [0] * len(data)
    with tqdm(total=len(data), desc=f"evaluate {task.key}", unit="row", disable=not progress) as bar:
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            out = engine.classify([ClassifyItem(task, data.texts[r], pairs[r]) for r in rows])
            for r, p in zip(rows, out):
                if isinstance(p, Exception):  # the task's weights produce non-finite scores
                    raise p
                preds[r] = index[p.label]
            bar.update(len(rows))
    return compute_metrics(predictions=preds, references=data.label_ids, label_names=data.label_names)
