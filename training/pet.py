"""PET: pattern-exploiting training (Schick & Schuetze, 2021), semi-supervised.

    adaptserve pet --task sst2 --data train.csv --unlabelled unlabelled.csv --dev dev.csv \\
        --patterns patterns.json --backbone model.gguf --store adapters_store

1. **Teachers.** Each pattern (a template + verbalizer; at least 3) is prompt-tuned on the
   labelled set through the serving forward (`train(..., prompt=PromptSpec(...))`, LoRA by default).
2. **Soft labels.** The teachers' ensemble labels the unlabelled set: per pattern the softmax of
   its label logits at temperature T, averaged over patterns with weights (uniform; PET's "prior"
   weighting, each pattern's accuracy on the training set before training; or each trained
   teacher's dev accuracy).
3. **Student.** A classification-head task on the default sentence encoder (MiniLM, LoRA or an
   adapter + a mean-pooled head) is trained on labelled + soft-labelled rows with a distillation
   loss, KL(target || softmax(student / T)) x T^2 (labelled rows have one-hot targets). The
   student is what gets published: one small task on the shared encoder, no prompt at serving time.

T = 2 is PET's temperature (Schick & Schuetze, 2021, section 3.1, following Hinton et al., 2015's
T^2 gradient scaling so the loss scale does not depend on T).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from service.engine.backbone import Backbone, load_backbone
from service.engine.bundle import bundle_bytes, write_bundle
from training.config import ConfigError, LoraConfig, TrainConfig
from training.data import DataError, EmptyText, FileFormat, LabelledData, Splits, read_texts, read_utf8
from training.metrics import Metrics, compute_metrics
from training.prompting import PromptSpec, parse_verbalizer
from training.trainer import TrainResult, train

MIN_PATTERNS = 3  # PET's ensembles use several patterns; fewer leaves little to ensemble
WEIGHTINGS = ("prior", "dev", "uniform")
DEFAULT_TEMPERATURE = 2.0  # PET (Schick & Schuetze, 2021): T = 2 for the distillation step


@dataclass(frozen=True)
class Pattern:
    """One PET pattern-verbalizer pair."""

    template: str
    label_words: Mapping[str, Sequence[str]] = field(hash=False)
    name: str = ""

    def spec(self) -> PromptSpec:
        return PromptSpec(template=self.template, label_words=self.label_words)


def load_patterns(source: str | Path | Sequence[Mapping[str, Any]]) -> list[Pattern]:
    """Patterns from a JSON file / string / list: `[{"template": "...", "verbalizer": "neg=bad;pos=good"
    or {"neg": ["bad"], ...}, "name": "p1"?}, ...]` (or `{"patterns": [...]}`)."""
    raw: Any = source
    if isinstance(source, (str, Path)):
        text = str(source)
        try:
            # train's reader: a bad byte is named by line and offset, a BOM (which JSON refuses) dropped
            text = read_utf8(Path(text), "a JSON file") if not text.lstrip().startswith(("[", "{")) else text
        except DataError as err:
            raise ConfigError(f"--patterns {err}") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--patterns {source}: not valid JSON: {err}") from None
    if isinstance(raw, Mapping):
        raw = raw.get("patterns")
    if not isinstance(raw, list) or not all(isinstance(p, Mapping) for p in raw):
        raise ConfigError("--patterns must be a JSON list of {\"template\": ..., \"verbalizer\": ...} objects")
    out = []
    for i, p in enumerate(raw):
        if not isinstance(p.get("template"), str) or p.get("verbalizer") is None:
            raise ConfigError(f"--patterns: pattern {i + 1} needs a \"template\" string and a \"verbalizer\"")
        out.append(Pattern(template=p["template"], label_words=parse_verbalizer(p["verbalizer"]),
                           name=str(p.get("name") or f"p{i + 1}")))
    if len(out) < MIN_PATTERNS:
        raise ConfigError(f"--patterns: PET ensembles at least {MIN_PATTERNS} patterns, got {len(out)}")
    return out


def read_unlabelled(path: str | Path, text_column: str = "text", text_pair_column: str | None = None,
                    limit: int | None = None, seed: int = 0, *, file_format: FileFormat | None = None,
                    empty_text: EmptyText = "error") -> tuple[list[str], list[str] | None]:
    """Texts (and pairs) of an unlabelled CSV/TSV/JSONL file, read by train's rules
    (`training.data.read_texts`: the format, the columns, `empty_text`, a problem named by file and
    line); any label column is ignored. `text_pair_column` None: single texts, and a `text_pair`
    column is refused. `limit`: a seeded random subsample of that many rows."""
    data = read_texts(path, file_format=file_format, text_column=text_column, text_pair_column=text_pair_column,
                      empty_text=empty_text)
    if text_pair_column is None and data.has_pairs:  # read_texts takes the default pair column, as train does
        raise DataError(f"{path}: the task classifies single texts (its labelled data has no pairs), but this file has "
                        "a 'text_pair' column; drop the column, or train on pairs")
    rows = list(zip(data.texts, data.text_pairs or [None] * len(data)))
    if limit is not None and len(rows) > limit:
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit].sort().values.tolist()
        rows = [rows[i] for i in pick]
    texts = [t for t, _ in rows]
    return texts, None if text_pair_column is None else [q for _, q in rows]


# -- the ensemble ------------------------------------------------------------------------------------
def ensemble_soft_labels(logits: Sequence[Tensor], weights: Sequence[float] | None = None,
                         temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Soft labels [N, L] from each pattern's logits [N, L]: sum_k w_k softmax(z_k / T) / sum_k w_k."""
    if not logits:
        raise ValueError("no pattern logits to ensemble")
    w = torch.ones(len(logits)) if weights is None else torch.tensor([float(x) for x in weights])
    if w.shape[0] != len(logits) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"pattern weights must be {len(logits)} non-negative numbers with a positive sum, got {w.tolist()}")
    probs = torch.stack([torch.softmax(z.float() / temperature, dim=-1) for z in logits])  # [K, N, L]
    return (probs * (w / w.sum())[:, None, None]).sum(0)  # [N, L]


