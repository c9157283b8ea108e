"""The training loop: the serving engine's own forward, plus gradients on the task's tensors.

A batch is a one-task batch of the engine (`Engine.tokenize` -> `Engine.encode` -> the head
batch's `logits`), exactly the code that serves the task later, run outside inference mode.
Cross-entropy, AdamW on the task tensors only (the shared backbone stays frozen and is checked
to receive no gradient), linear warmup then linear decay, early stopping on the dev split with
the best dev checkpoint kept. A fixed seed fixes the initial weights and the data order.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from service.engine.backbone import Backbone, load_backbone
from service.engine.engine import Engine
from service.engine.spec import TaskSpec
from service.engine.task import Task
from service.engine.types import ClassifyItem, TaskKey
from service.methods.base import TaskWeights
from service.methods.exits import DEFAULT_THRESHOLDS, ExitWeights
from service.store import TASK_NAME_RE
from training.config import ConfigError, TrainConfig
from training.data import LabelledData, Splits, data_hash
from training.exits import train_exits, weighted_loss
from training.full import trainable_copy
from training.metrics import Metrics, compute_metrics
from training.reparam import PrefixProjection
from training.weights import init_projection, init_weights, parameter_groups, trainable_tensors

log = logging.getLogger(__name__)

TRAINING_VERSION = "training"  # the key version of the in-training task (never stored)


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    steps: int  # optimiser steps so far
    train_loss: float  # mean over this epoch's steps
    dev: Metrics
    seconds: float
    best: bool

    def as_dict(self) -> dict[str, Any]:
        """The epoch as the bundle records it: no wall time (`TrainResult.timing`)."""
        return {"epoch": self.epoch, "steps": self.steps, "train_loss": round(self.train_loss, 6),
                "dev_accuracy": self.dev.accuracy, "dev_macro_f1": self.dev.macro_f1, "best": self.best}


@dataclass
class TrainResult:
    """A trained task: its weights (the best dev checkpoint), where they run, and how it went."""

    name: str
    config: TrainConfig
    label_names: tuple[str, ...]
    input_kind: str
    weights: dict[str, TaskWeights]
    engine: Engine  # runs the weights; for `full`, over the fine-tuned backbone copy
    backbone: Backbone  # the frozen shared backbone the task was trained on
    history: list[EpochRecord]
    best_epoch: int
    steps: int
    train_seconds: float
    dev_metrics: Metrics
    test_metrics: Metrics | None
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> {file, sha256, rows}
    data_hash: str | None = None  # training.data.data_hash over the split files, train, dev, test
    created: str = ""  # UTC time training finished (ISO 8601)
    prompt: Any = None  # training.prompting.PromptSpec of a template + verbalizer task
    template: Any = None  # its parsed service.engine.template.Template

    @property
    def task(self) -> Task:
        return _task(self.name, self.weights, self.label_names, self.input_kind, self.config, self.engine.backbone,
                     self.template)

    @property
    def trainable_params(self) -> int:
        n = sum(w.trainable_params() for w in self.weights.values())
        if self.config.method == "full":
            n += sum(p.numel() for p in self.engine.backbone.model.parameters())
        return n

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None = None, batch_size: int | None = None) -> Tensor:
        """The trainer's own forward on `texts` (no gradient): [N, labels] fp32 on the CPU, in the
        order of `texts`. Batches of `batch_size` rows (default: the config's eval_batch_size) of
        similar length, so a large unlabelled set pads little."""
        task, size = self.task, batch_size or self.config.eval_batch_size
        order = length_order(texts, pairs)
        out = torch.empty(len(texts), len(self.label_names))
        with torch.no_grad():
            for i in range(0, len(order), size):
                rows = order[i : i + size]
                items = _items(task, [texts[r] for r in rows], None if pairs is None else [pairs[r] for r in rows])
                out[rows] = forward(self.engine, items).float().cpu()
        return out

    def bundle_config(self) -> dict[str, Any]:
        """The non-tensor part of the bundle (`write_bundle` adds `format` and `methods`). Only what
        the run's inputs decide: the version id is the bundle's content hash, so a run repeated
        with the same seed, data and code publishes the same version. Wall time and the time of
        day are the run's, not the task's: `timing`."""
        info = self.backbone.info
        metrics = {"dev": self.dev_metrics.as_dict()}
        if self.test_metrics is not None:
            metrics["test"] = self.test_metrics.as_dict()
        return {
            **(self.prompt.bundle_config() if self.prompt is not None else {}),  # "template"
            "labels": list(self.label_names),
            "input_kind": self.input_kind,
            "max_length": self.config.max_length,
            "backbone": {"fingerprint": info.fingerprint, "name": self.backbone.name, "model_type": info.model_type},
            "training": {
                "method": self.config.method,
                "hyperparameters": self.config.hyperparameters(),
                "epochs": self.config.num_epochs,
                "epochs_run": len(self.history),
                "best_epoch": self.best_epoch,
                "steps": self.steps,
                "lr": self.config.learning_rate,
                "seed": self.config.seed,
                "data_hash": self.data_hash,
                "data": self.data,
                "trainable_params": self.trainable_params,
                "history": [r.as_dict() for r in self.history],
                "torch": torch.__version__,
            },
            "metrics": metrics,
        }

    def timing(self) -> dict[str, Any]:
        """How long the run took and when it ended: in the run's summary (`--json`), never in the
        bundle, where it would make every run a new version (`bundle_config`)."""
        return {"train_seconds": round(self.train_seconds, 3),
                "epoch_seconds": [round(r.seconds, 3) for r in self.history], "finished": self.created}


# -- the forward both training and evaluation use ----------------------------------------------------
def forward(engine: Engine, items: Sequence[ClassifyItem], dropout: float = 0.0) -> Tensor:
    """Logits [B, labels] of one batch of one task through the serving engine's code path.

    Unlike `Engine.logits` it runs in whatever grad mode the caller is in, so gradients reach the
    task tensors (and, for `full`, the copied backbone). `dropout` > 0 only for training steps."""
    batch = engine.tokenize(items)
    return torch.stack(engine.full_depth_logits(batch, dropout))  # [B, labels]


def evaluate(engine: Engine, task: Task, data: LabelledData, batch_size: int = 64, progress: bool = False,
             desc: str = "eval") -> Metrics:
    """Score `task` on `data` with the training forward (no gradient)."""
    order = by_length(data)
    preds = [0] * len(data)
    with torch.no_grad(), tqdm(total=len(data), desc=desc, unit="row", leave=False, disable=not progress) as bar:
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            items = _items(task, [data.texts[r] for r in rows], None if data.text_pairs is None else [data.text_pairs[r] for r in rows])
            z = forward(engine, items)
            if not bool(torch.isfinite(z).all()):  # argmax would quietly score NaN rows as label 0
                raise NonFiniteScores(f"the task's scores on the {desc} rows are NaN or Inf")
            for r, p in zip(rows, z.argmax(dim=-1).tolist()):
                preds[r] = p
            bar.update(len(rows))
    return compute_metrics(predictions=preds, references=data.label_ids, label_names=data.label_names)


# -- the loop ------------------------------------------------------------------------------------------
def train(splits: Splits, config: TrainConfig, *, name: str, backbone: Backbone | None = None,
          progress: bool = True, prompt: Any = None,
          loss_fn: Callable[[Tensor, list[int]], Tensor] | None = None) -> TrainResult:
    """Train one task on `splits.train`, choose the checkpoint on `splits.dev`, score `splits.test`.

    `prompt`: a `training.prompting.PromptSpec`: a template + verbalizer (and demonstrations)
    answer instead of a classification head. `loss_fn(logits, rows)`: the loss of a batch of
    training rows (default: cross-entropy with their labels; PET's student distils soft labels).

    `backbone`: the frozen shared backbone (default: the bundled MiniLM, fp32). Training needs
    fp32 weights: the task tensors are fp32 and AdamW's updates would underflow in half precision.
    """
    config.check()
    if not TASK_NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid task name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
                          "starting with a letter or digit")
    if splits.dev is None:
        raise ConfigError("a dev split is required: it chooses the checkpoint and stops training early")
    if backbone is None:
        backbone = load_backbone(None, dtype="float32")
    if backbone.dtype != torch.float32:
        raise ConfigError(f"training needs a float32 backbone, got {backbone.dtype} (load it with dtype='float32')")
    info = backbone.info
    config.check_backbone(info.max_positions, info.has_pooler, info.kind, info.hidden_size, info.sites)
    train_data, dev = splits.train, splits.dev
    labels = train_data.label_names
    input_kind = "pair" if train_data.has_pairs else "single"

    torch.manual_seed(config.seed)
    init_gen = torch.Generator().manual_seed(config.seed)
    order_gen = torch.Generator().manual_seed(config.seed + 1)  # its own stream: init changes never reorder data

    full = config.method == "full"
    run_backbone = trainable_copy(backbone) if full else backbone
    engine = Engine(run_backbone)
    weights = init_weights(config, run_backbone, len(labels), init_gen)
    template = None
    if prompt is not None:  # the verbalizer (+ demonstration pool) replaces the head
        weights = prompt.attach(weights, engine, train_data, config.method, config.max_length)
        template = prompt.parsed_template(run_backbone, input_kind == "pair")
    exits = None
    if config.early_exit:  # drawn after everything else, so --early-exit changes no other initial weight
        exits = ExitWeights.init(info, num_labels=len(labels), pooling=config.pooling, generator=init_gen)
        if config.exit_loss == "weighted":  # PABEE: trained with the task; two-stage fits them after the loop
            if loss_fn is not None:
                raise ConfigError("--exit-loss weighted trains on cross-entropy; use --exit-loss two-stage here")
            weights["exits"] = exits
    projection = init_projection(config, weights, init_gen)  # drawn last: changes no other initial weight
    task = _task(name, weights, labels, input_kind, config, run_backbone, template)
    params = trainable_tensors(weights, projection) + (list(run_backbone.model.parameters()) if full else [])
    optimiser = torch.optim.AdamW(
        parameter_groups(weights, run_backbone.model if full else None, config.weight_decay, projection),
        lr=config.learning_rate,
    )
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total = config.num_epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_then_decay(total, config.warmup_ratio))
    targets = torch.tensor(train_data.label_ids, dtype=torch.long, device=info.device)

    average = WeightAverage(params, config.ema_decay) if config.ema_decay else None
    history: list[EpochRecord] = []
    best_score, best_epoch, best_state = -1.0, 0, None
    steps, t0 = 0, time.perf_counter()
    say = _printer(progress)
    with tqdm(total=total, desc=f"train {name} ({config.method})", unit="step", disable=not progress,
              dynamic_ncols=True) as bar:
        for epoch in range(1, config.num_epochs + 1):
            e0, losses = time.perf_counter(), []
            order = torch.randperm(len(train_data), generator=order_gen).tolist()
            for i in range(0, len(order), config.batch_size):
                rows = order[i : i + config.batch_size]
                items = _items(task, [train_data.texts[r] for r in rows],
                               None if train_data.text_pairs is None else [train_data.text_pairs[r] for r in rows])
                if "exits" in weights:  # every exit's cross-entropy with the head's (training/exits.py)
                    loss = weighted_loss(engine, items, weights["exits"], targets[rows], config.dropout_p)
                else:
                    logits = forward(engine, items, config.dropout_p)
                    loss = F.cross_entropy(logits, targets[rows]) if loss_fn is None else loss_fn(logits, rows)
                if not torch.isfinite(loss):
                    raise Diverged(_diverged(f"the loss is {loss.item()} at step {steps + 1}", config,
                                             scheduler.get_last_lr()[0]))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if projection is not None:  # the prefix's gradient, into the MLP's parameters
                    projection.backward()
                _check_frozen(backbone)
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                try:
                    optimiser.step()
                except RuntimeError as err:  # AdamW's step size lr / (1 - beta1^t) past float32's range
                    if "overflow" not in str(err):
                        raise
                    raise Diverged(_diverged(f"the optimiser step overflows ({err})", config, lr)) from None
                if projection is not None:
                    projection.write()
                if average is not None:
                    average.update(params)
                scheduler.step()
                steps += 1
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
                if steps >= total:
                    break
            live = None
            if average is not None:  # dev scores (and the checkpoint keeps) the average
                live = _snapshot(params)
                _restore(params, average.values, projection)
            try:
                dev_m = evaluate(engine, task, dev, config.eval_batch_size, progress, desc=f"dev (epoch {epoch})")
            except NonFiniteScores as err:  # weights still finite, but too large for the forward
                raise Diverged(_diverged(f"{err} after step {steps}", config)) from None
            score = getattr(dev_m, config.select_metric)
            improved = score > best_score
            if improved:
                best_score, best_epoch, best_state = score, epoch, _snapshot(params)
            _restore(params, live, projection)  # training goes on from the live weights
            history.append(EpochRecord(epoch, steps, sum(losses) / max(1, len(losses)), dev_m,
                                       time.perf_counter() - e0, improved))
            say(f"epoch {epoch}: loss {history[-1].train_loss:.4f}  dev accuracy {dev_m.accuracy:.4f}  "
                f"macro_f1 {dev_m.macro_f1:.4f}{'  (best)' if improved else ''}")
            if steps >= total:
                break
            if config.patience is not None and epoch - best_epoch >= config.patience:
                say(f"early stop: dev {config.select_metric} has not improved for {config.patience} epoch(s)")
                break
    train_seconds = time.perf_counter() - t0
    _restore(params, best_state, projection)
    if not all(bool(torch.isfinite(p).all()) for p in params):  # a step to Inf/NaN with a still-finite loss
        raise Diverged(_diverged("the trained weights hold NaN or Inf", config))
    if exits is not None:  # exit classifiers (two-stage), confidence predictors, calibrated threshold
        weights["exits"] = train_exits(engine, task, train_data, dev, exits, config,
                                       torch.Generator().manual_seed(config.seed + 2))
        say(_exit_summary(weights["exits"].calibration))
        if fallback := _uncalibrated(weights["exits"].calibration):
            log.warning(fallback)
    dev_metrics = history[best_epoch - 1].dev
    test_metrics = None
    if splits.test is not None:
        test_metrics = evaluate(engine, task, splits.test, config.eval_batch_size, progress, desc="test")
    return TrainResult(
        name=name, config=config, label_names=labels, input_kind=input_kind, weights=weights, engine=engine,
        backbone=backbone, history=history, best_epoch=best_epoch, steps=steps, train_seconds=train_seconds,
        dev_metrics=dev_metrics, test_metrics=test_metrics, data=_describe_data(splits), data_hash=_data_hash(splits),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), prompt=prompt, template=template,
    )


# -- helpers -------------------------------------------------------------------------------------------
class Diverged(ConfigError):
    """Training blew up (a non-finite loss or weights): nothing is returned, so nothing is published."""


class NonFiniteScores(ConfigError):
    """`evaluate` met NaN / Inf logits: the weights it scores are broken."""


def _diverged(what: str, config: TrainConfig, lr: float | None = None) -> str:
    now = f", {lr:g} at this step" if lr is not None else ""
    return (f"training diverged: {what}; the learning rate (peak {config.learning_rate:g}{now}) is the likely "
            "cause: lower it (--lr; --teacher-lr / --student-lr for PET); nothing was published")


def _exit_summary(cal: dict[str, Any]) -> str:
    parts = []
    for name, p in cal["policies"].items():
        parts.append(f"{name} {p['threshold']:.4g}: dev accuracy {p['accuracy']:.4f}, mean exit layer "
                     f"{p['mean_exit_layer']:.2f}" if p["met"] else f"{name}: no threshold within the target")
    return (f"early exit (dev, full depth {cal['full_depth_accuracy']:.4f}, at most {cal['max_drop_points']:g} "
            f"points lost at {100 * cal['confidence']:g}% confidence, {cal['layers']} layers): " + "; ".join(parts))


def _uncalibrated(cal: dict[str, Any]) -> str | None:
    """A warning for the policies dev calibrated no threshold for: a request naming one of them
    without a threshold gets its fixed default (`DEFAULT_THRESHOLDS`: patience 2, ...), which was
    never measured against --exit-max-drop. None when every policy was calibrated."""
    missed = [name for name, p in cal["policies"].items() if not p["met"]]
    if not missed:
        return None
    defaults = ", ".join(f"{name} {DEFAULT_THRESHOLDS[name]:g}" for name in missed)
    out = (f"early exit: no {' / '.join(missed)} threshold kept within {cal['max_drop_points']:g} points on dev; a "
           f"request naming {'that policy' if len(missed) == 1 else 'one of them'} without a threshold falls back "
           f"to the uncalibrated default ({defaults}), which may lose more; give requests a threshold")
    if "confidence" in missed:  # `calibrate` stores policy off: the task's rows never leave early by themselves
        out += ("; the task's stored policy is off: it answers every row at full depth unless a request asks for "
                "early exit")
    one_row = 100 / cal["rows"]  # the accuracy points one answer lost on dev costs
    if one_row > cal["max_drop_points"]:
        out += (f"; dev has {cal['rows']} rows, so one answer lost is {one_row:.3g} points, more than the "
                f"{cal['max_drop_points']:g} allowed: a larger --dev or a higher --exit-max-drop lets more rows exit")
    return out


def _task(name: str, weights: dict[str, TaskWeights], labels: Sequence[str], input_kind: str, config: TrainConfig,
          backbone: Backbone, template: Any = None) -> Task:
    """The in-training task, shaped exactly as `Engine.load_task` would build it from the bundle."""
    spec = TaskSpec(name=name, labels=tuple(labels), input_kind=input_kind, max_length=config.max_length,  # type: ignore[arg-type]
                    methods=tuple(weights), backbone_fingerprint=backbone.fingerprint, template=template)
    return Task(key=TaskKey(name, TRAINING_VERSION), spec=spec, weights=weights, backbone=backbone.info)


def _items(task: Task, texts: Sequence[str], pairs: Sequence[str] | None) -> list[ClassifyItem]:
    if pairs is None:
        return [ClassifyItem(task, t) for t in texts]
    return [ClassifyItem(task, t, p) for t, p in zip(texts, pairs)]


def by_length(data: LabelledData) -> list[int]:
    """Row indices by text length: batches of similar lengths pad less (answers do not change)."""
    return length_order(data.texts, data.text_pairs)


def length_order(texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[int]:
    """`by_length` for plain sequences of texts (and pairs)."""
    return sorted(range(len(texts)), key=lambda i: len(texts[i]) + (len(pairs[i] or "") if pairs is not None else 0))


def _warmup_then_decay(total: int, warmup_ratio: float):
    """LR factor per step: linear warmup over `warmup_ratio` of the steps, then linear decay.
    Unlike HF's schedule the first step is not lost at lr 0, and the last is not either."""
    warmup = round(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _check_frozen(backbone: Backbone) -> None:
    """The shared backbone must not learn: no parameter of it may hold a gradient."""
    leaked = [n for n, p in backbone.model.named_parameters() if p.grad is not None or p.requires_grad]
    if leaked:
        raise RuntimeError(f"the shared backbone received gradients ({', '.join(leaked[:3])} ...); it must stay frozen")


def _snapshot(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[Tensor], state: list[Tensor] | None, projection: PrefixProjection | None = None) -> None:
    """Copy `state` into `params` (nothing if None); a projected prefix is rewritten from its MLP."""
    if state is None:
        return
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)
    if projection is not None:
        projection.write()


class WeightAverage:
    """An exponential moving average of the trained tensors (Polyak averaging, as in TensorFlow's
    `ExponentialMovingAverage` with `num_updates`): after update t the decay is
    min(decay, (1 + t) / (10 + t)), so the first steps are not pinned to the initial weights."""

    def __init__(self, params: list[Tensor], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.values = _snapshot(params)

    def update(self, params: list[Tensor]) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        with torch.no_grad():
            for value, p in zip(self.values, params):
                value.lerp_(p, 1.0 - d)


def _split_list(splits: Splits) -> list[tuple[str, LabelledData]]:
    return [(n, d) for n, d in (("train", splits.train), ("dev", splits.dev), ("test", splits.test)) if d is not None]


def _from_file(d: LabelledData) -> bool:
    return d.source is not None and Path(d.source).is_file()


def _describe_data(splits: Splits) -> dict[str, dict[str, Any]]:
    return {
        split: {"file": Path(d.source).name if d.source else None,
                "sha256": data_hash(d.source) if _from_file(d) else _content_hash(d), "rows": len(d)}
        for split, d in _split_list(splits)
    }


def _data_hash(splits: Splits) -> str:
    """`data_hash` of the split files (train, dev, test); for in-memory data, of their rows."""
    parts = [d for _, d in _split_list(splits)]
    if all(_from_file(d) for d in parts):
        return data_hash([d.source for d in parts])  # type: ignore[misc]
    return hashlib.sha256("\n".join(_content_hash(d) for d in parts).encode()).hexdigest()


def _content_hash(d: LabelledData) -> str:
    """For in-memory data (no file): sha256 of the rows as JSON."""
    rows = [d.texts, d.text_pairs, d.labels]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def _printer(progress: bool):
    if progress:
        return lambda msg: tqdm.write(msg, file=sys.stderr)
    return log.info
