"""Early-exit training (`adaptserve train ... --early-exit`): exit classifiers, confidence
predictors and a calibrated default threshold, all through the serving modules.

Three steps, each on what the previous one froze:

1. **Exit classifiers** (`ExitWeights` ``out``: pool the layer's states like the head, then a
   linear layer), one after every layer but the last. Two ways (`--exit-loss`):
   * ``two-stage`` (DeeBERT, Xin et al. 2020), the default: the task trains as usual (method +
     head, full depth); then, with those frozen, each exit is fitted on the frozen layer's pooled
     states. The final head is exactly what training without exits gives.
   * ``weighted`` (PABEE, Zhou et al. 2020): one loss from the start,
     sum_l l * CE_l / sum_l l over the exits and the final head (l = 1..L), so the method's
     tensors also learn to make early layers separable, at some cost to the final head.
   The default was chosen by measurement (docs/training.md, bench/exit_training.py).
2. **Confidence predictors** (in the spirit of BERxiT's learning-to-exit module, Xin et al. 2021):
   per exit, an MLP over [pooled ; exit logits] trained with BCE on the training set, classifiers
   frozen, towards `--exit-target` (`confidence_targets`). The default, ``safe``, is "exiting here
   loses nothing against the full depth": not (the exit is wrong and the full-depth head right).
   That is exactly the per-row term the calibration bounds, so rows the full depth gets wrong
   anyway (label noise, hard rows) count as safe instead of teaching the predictor that the exit
   is unsure. BERxiT's own target, ``right`` (the exit's argmax is the gold label), and ``agrees``
   (it is the full depth's argmax) are kept for comparison: measured on sst2 and agnews
   (docs/training.md), ``safe`` lost less than ``right`` at the same mean exit layer on both, and
   ``agrees`` was best on sst2 but worst on agnews. (Out-of-fold targets from 5-fold cross-fitted
   classifiers were measured too: no better ranking, so not kept.)
3. **Calibration** on dev: simulate every policy over a sweep of thresholds from the dev set's
   per-layer tables, and keep, per policy, the most aggressive threshold (lowest mean exit layer)
   whose accuracy loss vs the full-depth task is within `--exit-max-drop` points *with one-sided
   confidence* `--exit-confidence`: the paired upper bound drop + z * SE(drop) over dev rows, where
   each row contributes [full depth right] - [policy right] (0 on rows the policy answers as the
   full depth does), so the bound is wide exactly where many rows change answer. The point
   estimate alone was on target on average but, at 692 dev rows, lost more than a point on a fresh
   test-sized sample 20-25% of the time (docs/training.md). The confidence policy's becomes the
   task's stored default (`ExitWeights.policy`); all three, and a thinned accuracy / mean-exit-layer
   curve, go to `ExitWeights.calibration` in the bundle.

Steps 1 (two-stage) to 3 read the frozen layers' pooled states once per split (`collect`) and
then train on those cached features: they cost one no-gradient pass over train and one over dev.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.engine import Engine
from service.engine.task import Task
from service.engine.types import ClassifyItem
from service.methods.exits import ExitPolicy, ExitWeights
from service.methods.head import pool
from training.config import EXIT_LOSSES, EXIT_TARGETS, TrainConfig
from training.data import LabelledData

__all__ = ["EXIT_LOSSES", "EXIT_TARGETS", "train_exits", "weighted_loss", "calibrate", "collect", "tables", "simulate", "sweep"]
# Steps 1 (two-stage) and 2 fit small layers on cached features, 10 epochs of 64 rows with the best
# dev epoch kept per layer. Classifiers: Adam at the linear probe's rate (Kingma & Ba's default, as
# `head` training). Confidence MLPs: 1e-2; measured on sst2 (2,000 rows) from a logit-spread start,
# test AUC of "exit is right" per exit was 0.68-0.76 at 1e-3 and 0.71-0.77 at 1e-2.
CLASSIFIER_LR = 1e-3
CONFIDENCE_LR = 1e-2
FIT_EPOCHS = 10
FIT_BATCH = 64
# Calibration: at most this many thresholds per policy (midpoints between distinct dev values, so
# no dev row sits on a threshold), and this many points of each curve kept in the bundle.
SWEEP_POINTS = 400

CURVE_POINTS = 24


# -- 1. reading the layers ---------------------------------------------------------------------------
@dataclass
class LayerFeatures:
    """One split through the frozen task: what every exit and the final head see."""

    pooled: Tensor  # [N, E, H] pooled states after layers 1..E (E = num_layers - 1), fp32, CPU
    final: Tensor  # [N, labels] the task head's (full-depth) logits
    labels: Tensor  # [N] gold label ids

    @property
    def exits(self) -> int:
        return self.pooled.shape[1]


def exit_logits_at(exits: ExitWeights, states: Sequence[Any], pooling: str | None = None) -> list[tuple[Tensor, Tensor]]:
    """(pooled [B, H], exit logits [B, labels]) after each exit layer, from `Engine.layer_states`
    states: the same `pool` and `ExitWeights.exit_logits` that `ExitBatch.decide` runs."""
    out = []
    for layer in sorted(exits.layers):
        st = states[layer]
        pooled = pool(st.hidden, st.keep, st.text_start, st.text_len, pooling or exits.pooling)
        out.append((pooled, exits.exit_logits(layer, pooled)))
    return out


def collect(engine: Engine, task: Task, data: LabelledData, pooling: str, batch_size: int = 64) -> LayerFeatures:
    """Run `data` through the task once (no gradient) and keep every exit layer's pooled state."""
    pairs = data.text_pairs or ("",) * len(data)
    order = sorted(range(len(data)), key=lambda i: len(data.texts[i]) + len(pairs[i]))  # less padding
    n_exits = engine.backbone.encoder.num_layers - 1
    pooled = torch.empty(len(data), n_exits, engine.backbone.info.hidden_size)
    final: Tensor | None = None
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            items = [ClassifyItem(task, data.texts[r], None if data.text_pairs is None else data.text_pairs[r]) for r in rows]
            states, logits = engine.layer_states(engine.tokenize(items))
            z = torch.stack(logits).float().cpu()  # [b, labels]
            if final is None:
                final = torch.empty(len(data), z.shape[1])
            idx = torch.tensor(rows)
            final[idx] = z
            for layer in range(n_exits):
                st = states[layer]
                pooled[idx, layer] = pool(st.hidden, st.keep, st.text_start, st.text_len, pooling).float().cpu()
    assert final is not None
    return LayerFeatures(pooled, final, torch.tensor(data.label_ids, dtype=torch.long))


