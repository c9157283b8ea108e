"""Early exit: an internal classifier after every layer but the last, plus a learned confidence
predictor per exit, so easy inputs leave the encoder early.

* internal classifier at layer l: pool the layer's hidden states the way the task head does, then
  a linear layer to the task's labels (DeeBERT / PABEE "off-ramps");
* confidence predictor at layer l (BERxiT's learning-to-exit module): a one-hidden-layer MLP over
  [pooled hidden ; exit logits] whose sigmoid estimates P(this exit's answer is right).

Policies, per task (stored default) and overridable per request:
* ``confidence`` (default): exit when the predicted correctness >= threshold;
* ``entropy`` (DeeBERT): exit when the entropy of the exit's softmax <= threshold;
* ``patience`` (PABEE): exit when `patience` consecutive exits agree on the argmax;
* ``off``: run every layer; output is exactly the no-exit path.
The final layer is always answered by the task's ordinary head.
"""
from __future__ import annotations

import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from service.engine.spec import BackboneInfo
from service.methods.base import Method, MethodBatch, Problems, TaskWeights, register, take, trainable
from service.methods.head import POOLINGS, pool

POLICIES = ("confidence", "entropy", "patience", "off")
# Defaults where no calibration is stored: 0.9 correctness, entropy 0.3 nats (DeeBERT's sweeps use
# 0.1..0.7 on 2-class tasks), patience 2 (PABEE's best on GLUE small tasks was 6 of 12 layers; 2 of 6
# scales that to our depth).
DEFAULT_THRESHOLDS = {"confidence": 0.9, "entropy": 0.3, "patience": 2.0, "off": 0.0}
_KEY = re.compile(r"^exits\.(\d+)\.(out|conf1|conf2)\.(weight|bias)$")
CONF_HIDDEN = 64  # the confidence MLP's width; BERxiT uses a single hidden layer of this order


@dataclass(frozen=True)
class ExitPolicy:
    name: str = "confidence"
    threshold: float = DEFAULT_THRESHOLDS["confidence"]

    def __post_init__(self):
        # A stored default is held to the request's rules (`threshold_problem`), so a bundle
        # cannot keep a policy no request could ask for.
        if self.name not in POLICIES:
            raise ValueError(f"early-exit policy must be one of {POLICIES}, got {self.name!r}")
        problem = threshold_problem(self.name, self.threshold)
        if problem:
            raise ValueError(problem)


# What each policy's threshold must be: the rule for a request's `early_exit` and a stored policy.
THRESHOLD_RULES = {
    "confidence": "a confidence threshold is a probability in [0, 1]",
    "entropy": "an entropy threshold is >= 0 nats",
    "patience": "patience is a whole number of layers >= 1",
}
_FINITE = "an early-exit threshold must be a finite number"
_FLOAT_RANGE = "±1.8e308"  # sys.float_info.max: past it a JSON number fits no float
READ_AS_INF = f"JSON numbers beyond {_FLOAT_RANGE}, such as 1e400, read as inf"