def distillation_loss(student_logits: Tensor, targets: Tensor, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """KL(targets || softmax(student / T)) x T^2, averaged over the batch (Hinton et al., 2015)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, L]
    return F.kl_div(log_p, targets.to(log_p), reduction="batchmean") * temperature ** 2


# -- the run -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PetConfig:
    # Teachers: LoRA through the template (prompt-based fine-tuning, as LM-BFF fine-tunes through
    # its prompt). LoRA's r/targets/lr defaults are those of `adaptserve train`.
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(method="lora"))
    # Student: LoRA + a mean-pooled head on the sentence encoder; see `TrainConfig`'s defaults.
    student: TrainConfig = field(default_factory=lambda: TrainConfig(method="lora", lora=LoraConfig()))
    temperature: float = DEFAULT_TEMPERATURE
    weighting: str = "prior"  # PET's weighted ensemble: accuracy on the training set before training

    def check(self) -> "PetConfig":
        for role, config in (("teacher", self.teacher), ("student", self.student)):
            try:
                config.check()
            except ConfigError as err:  # name the flag as `adaptserve pet` spells it (--teacher-lr, not --lr)
                raise ConfigError(re.sub(r"--(lr|epochs|max-steps)\b", rf"--{role}-\1", str(err))) from None
        if self.teacher.method not in ("lora", "prompt", "adapter", "prefix"):
            raise ConfigError(f"--teacher-method must be lora, prompt, adapter or prefix, got {self.teacher.method!r}")
        if self.student.method not in ("lora", "adapter", "head", "prompt", "prefix"):
            raise ConfigError(f"--student-method must be lora, adapter, head, prompt or prefix, got {self.student.method!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"--temperature must be a positive finite number, got {self.temperature!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        return self


@dataclass
class Teacher:
    pattern: Pattern
    result: TrainResult
    prior_accuracy: float  # on the labelled training set, before training (PET's weight)
    weight: float


@dataclass
class PetResult:
    student: TrainResult
    teachers: list[Teacher]
    soft_labels: Tensor  # [N_unlabelled, L]
    unlabelled: int
    config: PetConfig
    seconds: float
    label_seconds: float = 0.0  # of `seconds`: the teachers labelling the unlabelled rows

    @property
    def name(self) -> str:
        return self.student.name

    def bundle_config(self) -> dict[str, Any]:
        """The student's bundle config with PET's provenance under `training.pet`."""
        cfg = self.student.bundle_config()
        cfg["training"]["pet"] = {
            "temperature": self.config.temperature,
            "weighting": self.config.weighting,
            "unlabelled_rows": self.unlabelled,
            "teacher_method": self.config.teacher.method,
            "teacher_backbone": self.teachers[0].result.backbone.name,
            "patterns": [{"name": t.pattern.name, "template": t.pattern.template,
                          "label_words": {k: list(v) for k, v in t.pattern.label_words.items()},
                          "prior_accuracy": round(t.prior_accuracy, 6), "weight": round(t.weight, 6),
                          "dev_accuracy": t.result.dev_metrics.accuracy,
                          **({"test_accuracy": t.result.test_metrics.accuracy} if t.result.test_metrics else {})}
                         for t in self.teachers],
        }  # no wall time: it would make every run a new version (TrainResult.bundle_config)
        return cfg

    @property
    def weights(self):
        return self.student.weights


def _accuracy(logits: Tensor, data: LabelledData) -> float:
    return float((logits.argmax(-1) == torch.tensor(data.label_ids)).float().mean())


def run_pet(splits: Splits, unlabelled: Sequence[str], patterns: Sequence[Pattern], config: PetConfig | None = None, *,
            name: str, teacher_backbone: Backbone, student_backbone: Backbone | None = None,
            unlabelled_pairs: Sequence[str] | None = None, progress: bool = True,
            trained: Mapping[int, TrainResult] | None = None) -> PetResult:
    """Train the teachers, soft-label `unlabelled` with their ensemble, distil a student.

    `trained`: teachers already prompt-tuned on these splits, by pattern index (e.g. a plain
    prompt-based fine-tuning run of pattern 0), used as they are instead of training them again."""
    config = (config or PetConfig()).check()
    if len(patterns) < MIN_PATTERNS:
        raise ConfigError(f"PET ensembles at least {MIN_PATTERNS} patterns, got {len(patterns)}")
    if splits.dev is None:
        raise ConfigError("a dev split is required: it chooses each teacher's and the student's checkpoint")
    if not unlabelled:
        raise ConfigError("PET needs unlabelled texts for the teachers to label")
    if (unlabelled_pairs is not None) != splits.train.has_pairs:
        raise ConfigError("the unlabelled rows must have text pairs exactly when the labelled ones do")
    student_backbone = student_backbone if student_backbone is not None else load_backbone(None, dtype="float32")
    _check_backbones(config, patterns, splits.train, teacher_backbone, student_backbone)
    t0 = time.perf_counter()
    train_data = splits.train
    teachers: list[Teacher] = []
    for k, pattern in enumerate(patterns):
        spec = pattern.spec()
        prior = 0.0
        if config.weighting == "prior":  # the untrained pattern, as a zero-shot prompt task
            from training.zeroshot import prompt_task

            zs = prompt_task(f"{name}-{pattern.name}"[:64], pattern.template, dict(pattern.label_words), teacher_backbone,
                             labels=train_data.label_names, pair=train_data.has_pairs, max_length=config.teacher.max_length)
            prior = _accuracy(zs.logits(list(train_data.texts), None if train_data.text_pairs is None else list(train_data.text_pairs)),
                              train_data)
        result = (trained or {}).get(k) or train(splits, config.teacher, name=f"{name}-{pattern.name}"[:64],
                                                 backbone=teacher_backbone, progress=progress, prompt=spec)
        weight = {"prior": prior, "dev": result.dev_metrics.accuracy, "uniform": 1.0}[config.weighting]
        teachers.append(Teacher(pattern, result, prior, weight))
    weights = [t.weight for t in teachers]
    if not sum(weights) > 0:  # every pattern scored 0 before training: fall back to a plain average
        weights = [1.0] * len(teachers)
    logits, t_label = [], time.perf_counter()
    for t in tqdm(teachers, desc="label unlabelled", unit="pattern", disable=not progress):
        logits.append(t.result.logits(list(unlabelled), None if unlabelled_pairs is None else list(unlabelled_pairs)))
    soft = ensemble_soft_labels(logits, weights, config.temperature)  # [N, L]
    label_seconds = time.perf_counter() - t_label

    labels = train_data.label_names
    onehot = F.one_hot(torch.tensor(train_data.label_ids), len(labels)).float()
    targets = torch.cat([onehot, soft])  # [n + N, L]
    student_data = LabelledData(
        texts=tuple(train_data.texts) + tuple(unlabelled),
        text_pairs=None if unlabelled_pairs is None else tuple(train_data.text_pairs or ()) + tuple(unlabelled_pairs),
        labels=tuple(train_data.labels) + tuple(labels[i] for i in soft.argmax(-1).tolist()),
        label_names=labels, source=None,
    )
    dev_targets = targets.to(student_backbone.device)
    temperature = config.temperature

    def loss_fn(student_logits: Tensor, rows: list[int]) -> Tensor:
        return distillation_loss(student_logits, dev_targets[rows], temperature)

    student = train(Splits(student_data, splits.dev, splits.test), config.student, name=name, backbone=student_backbone,
                    progress=progress, loss_fn=loss_fn)
    student.data["labelled"] = {"file": Path(train_data.source).name if train_data.source else None, "rows": len(train_data)}
    student.data["unlabelled"] = {"rows": len(unlabelled)}
    return PetResult(student=student, teachers=teachers, soft_labels=soft, unlabelled=len(unlabelled), config=config,
                     seconds=time.perf_counter() - t0, label_seconds=label_seconds)


def _check_backbones(config: PetConfig, patterns: Sequence[Pattern], train_data: LabelledData,
                     teacher_backbone: Backbone, student_backbone: Backbone) -> None:
    """Everything that would stop the run part way, checked before the first teacher trains: each
    model's method on its backbone, and each pattern (template, words, room within max_length)."""
    for flag, cfg, bb in (("--teacher-method", config.teacher, teacher_backbone),
                          ("--student-method", config.student, student_backbone)):
        try:
            cfg.check_backbone(bb.info.max_positions, bb.info.has_pooler, bb.info.kind, bb.info.hidden_size, bb.info.sites)
        except ConfigError as err:
            raise ConfigError(f"{flag} {cfg.method} on {bb.name}: {err}") from None
    for pattern in patterns:
        try:
            pattern.spec().build(teacher_backbone, train_data.label_names, train_data.has_pairs, config.teacher.max_length)
        except ConfigError as err:
            raise ConfigError(f"--patterns: pattern {pattern.name}: {err}") from None


def ensemble_metrics(result: PetResult, data: LabelledData) -> Metrics:
    """The teachers' weighted ensemble itself on `data` (argmax of the averaged distributions)."""
    logits = [t.result.logits(list(data.texts), None if data.text_pairs is None else list(data.text_pairs)) for t in result.teachers]
    soft = ensemble_soft_labels(logits, [t.weight for t in result.teachers], result.config.temperature)
    return compute_metrics(predictions=soft.argmax(-1).tolist(), references=data.label_ids, label_names=data.label_names)


def save_pet(result: PetResult, store: str | Path) -> str:
    from training.publish import require_finite, require_loadable

    require_finite(result.name, result.student.weights)
    require_loadable(result.name, result.bundle_config(), result.student.weights, result.student.engine.backbone)
    return write_bundle(Path(store), result.name, result.bundle_config(), result.student.weights)


def publish_pet_http(result: PetResult, base_url: str, token: str | None = None):
    from training.publish import require_finite, upload

    require_finite(result.name, result.student.weights)
    cfg_b, w_b = bundle_bytes(result.bundle_config(), result.student.weights)
    return upload(base_url, result.name, cfg_b, w_b, token)


def with_seed(config: PetConfig, seed: int) -> PetConfig:
    return replace(config, teacher=replace(config.teacher, seed=seed), student=replace(config.student, seed=seed))