# -- the weighted (PABEE) loss, used inside the task's own training loop -------------------------------
def weighted_loss(engine: Engine, items: Sequence[ClassifyItem], exits: ExitWeights, targets: Tensor,
                  dropout: float = 0.0) -> Tensor:
    """sum_l l * CE_l / sum_l l over exits l = 1..L-1 and the final head (l = L): deeper layers,
    which can be right more often, weigh more (PABEE's weighted average, Zhou et al. 2020, eq. 5)."""
    states, final = engine.layer_states(engine.tokenize(items), dropout)
    terms = [(len(states), F.cross_entropy(torch.stack(final), targets))]
    for layer, (_, z) in zip(sorted(exits.layers), exit_logits_at(exits, states)):
        terms.append((layer + 1, F.cross_entropy(z, targets)))
    return sum(w * ce for w, ce in terms) / sum(w for w, _ in terms)


# -- 1 (two-stage) and 2: fitting on cached features -----------------------------------------------------
def fit_classifiers(exits: ExitWeights, train: LayerFeatures, dev: LayerFeatures, generator: torch.Generator) -> dict[int, float]:
    """DeeBERT's second stage: fit every exit's linear classifier on the frozen layer's pooled
    states (cross-entropy, Adam); per layer the best dev-accuracy epoch is kept. Returns the
    dev accuracy per exit layer."""
    layers = sorted(exits.layers)
    params = {layer: [exits.layers[layer][0], exits.layers[layer][1]] for layer in layers}

    def dev_acc(e: int, layer: int) -> float:
        with torch.no_grad():
            z = exits.exit_logits(layer, dev.pooled[:, e].to(params[layer][0]))
            return float((z.argmax(-1).cpu() == dev.labels).float().mean())

    return _fit(layers, params, train, generator, dev_acc, CLASSIFIER_LR, higher_is_better=True,
                loss=lambda e, layer, rows: F.cross_entropy(
                    exits.exit_logits(layer, train.pooled[rows, e].to(params[layer][0])),
                    train.labels[rows].to(params[layer][0].device)))


