"""Zero-shot tasks: a servable task from a label list, with no training data.

Two kinds, each published in one command (`adaptserve zeroshot`):

* **prompt** (template + verbalizer on an LM backbone): the task is exactly a prompt task before
  training: the backbone's LM head scores each label's words at the template's answer position
  (PET / LM-BFF's zero-shot setting). Bundle: the "verbalizer" method and the "template".
* **descriptions** (on a sentence encoder, the bundled all-MiniLM-L6-v2 by default; a causal LM is
  refused: its mean-pooled states are no sentence embedding): each label has a short description
  ("a negative review"); the task's head holds the unit-norm mean-pooled embedding of each
  description, so a text's logits are scale x cosine(text, description). Bundle: a `head` with
  pooling "mean", normalize=true, zero bias.

The description embeddings are computed with the engine's own forward and pooling, the code that
serves the head, so the served cosine is exactly the one between the two pooled vectors.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from service.engine.backbone import Backbone, load_backbone
from service.engine.bundle import bundle_bytes, write_bundle
from service.engine.engine import Engine
from service.engine.spec import TaskSpec
from service.engine.task import Task
from service.engine.types import ClassifyItem, TaskKey
from service.methods.base import TaskWeights
from service.methods.head import HeadWeights, pool
from service.store import TASK_NAME_RE
from training.config import ConfigError
from training.prompting import PromptSpec, order_by_labels, parse_verbalizer, unique_labels

# all-MiniLM-L6-v2 was trained with sentence-transformers' MultipleNegativesRankingLoss at its
# default scale 20 (temperature 0.05): softmax(20 x cosine) is the distribution its training
# objective modelled. At scale 1 the cosines of one text to a few descriptions (which differ by
# ~0.05-0.2) would give near-uniform scores; the predicted label does not depend on the scale.
DEFAULT_SCALE = 20.0
ZEROSHOT_VERSION = "zeroshot"


@dataclass
class ZeroShotTask:
    """A task built without training: its weights, what answers it, and where it runs."""

    name: str
    labels: tuple[str, ...]
    input_kind: str
    max_length: int
    weights: dict[str, TaskWeights]
    backbone: Backbone
    template: Any = None  # a parsed Template (prompt kind) or None
    template_source: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> Task:
        spec = TaskSpec(name=self.name, labels=self.labels, input_kind=self.input_kind,  # type: ignore[arg-type]
                        max_length=self.max_length, methods=tuple(self.weights),
                        backbone_fingerprint=self.backbone.fingerprint, template=self.template)
        return Task(key=TaskKey(self.name, ZEROSHOT_VERSION), spec=spec, weights=self.weights, backbone=self.backbone.info)

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None = None, batch_size: int = 64) -> Tensor:
        """[N, labels] logits through the serving engine (fp32, CPU)."""
        engine, task, out = Engine(self.backbone), self.task, []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            ps = [None] * len(chunk) if pairs is None else pairs[i : i + batch_size]
            out.append(torch.stack(engine.logits(engine.tokenize([ClassifyItem(task, t, p) for t, p in zip(chunk, ps)]))).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def bundle_config(self) -> dict[str, Any]:
        info = self.backbone.info
        cfg: dict[str, Any] = {
            "labels": list(self.labels),
            "input_kind": self.input_kind,
            "max_length": self.max_length,
            "backbone": {"fingerprint": info.fingerprint, "name": self.backbone.name, "model_type": info.model_type},
            "training": {"method": "zeroshot", **self.provenance, "trainable_params": 0, "torch": torch.__version__},
        }  # no creation time: the same prompt or descriptions are the same version (content hash)
        if self.template_source is not None:
            cfg["template"] = self.template_source
        return cfg


def _check_name(name: str) -> None:
    if not TASK_NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid task name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
                          "starting with a letter or digit")


def parse_labels(labels: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if labels is None:
        return None
    items = [x.strip() for x in labels.split(",")] if isinstance(labels, str) else [str(x).strip() for x in labels]
    if not all(items):
        raise ConfigError(f"--labels has an empty label in {labels if isinstance(labels, str) else list(labels)!r}: "
                          "write them as NAME,NAME,... with no empty entries")
    if len(items) < 2:
        raise ConfigError(f"--labels must name at least 2 labels, got {items}")
    if len(set(items)) != len(items):
        raise ConfigError(f"--labels repeats a label: {', '.join(items)}")
    return tuple(items)


# -- (a) template + verbalizer -----------------------------------------------------------------------
def prompt_task(name: str, template: str, verbalizer: str | Path | Mapping[str, Any], backbone: Backbone, *,
                labels: str | Sequence[str] | None = None, pair: bool = False, max_length: int = 128) -> ZeroShotTask:
    """A zero-shot prompt task: the backbone's LM head reads each label's words after the template."""
    _check_name(name)
    names = parse_labels(labels)
    words = parse_verbalizer(verbalizer)
    names = names or tuple(words)
    if len(names) < 2:  # a one-label task answers the same for every input, and the engine refuses it
        raise ConfigError(f"a task needs at least 2 labels; the verbalizer maps only {list(names)}: give every label "
                          "its word(s), e.g. --verbalizer 'negative=terrible;positive=great'")
    spec = PromptSpec(template=template, label_words=order_by_labels(words, names))
    _check_length(max_length, backbone)
    parsed, vw = spec.build(backbone, names, pair, max_length)
    return ZeroShotTask(name=name, labels=names, input_kind="pair" if pair else "single", max_length=max_length,
                        weights={"verbalizer": vw}, backbone=backbone, template=parsed, template_source=template,
                        provenance={"zeroshot": {"kind": "prompt", "template": template,
                                                 "label_words": {k: list(v) for k, v in spec.label_words.items()}}})


# -- (b) label descriptions --------------------------------------------------------------------------
def parse_descriptions(spec: str | Path | Mapping[str, str]) -> dict[str, str]:
    """Label -> description from `"negative=a negative review;positive=a positive review"` (a
    description may hold commas), a JSON object (inline or a .json file) or a mapping."""
    if isinstance(spec, Mapping):
        raw: Any = dict(spec)
    else:
        text = str(spec).strip()
        if text.endswith(".json") or (len(text) < 4096 and Path(text).is_file()):
            try:
                text = Path(text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"--descriptions {spec}: cannot read the file: {err}") from None
        if text.lstrip().startswith("{"):
            try:
                raw = json.loads(text, object_pairs_hook=lambda pairs: unique_labels(pairs, "--descriptions"))
            except json.JSONDecodeError as err:
                raise ConfigError(f"--descriptions: not valid JSON: {err}") from None
        else:
            entries = []
            for part in filter(None, (p.strip() for p in text.split(";"))):
                label, eq, desc = part.partition("=")
                if not eq or not label.strip():
                    raise ConfigError(f"--descriptions: {part!r} is not LABEL=description; write e.g. "
                                      "\"negative=a negative review;positive=a positive review\"")
                entries.append((label.strip(), desc))
            raw = unique_labels(entries, "--descriptions")
    if not isinstance(raw, dict) or len(raw) < 2:
        raise ConfigError("--descriptions must describe at least 2 labels")
    out = {}
    for label, desc in raw.items():
        if not isinstance(desc, str) or not desc.strip():
            raise ConfigError(f"--descriptions: label {label!r} needs a non-empty description")
        out[str(label)] = desc.strip()
    seen: dict[str, str] = {}
    for label, desc in out.items():
        if desc in seen:  # one embedding for both: argmax always picks the first, the other is never predicted
            raise ConfigError(f"--descriptions: labels {seen[desc]!r} and {label!r} have the same description "
                              f"{desc!r}; a label is told apart by its description, so give each its own")
        seen[desc] = label
    return out


def embed_mean(engine: Engine, texts: Sequence[str], max_length: int) -> Tensor:
    """[n, H] mean-pooled final states of `texts`, through the engine's tokenisation, forward and
    the head's own `pool(..., "mean")`: exactly what a `mean` head sees when it serves."""
    info = engine.backbone.info
    spec = TaskSpec(name="embed", labels=("a", "b"), input_kind="single", max_length=max_length, methods=(),
                    backbone_fingerprint=info.fingerprint)
    task = Task(key=TaskKey("embed", ZEROSHOT_VERSION), spec=spec, weights={}, backbone=info)
    with torch.inference_mode():
        st, _ = engine.encode(engine.tokenize([ClassifyItem(task, t) for t in texts]))
        return pool(st.hidden, st.keep, st.text_start, st.text_len, "mean").float().clone()