def too_long_for_float(value: Any) -> bool:
    """A JSON integer no float holds (past ±1.8e308): JSON integers have no size limit, and
    float() of one raises OverflowError."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max


def threshold_problem(policy: str, t: float) -> str | None:
    """What is wrong with threshold `t` for `policy`, or None: the one rule for a request's
    `early_exit` (service/api/schemas.py) and a bundle's stored policy. `t` may be any JSON number,
    an integer too long for a float included."""
    rule = THRESHOLD_RULES.get(policy, _FINITE)
    if too_long_for_float(t):
        return f"{rule}, got a {len(str(abs(t)))}-digit number: out of range (beyond {_FLOAT_RANGE})"
    if math.isnan(t):
        return f"{_FINITE}, got {t!r}"
    if math.isinf(t):
        return f"{_FINITE}, got {t!r} ({READ_AS_INF})" if rule == _FINITE else \
            f"{rule}, got {t!r}: it must be a finite number ({READ_AS_INF})"
    if policy == "confidence" and not 0.0 <= t <= 1.0:
        return f"{rule}, got {t!r}"
    if policy == "entropy" and t < 0.0:
        return f"{rule}, got {t!r}"
    if policy == "patience" and (t < 1 or t != int(t)):
        return f"{rule}, got {t!r}"
    return None


def patience_problem(patience: float, exits: int) -> str | None:
    """Patience that `exits` exit layers can never reach, or None: no `patience` consecutive exits
    can agree, so every row would run every layer, which is `off` under another name."""
    if patience <= exits:
        return None
    return (f"patience {patience:g} is more than the task's {exits} exit layer{'' if exits == 1 else 's'}, so no row "
            f"could exit early: use at most {exits} (or policy 'off' to run every layer)")


@dataclass(frozen=True)
class ExitWeights(TaskWeights):
    method = "exits"
    pooling: str
    # layer -> (out_w [n, H], out_b [n], conf1_w [k, H + n], conf1_b [k], conf2_w [1, k], conf2_b [1])
    layers: dict[int, tuple[Tensor, ...]]
    policy: ExitPolicy = field(default_factory=ExitPolicy)
    calibration: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for layer, (ow, ob, c1w, c1b, c2w, c2b) in sorted(self.layers.items()):
            p = f"exits.{layer}"
            out.update({f"{p}.out.weight": ow, f"{p}.out.bias": ob, f"{p}.conf1.weight": c1w,
                        f"{p}.conf1.bias": c1b, f"{p}.conf2.weight": c2w, f"{p}.conf2.bias": c2b})
        return out

    def config(self) -> dict[str, Any]:
        # `off` has no threshold: null, as `adaptserve evaluate --json` shows it (a number stored
        # there by earlier versions still loads, and is not used)
        threshold = None if self.policy.name == "off" else self.policy.threshold
        return {"pooling": self.pooling, "layers": sorted(self.layers), "policy": self.policy.name,
                "threshold": threshold, "calibration": self.calibration}

    @classmethod
    def init(cls, info: BackboneInfo, *, num_labels: int, pooling: str = "cls", hidden: int = CONF_HIDDEN,
             generator: torch.Generator | None = None) -> "ExitWeights":
        """Fresh trainable exits for layers 0..L-2. Classifiers: N(0, 0.02) weights, zero biases, as
        BERT heads. Confidence MLPs start as a function of the exit's logits alone: unit i computes
        relu(2 (z_i - mean z)) and the output sums them, a spread of the logits that ranks rows as
        the softmax entropy does; the other units (N(0, 0.02) in, 0 out) and training add what the
        pooled state knows. Measured (docs/training.md): from N(0, 0.02) everywhere the predictor
        ranked rows worse than entropy (test AUC of "exit is right" 0.57-0.74 per exit on sst2,
        entropy 0.71-0.76); from this start 0.72-0.78 (agnews: 0.80-0.83 vs entropy 0.77-0.79)."""
        h, n = info.hidden_size, num_labels
        normal = lambda *s: torch.empty(*s).normal_(0.0, 0.02, generator=generator)  # noqa: E731
        layers = {}
        for layer in range(info.num_layers - 1):
            c1w, c2w = normal(hidden, h + n), torch.zeros(1, hidden)
            k = min(n, hidden)
            c1w[:k] = 0.0
            c1w[:k, h:] = 2.0 * (torch.eye(n)[:k] - 1.0 / n)  # unit i: 2 (z_i - mean z)
            c2w[0, :k] = 1.0
            layers[layer] = tuple(trainable(t, info) for t in (normal(n, h), torch.zeros(n), c1w, torch.zeros(hidden),
                                                               c2w, torch.zeros(1)))
        return cls(pooling=pooling, layers=layers)

    def threshold_for(self, policy: str) -> float:
        """The threshold for a request that names only `policy`: this task's calibrated one
        (`adaptserve train --early-exit` stores one per policy), else `DEFAULT_THRESHOLDS`."""
        if policy == self.policy.name and policy != "off":
            return self.policy.threshold
        stored = (self.calibration.get("policies") or {}).get(policy) or {}
        return float(stored["threshold"]) if stored.get("threshold") is not None else DEFAULT_THRESHOLDS[policy]

    def policy_problems(self) -> list[str]:
        """Stored patience thresholds (the policy's, the calibrated one) this task's exit layers can
        never reach (`patience_problem`): refused at upload. A bundle stored before is still served;
        such a patience runs every layer, as `off` does."""
        stored = (self.calibration.get("policies") or {}).get("patience") or {}
        problems = []
        for where, value in (("threshold", self.policy.threshold if self.policy.name == "patience" else None),
                             ("calibration.policies.patience.threshold", stored.get("threshold"))):
            if value is not None and (problem := patience_problem(float(value), len(self.layers))):
                problems.append(f"exits: {where}: {problem}")
        return problems

    def exit_logits(self, layer: int, pooled: Tensor) -> Tensor:
        ow, ob = self.layers[layer][:2]
        return pooled @ ow.T + ob  # [n_rows, labels]

    def confidence(self, layer: int, pooled: Tensor, logits: Tensor) -> Tensor:
        """The exit's confidence, [n_rows]: the predicted probability of what the task's
        predictors were trained towards (`calibration["confidence_target"]`; by default that
        answering here loses nothing against the full depth, training/exits.py)."""
        _, _, c1w, c1b, c2w, c2b = self.layers[layer]
        z = torch.relu(torch.cat([pooled, logits], dim=-1) @ c1w.T + c1b)
        return torch.sigmoid(z @ c2w.T + c2b).squeeze(-1)


def _shown(value: Any) -> str:
    """A stored value for a message: whole if short, else its start and its length."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:16]}... ({len(text)} characters)"


def _stored_threshold(policy: Any, value: Any) -> float:
    """A threshold from a bundle as a float; ValueError naming the rule where it is no number
    or no float can hold it (a JSON integer has no size limit, and float() of 400 digits raises
    OverflowError, which no bundle check expected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"a threshold is a number, got {type(value).__name__}")
    problem = threshold_problem(policy if isinstance(policy, str) else "", value if too_long_for_float(value) else float(value))
    if problem:
        raise ValueError(problem)
    return float(value)


def _calibration_problems(calibration: Any) -> list[str]:
    """What is wrong with a bundle's calibration record where the service reads it: a request
    naming only a policy takes `policies.<policy>.threshold` (null: not calibrated, the default
    applies). The rest of the record is kept as written and only shown (`GET /v1/tasks/{task}`)."""
    if not isinstance(calibration, dict):
        return [f"calibration must be a JSON object, got {type(calibration).__name__}"]
    stored = calibration.get("policies")
    if stored is None:
        return []
    if not isinstance(stored, dict):
        return [f"calibration.policies must be a JSON object of policy -> {{\"threshold\": ...}}, got {type(stored).__name__}"]
    problems = []
    for name in THRESHOLD_RULES:  # the policies a threshold applies to
        record = stored.get(name)
        if record is None:
            continue
        if not isinstance(record, dict):
            problems.append(f"calibration.policies.{name} must be a JSON object, got {type(record).__name__}")
        elif record.get("threshold") is not None:
            try:
                _stored_threshold(name, record["threshold"])
            except ValueError as e:
                problems.append(f"calibration.policies.{name}.threshold {_shown(record['threshold'])}: {e}")
    return problems


def _most_common_rows(tensors: Mapping[str, Tensor], layers: Sequence[int], part: str) -> int | None:
    """The row count most layers' 2-D `exits.<layer>.<part>.weight` have (the lowest layer's among
    equals), or None where no layer has one."""
    rows = [t.shape[0] for layer in layers if (t := tensors.get(f"exits.{layer}.{part}.weight")) is not None and t.dim() == 2]
    return Counter(rows).most_common(1)[0][0] if rows else None


def _classifier_problem(tensors: Mapping[str, Tensor], layers: Sequence[int], n: int, num_labels: int, h: int) -> str:
    """Exit classifiers whose outputs are not the labels: each misfit shape and its layers."""
    shapes: dict[tuple[int, ...], list[int]] = {}
    for layer in layers:
        t = tensors.get(f"exits.{layer}.out.weight")
        if t is not None and tuple(t.shape) != (num_labels, h):
            shapes.setdefault(tuple(t.shape), []).append(layer)
    found = ", ".join(f"{list(shape)} on layer{'s' if len(at) > 1 else ''} {at}" for shape, at in shapes.items())
    return (f"exit classifiers have {n} outputs but {num_labels} labels are named: exits.<layer>.out.weight is {found}, "
            f"expected [{num_labels}, {h}] (and exits.<layer>.out.bias [{num_labels}])")


# Policy codes for the per-row tables: the decision is one vectorised comparison per policy.
_CODES = {"confidence": 1, "entropy": 2, "patience": 3}


class ExitBatch(MethodBatch):
    """Per-row exit decisions. Carries per-row policy (code + threshold) and PABEE's agreement
    counters as [B] tensors so that compaction (`select`) keeps them aligned with surviving rows.

    The decision after a layer is vectorised per task present: pool its rows, one exit classifier
    matmul, and only the statistics its rows' policies need (the confidence MLP, the entropy, the
    argmax). Measured with the real MiniLM on CPU, the per-row Python loop this replaces added
    ~25% to a batch of 32 that never exits (bench/early_exit.py, docs/training.md)."""

    def __init__(self, parts: Sequence[ExitWeights | None], row_part: Tensor, policy: Sequence[ExitPolicy | None]):
        dev = row_part.device
        code = [0 if p is None or p.name == "off" else _CODES[p.name] for p in policy]
        thr = [0.0 if p is None else float(p.threshold) for p in policy]
        # which statistics each task's rows need (a superset stays valid after compaction)
        needs = {j: {c for c, r in zip(code, row_part.tolist()) if r == j and c} for j in range(len(parts))}
        self._init(parts, row_part, torch.tensor(code, dtype=torch.long, device=dev),
                   torch.tensor(thr, dtype=torch.float64, device=dev),  # float64: compares as the Python float it was
                   torch.full((len(code),), -1, dtype=torch.long, device=dev),
                   torch.zeros(len(code), dtype=torch.long, device=dev), needs)

    def _init(self, parts, row_part, code, threshold, prev, streak, needs) -> None:
        self.parts = parts
        self.row_part = row_part  # [B] index into parts
        self.code = code  # [B] 0 = cannot exit early (no exits, or policy off), else _CODES
        self.threshold = threshold  # [B] float64
        self.prev = prev  # [B] previous exit's argmax (patience), -1 before the first exit
        self.streak = streak  # [B] consecutive exits agreeing with prev
        self.needs = needs  # part -> policy codes its rows use

    def active(self) -> bool:
        return bool((self.code > 0).any())

    def select(self, rows: Tensor) -> "ExitBatch":
        out = ExitBatch.__new__(ExitBatch)
        out._init(self.parts, self.row_part.index_select(0, rows), self.code.index_select(0, rows),
                  self.threshold.index_select(0, rows), self.prev.index_select(0, rows),
                  self.streak.index_select(0, rows), self.needs)
        return out

    def decide(self, layer: int, hidden: Tensor, keep: Tensor, text_start: Tensor, text_len: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """After `layer`: which rows exit ([B] bool) and their exit logits {row: [labels]}."""
        bsz = hidden.shape[0]
        exit_now = torch.zeros(bsz, dtype=torch.bool, device=hidden.device)
        logits: dict[int, Tensor] = {}
        for j, p in enumerate(self.parts):
            if p is None or layer not in p.layers or not self.needs.get(j):
                continue
            mine = (self.row_part == j) & (self.code > 0)  # [B]
            ri = mine.nonzero().squeeze(1)  # [n] rows of task j that may exit
            n = ri.numel()
            if n == 0:
                continue
            whole = n == bsz  # the common single-task batch: no gather
            sel = (lambda t: t) if whole else (lambda t: t.index_select(0, ri))  # noqa: E731
            pooled = pool(sel(hidden), sel(keep), sel(text_start), sel(text_len), p.pooling)  # [n, H]
            z = p.exit_logits(layer, pooled)  # [n, labels]
            code, thr = sel(self.code), sel(self.threshold)
            go = torch.zeros(n, dtype=torch.bool, device=hidden.device)
            needs = self.needs[j]
            if 1 in needs:  # confidence: predicted P(this exit is right) >= threshold
                go |= (code == 1) & (p.confidence(layer, pooled, z) >= thr)
            if 2 in needs:  # entropy (nats) of the exit's softmax <= threshold
                prob = torch.softmax(z.float(), dim=-1)
                entropy = -(prob * prob.clamp_min(1e-12).log()).sum(-1)
                go |= (code == 2) & (entropy <= thr)
            if 3 in needs:  # patience: `threshold` consecutive exits agree on the argmax
                top = z.argmax(-1)
                streak = torch.where(sel(self.prev) == top, sel(self.streak) + 1, torch.ones_like(top))
                pat = code == 3
                self.streak[ri] = torch.where(pat, streak, sel(self.streak))
                self.prev[ri] = torch.where(pat, top, sel(self.prev))
                go |= pat & (streak >= thr)
            if not bool(go.any()):
                continue
            exit_now[ri] = go
            rows = ri.tolist()
            for k in go.nonzero().squeeze(1).tolist():
                logits[rows[k]] = z[k]
        return exit_now, logits


@register
class Exits(Method):
    name = "exits"
    order = 95
    stage = "output"

    def parse(self, section: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo, *,
              num_labels: int | None = None) -> ExitWeights:
        """`num_labels`: the labels the bundle names, when it names them well (each exit classifier
        has one output per label); without it, the outputs most layers agree on are expected."""
        problems = Problems("exits")
        pooling = section.get("pooling", "cls")
        if pooling not in POOLINGS:
            problems.add(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        name = section.get("policy", "confidence")
        threshold = section.get("threshold", DEFAULT_THRESHOLDS.get(name, 0.9) if isinstance(name, str) else 0.9)
        try:
            policy = ExitPolicy("off") if name == "off" and threshold is None else ExitPolicy(name, _stored_threshold(name, threshold))
        except (ValueError, TypeError) as e:  # not a number, or outside what a request may ask for
            problems.add(f"stored policy {name!r} with threshold {_shown(threshold)}: {e}")
            policy = ExitPolicy()
        calibration = section.get("calibration")
        calibration = {} if calibration is None else calibration  # "", [], 0 and false are no object either
        for problem in _calibration_problems(calibration):
            problems.add(problem)
        layers_found = sorted({int(m.group(1)) for m in map(_KEY.match, tensors) if m})
        for k in tensors:
            if not _KEY.match(k):
                problems.add(f"unrecognised exits tensor {k!r}")
        stated = section.get("layers")  # optional; `ExitWeights.config` lists the layers the tensors hold
        if stated is not None:
            if not isinstance(stated, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in stated):
                problems.add(f"'layers' must be a list of layer indices, got {_shown(stated)}")
            elif sorted(set(stated)) != layers_found:
                problems.add(f"'layers' is {sorted(set(stated))}, but the exits.* tensors hold exit classifiers for "
                             f"layers {layers_found}")
        bad = [x for x in layers_found if x >= backbone.num_layers - 1]
        if bad:
            problems.add(f"exit classifiers for layers {bad}, but only layers 0..{backbone.num_layers - 2} can exit early "
                         f"(the last layer is answered by the head)")
        # Every layer's classifier has the same labels and every confidence MLP the same width: the
        # shapes most layers agree on are the expected ones, so one malformed tensor is named as
        # such, not taken as the rule for the layers after it.
        n = _most_common_rows(tensors, layers_found, "out")
        if n is None:
            problems.add("no exit classifier tensors (exits.<layer>.out.weight)")
            problems.raise_if_any()
        if num_labels is not None and n != num_labels:
            # Most classifiers misfit the labels: one problem naming their shapes. Taken as the rule,
            # they would blame every confidence MLP sized for the labels (which read H + labels).
            problems.add(_classifier_problem(tensors, [x for x in layers_found if x not in bad], n, num_labels,
                                             backbone.hidden_size))
            problems.raise_if_any()
        k = _most_common_rows(tensors, layers_found, "conf1")
        k, h = CONF_HIDDEN if k is None else k, backbone.hidden_size
        layers = {}
        for layer in layers_found:
            if layer in bad:
                continue
            p = f"exits.{layer}"
            got = (take(tensors, f"{p}.out.weight", (n, h), problems), take(tensors, f"{p}.out.bias", (n,), problems),
                   take(tensors, f"{p}.conf1.weight", (k, h + n), problems), take(tensors, f"{p}.conf1.bias", (k,), problems),
                   take(tensors, f"{p}.conf2.weight", (1, k), problems), take(tensors, f"{p}.conf2.bias", (1,), problems))
            if all(t is not None for t in got):
                layers[layer] = tuple(t.to(device=backbone.device, dtype=backbone.dtype).contiguous() for t in got)
        problems.raise_if_any()
        return ExitWeights(pooling=pooling, layers=layers, policy=policy, calibration=dict(calibration))

    def batch(self, parts: Sequence[TaskWeights | None], row_part: Tensor) -> ExitBatch | None:
        raise NotImplementedError("exits are batched by Engine with per-row policies (Exits.batch_rows)")

    def batch_rows(self, parts: Sequence[ExitWeights | None], row_part: Tensor, policies: list[ExitPolicy | None]) -> ExitBatch | None:
        if all(p is None for p in parts) or all(p is None or p.name == "off" for p in policies):
            return None
        return ExitBatch(parts, row_part, policies)