def all_exit_logits(exits: ExitWeights, feats: LayerFeatures) -> Tensor:
    """[N, E, labels] every exit's logits on every row (no gradient)."""
    with torch.no_grad():
        return torch.stack([exits.exit_logits(layer, feats.pooled[:, e].to(exits.layers[layer][0])).float().cpu()
                            for e, layer in enumerate(sorted(exits.layers))], dim=1)


def confidence_targets(z: Tensor, feats: LayerFeatures, target: str) -> Tensor:
    """[N, E] what each exit's confidence MLP is trained to predict, per row:
    * ``right``: the exit's argmax is the gold label (BERxiT);
    * ``agrees``: it is the full-depth head's argmax;
    * ``safe``: exiting there loses nothing against the full depth, i.e. not (the exit is wrong
      and the full depth right): rows the full depth gets wrong are safe anywhere."""
    exit_right = z.argmax(-1) == feats.labels[:, None]
    if target == "right":
        return exit_right.float()
    full_pred = feats.final.argmax(-1)[:, None]
    if target == "agrees":
        return (z.argmax(-1) == full_pred).float()
    if target == "safe":
        return (exit_right | (full_pred != feats.labels[:, None])).float()
    raise ValueError(f"confidence target must be one of {', '.join(EXIT_TARGETS)}, got {target!r}")


def fit_confidence(exits: ExitWeights, train: LayerFeatures, dev: LayerFeatures, generator: torch.Generator,
                   target: str = "safe") -> dict[int, float]:
    """BERxiT's learning-to-exit: every exit's confidence MLP learns P(`target`) (see
    `confidence_targets`) with BCE, classifiers frozen; per layer the best dev-BCE epoch is kept.
    Returns dev BCE per layer."""
    layers = sorted(exits.layers)
    params = {layer: list(exits.layers[layer][2:]) for layer in layers}
    z_train = all_exit_logits(exits, train)
    z_dev = all_exit_logits(exits, dev)
    y_train = confidence_targets(z_train, train, target)  # [N, E]
    y_dev = confidence_targets(z_dev, dev, target)

    def bce(feats: LayerFeatures, z: Tensor, y: Tensor, e: int, layer: int, rows) -> Tensor:
        like = params[layer][0]
        p = exits.confidence(layer, feats.pooled[rows, e].to(like), z[rows, e].to(like)).clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(p, y[rows, e].to(like))

    def dev_loss(e: int, layer: int) -> float:
        with torch.no_grad():
            return float(bce(dev, z_dev, y_dev, e, layer, slice(None)))

    return _fit(layers, params, train, generator, dev_loss, CONFIDENCE_LR, higher_is_better=False,
                loss=lambda e, layer, rows: bce(train, z_train, y_train, e, layer, rows))


def _fit(layers: list[int], params: dict[int, list[Tensor]], train: LayerFeatures, generator: torch.Generator,
         score, lr: float, higher_is_better: bool, loss) -> dict[int, float]:
    """Adam over every layer's own tensors at once (their losses are independent, so one summed
    loss trains each as if alone), FIT_EPOCHS epochs of FIT_BATCH rows; per layer the best epoch
    by `score(e, layer)` is kept."""
    flat = [t for layer in layers for t in params[layer]]
    for t in flat:
        t.requires_grad_(True)
    opt = torch.optim.Adam(flat, lr=lr)
    sign = 1.0 if higher_is_better else -1.0
    best = {layer: (sign * score(e, layer), [t.detach().clone() for t in params[layer]]) for e, layer in enumerate(layers)}
    n = train.pooled.shape[0]
    for _ in range(FIT_EPOCHS):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, FIT_BATCH):
            rows = order[i : i + FIT_BATCH]
            total = sum(loss(e, layer, rows) for e, layer in enumerate(layers))
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        for e, layer in enumerate(layers):
            s = sign * score(e, layer)
            if s > best[layer][0]:
                best[layer] = (s, [t.detach().clone() for t in params[layer]])
    with torch.no_grad():
        for layer in layers:
            for t, b in zip(params[layer], best[layer][1]):
                t.copy_(b)
    return {layer: sign * best[layer][0] for layer in layers}