def description_task(name: str, descriptions: str | Path | Mapping[str, str], backbone: Backbone | None = None, *,
                     labels: str | Sequence[str] | None = None, scale: float = DEFAULT_SCALE,
                     max_length: int = 128) -> ZeroShotTask:
    """A zero-shot task on a sentence encoder: logits = scale x cosine(text, label description)."""
    _check_name(name)
    if not (scale > 0 and math.isfinite(scale)):
        raise ConfigError(f"--scale must be a positive finite number, got {scale!r}")
    backbone = backbone if backbone is not None else load_backbone(None, dtype="float32")
    if backbone.info.kind == "decoder":
        # Measured: SmolLM2-135M's mean-pooled cosine head scored 0.525 on 200 SST-2 test rows (every
        # cosine ~0.79: its states all point one way); the bundled MiniLM's scored 0.72.
        raise ConfigError(
            f"--descriptions compares sentence embeddings, so it needs a sentence encoder (the bundled "
            f"all-MiniLM-L6-v2 when --backbone is left out); {backbone.name} is a causal LM "
            f"({backbone.info.model_type}), whose mean-pooled states are not sentence embeddings: every text is about "
            "as close to every description. For an LM, give --template and --verbalizer instead of --descriptions"
        )
    _check_length(max_length, backbone)
    names = parse_labels(labels)
    desc = parse_descriptions(descriptions)
    names = names or tuple(desc)
    missing, extra = [n for n in names if n not in desc], [n for n in desc if n not in names]
    if missing or extra:
        raise ConfigError(f"--descriptions must describe exactly the labels {', '.join(names)}"
                          + (f"; missing {', '.join(missing)}" if missing else "")
                          + (f"; not a label: {', '.join(extra)}" if extra else ""))
    emb = embed_mean(Engine(backbone), [desc[n] for n in names], max_length)  # [labels, H]
    w = torch.nn.functional.normalize(emb, dim=-1) * scale
    head = HeadWeights(pooling="mean", out_w=w.to(backbone.device, backbone.dtype),
                       out_b=torch.zeros(len(names), device=backbone.device, dtype=backbone.dtype), normalize=True)
    return ZeroShotTask(name=name, labels=names, input_kind="single", max_length=max_length, weights={"head": head},
                        backbone=backbone, provenance={"zeroshot": {"kind": "descriptions", "descriptions": dict(desc),
                                                                    "scale": scale}})


def _check_length(max_length: int, backbone: Backbone) -> None:
    if not isinstance(max_length, int) or not 2 <= max_length <= backbone.info.max_positions:
        raise ConfigError(f"--max-length must be an integer in [2, {backbone.info.max_positions}], got {max_length!r}")


# -- publishing --------------------------------------------------------------------------------------
def save_zeroshot(task: ZeroShotTask, store: str | Path) -> str:
    """Write the task into `<store>/<name>/<version>/` and make it active; the version."""
    from training.publish import require_finite, require_loadable

    require_finite(task.name, task.weights)
    require_loadable(task.name, task.bundle_config(), task.weights, task.backbone)
    return write_bundle(Path(store), task.name, task.bundle_config(), task.weights)


def publish_zeroshot_http(task: ZeroShotTask, base_url: str, token: str | None = None):
    from training.publish import require_finite, upload

    require_finite(task.name, task.weights)
    cfg_b, w_b = bundle_bytes(task.bundle_config(), task.weights)
    return upload(base_url, task.name, cfg_b, w_b, token)