# -- 3. calibration --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExitTables:
    """What every policy looks at, per row and exit: enough to replay `ExitBatch.decide` exactly."""

    confidence: Tensor  # [N, E]
    entropy: Tensor  # [N, E] nats
    top: Tensor  # [N, E] argmax
    final_pred: Tensor  # [N] the task head's argmax (layer L)
    labels: Tensor  # [N]

    @property
    def layers(self) -> int:
        return self.top.shape[1] + 1


def tables(exits: ExitWeights, feats: LayerFeatures) -> ExitTables:
    conf, ent, top = [], [], []
    with torch.no_grad():
        for e, layer in enumerate(sorted(exits.layers)):
            x = feats.pooled[:, e].to(exits.layers[layer][0])
            z = exits.exit_logits(layer, x)
            conf.append(exits.confidence(layer, x, z).float().cpu())
            prob = torch.softmax(z.float(), dim=-1)
            ent.append((-(prob * prob.clamp_min(1e-12).log()).sum(-1)).cpu())
            top.append(z.argmax(-1).cpu())
    return ExitTables(torch.stack(conf, 1), torch.stack(ent, 1), torch.stack(top, 1),
                      feats.final.argmax(-1), feats.labels)


def simulate(t: ExitTables, policy: ExitPolicy) -> tuple[Tensor, Tensor]:
    """Per row: (prediction, 1-based answering layer) under `policy`, as `Engine.run` would."""
    n, e = t.top.shape
    if policy.name == "off":
        hit = torch.zeros(n, e, dtype=torch.bool)
    elif policy.name == "confidence":
        hit = t.confidence.double() >= policy.threshold
    elif policy.name == "entropy":
        hit = t.entropy.double() <= policy.threshold
    else:  # patience: run length of equal consecutive argmaxes, counted from the first exit
        streak = torch.ones(n, e, dtype=torch.long)
        for k in range(1, e):
            streak[:, k] = torch.where(t.top[:, k] == t.top[:, k - 1], streak[:, k - 1] + 1, 1)
        hit = streak >= policy.threshold
    any_hit = hit.any(1)
    first = hit.float().argmax(1)  # first True (0 where none; masked below)
    pred = torch.where(any_hit, t.top.gather(1, first[:, None]).squeeze(1), t.final_pred)
    layer = torch.where(any_hit, first + 1, torch.full_like(first, t.layers))
    return pred, layer


@dataclass(frozen=True)
class Point:
    threshold: float
    accuracy: float
    mean_exit_layer: float
    drop_se: float = 0.0  # standard error of (full-depth accuracy - accuracy), paired over the rows


def sweep(t: ExitTables, name: str) -> list[Point]:
    """Accuracy and mean exit layer at each candidate threshold of policy `name`."""
    if name == "patience":
        thresholds = [float(p) for p in range(1, t.layers)]  # p = L would never exit: that is "off"
    else:
        values = (t.confidence if name == "confidence" else t.entropy).double().flatten().unique()  # sorted
        mids = (values[1:] + values[:-1]) / 2
        if mids.numel() > SWEEP_POINTS:
            mids = mids[torch.linspace(0, mids.numel() - 1, SWEEP_POINTS).round().long().unique()]
        thresholds = mids.tolist()
    full_right = (t.final_pred == t.labels).double()  # [N]
    n = full_right.numel()
    out = []
    for th in thresholds:
        pred, layer = simulate(t, ExitPolicy(name, th))
        right = (pred == t.labels).double()
        diff = full_right - right  # [N] in {-1, 0, 1}: nonzero only where the policy changes the answer
        se = float(diff.std()) / math.sqrt(n) if n > 1 else 0.0
        out.append(Point(th, float(right.mean()), float(layer.double().mean()), se))
    return out


def pick(points: Sequence[Point], floor: float, name: str, z: float = 0.0) -> Point | None:
    """The most aggressive point (lowest mean exit layer, then higher accuracy) reached by walking
    from the most conservative threshold towards aggressive ones until the accuracy's lower bound,
    accuracy - z * drop_se, first falls below `floor`. None if even the most conservative one is
    below it. z = 0 compares the point estimate.

    Stopping at the first violation, rather than taking any point above the floor, keeps a noisy
    dev curve from choosing an aggressive threshold that is above the floor by luck past a dip:
    measured on sst2 (3 seeds, docs/training.md), "any point above the floor" lost 1.1-3.4 test
    points (confidence, entropy) for a 0.5-point dev target; this rule 0.6-2.2, at up to 1.2 more
    layers."""
    careful = 1.0 if name in ("confidence", "patience") else -1.0  # higher confidence / patience, lower entropy
    best = None
    for p in sorted(points, key=lambda p: -careful * p.threshold):  # most conservative first
        if p.accuracy - z * p.drop_se < floor - 1e-12:
            break
        if best is None or (p.mean_exit_layer, -p.accuracy) < (best.mean_exit_layer, -best.accuracy):
            best = p
    return best


def thin(points: Sequence[Point], k: int = CURVE_POINTS) -> list[list[float]]:
    """At most k points, evenly spread over the curve, as [threshold, accuracy, mean exit layer]."""
    pts = sorted(points, key=lambda p: p.mean_exit_layer)
    if len(pts) > k:
        pts = [pts[round(i * (len(pts) - 1) / (k - 1))] for i in range(k)]
    return [[round(p.threshold, 6), round(p.accuracy, 6), round(p.mean_exit_layer, 4)] for p in pts]


def calibrate(t: ExitTables, max_drop_points: float, confidence: float = 0.5) -> tuple[ExitPolicy, dict[str, Any]]:
    """The stored default policy and the bundle's calibration record.

    Per policy, the most aggressive threshold (see `pick`) whose accuracy loss vs the full-depth
    task is within `max_drop_points` with one-sided `confidence`: the point estimate plus z standard
    errors of the paired difference, z = the normal quantile at `confidence` (0.5: the point
    estimate alone). The default is the confidence policy at its threshold, or ``off`` where no
    threshold keeps within the target (then exits only run when asked)."""
    full = float((t.final_pred == t.labels).double().mean())
    floor = full - max_drop_points / 100.0
    z = statistics.NormalDist().inv_cdf(confidence)
    policies: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for name in ("confidence", "entropy", "patience"):
        pts = sweep(t, name)
        best = pick(pts, floor, name, z)
        curves[name] = thin(pts)
        policies[name] = ({"threshold": None, "met": False} if best is None else
                          {"threshold": best.threshold, "accuracy": best.accuracy,
                           "mean_exit_layer": best.mean_exit_layer,
                           "drop_bound_points": round(100 * (full - best.accuracy + z * best.drop_se), 4),
                           "met": True})
    conf = policies["confidence"]
    default = ExitPolicy("confidence", conf["threshold"]) if conf["met"] else ExitPolicy("off")
    record = {
        "split": "dev",
        "rows": int(t.labels.numel()),
        "layers": t.layers,
        "max_drop_points": max_drop_points,
        # the rule: drop + z * SE(drop), paired over dev rows, <= max_drop_points (one-sided `confidence`)
        "rule": "paired upper bound",
        "confidence": confidence,
        "z": round(z, 4),
        "full_depth_accuracy": full,
        "exit_accuracy": [round(float(a), 6) for a in (t.top == t.labels[:, None]).double().mean(0)],  # per exit layer
        "policies": policies,
        "curves": curves,  # per policy: [threshold, dev accuracy, mean exit layer], by exit layer
    }
    return default, record


def calibrated(exits: ExitWeights, dev: LayerFeatures, max_drop_points: float, confidence: float = 0.5,
               **record_extra: Any) -> ExitWeights:
    """`exits` with its calibrated default policy and calibration record (plus `record_extra`)."""
    policy, record = calibrate(tables(exits, dev), max_drop_points, confidence)
    return dataclasses.replace(exits, policy=policy, calibration={**record, **record_extra})


def train_exits(engine: Engine, task: Task, train: LabelledData, dev: LabelledData, exits: ExitWeights,
                config: TrainConfig, generator: torch.Generator) -> ExitWeights:
    """Steps 1 (two-stage: the classifiers; weighted: already trained with the task), 2 and 3 over
    the trained, frozen task. Returns the exits to store, with their calibrated policy."""
    train_f = collect(engine, task, train, exits.pooling, config.eval_batch_size)
    dev_f = collect(engine, task, dev, exits.pooling, config.eval_batch_size)
    if config.exit_loss == "two-stage":
        fit_classifiers(exits, train_f, dev_f, generator)
    fit_confidence(exits, train_f, dev_f, generator, target=config.exit_target)
    return calibrated(exits, dev_f, config.exit_max_drop, config.exit_confidence, confidence_target=config.exit_target)
