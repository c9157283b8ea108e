"""A tiny fake engine with the real engine's interface, for testing the serving shell.

Its "bundles" are adapter_config.json files with a `labels` list and an `input_kind`; its
forward answers deterministically and records every batch, and it can be held in the middle of
a forward (a gate) to build queues on purpose. A few magic texts drive failure paths:
`boom` makes the forward raise, `sleep:<seconds>` makes it slow.
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from service.engine.types import INLINE_TOKENIZE_CHARS, ClassifyItem, Encoded, Prediction, TaskKey
from service.errors import BundleError

GATE_TIMEOUT_S = 5.0  # a test that forgets to open the gate fails instead of hanging


@dataclass
class FakeBackbone:
    name: str = "fake-minilm"
    fingerprint: str = "fake0000"
    num_params: int = 1000
    device: str = "cpu"
    dtype: str = "float32"


@dataclass(eq=False)
class FakeTask:
    key: TaskKey
    labels: list[str]
    input_kind: str = "single"
    nbytes: int = 1000
    has_exits: bool = False  # early-exit classifiers (config `"exits": true`)
    exit_count: int = 5  # exit layers, where it has exits (MiniLM's 6 layers less the last)
    max_length: int = 32
    overflow: str = "truncate"  # config `"overflow"`
    prompt_tokens: int = 0  # no template

    def info(self) -> dict[str, Any]:
        return {
            "method": "fake",
            "trainable_params": 10,
            "pct_of_backbone": 1.0,
            "bytes_on_disk": 0,
            "labels": list(self.labels),
            "input_kind": self.input_kind,
        }

    def exit_problems(self) -> list[str]:
        return []

    def exit_threshold(self, policy: str) -> float | None:
        return None  # no calibration: the engine's defaults


class FakeEngine:
    def __init__(self, *, task_nbytes: int = 1000, warmup_error: Exception | None = None) -> None:
        self.backbone = FakeBackbone()
        self.task_nbytes = task_nbytes
        self.warmup_error = warmup_error
        self.warmup_gate: threading.Event | None = None  # when set, warmup waits for it
        self.warmed = False
        self.loads: list[TaskKey] = []
        self.batches: list[list[str]] = []  # texts of every forward, in order
        self.gate: threading.Event | None = None  # when set, classify waits for it ...
        self.in_forward = threading.Event()  # ... after setting this
        self.pretokenized: list[str] = []  # the thread of every pretokenize call
        self.untokenized_rows = 0  # rows that reached classify without their tokens
        self._lock = threading.Lock()

    def load_task(self, bundle_dir: Path, key: TaskKey) -> FakeTask:
        with self._lock:
            self.loads.append(key)
        try:
            config = json.loads((Path(bundle_dir) / "adapter_config.json").read_text())
        except (OSError, ValueError) as err:
            raise BundleError(f"cannot read adapter_config.json: {err}") from err
        if config.get("bug"):
            raise ValueError("a bug in the engine")  # not a BundleError: should become a 500
        labels = config.get("labels")
        if not isinstance(labels, list) or not labels:
            raise BundleError("adapter_config.json has no labels")
        return FakeTask(key, labels, config.get("input_kind", "single"), self.task_nbytes, bool(config.get("exits")),
                        int(config.get("max_length", 32)), config.get("overflow", "truncate"))

    def classify(self, items: Sequence[ClassifyItem]) -> list[Prediction]:
        self.in_forward.set()
        if self.gate is not None and not self.gate.wait(GATE_TIMEOUT_S):
            raise RuntimeError("test gate never opened")
        texts = [item.text for item in items]
        with self._lock:
            self.batches.append(texts)
            self.untokenized_rows += sum(item.encoded is None for item in items)
        for text in texts:
            if text == "boom":
                raise RuntimeError("boom")
            if text.startswith("sleep:"):
                time.sleep(float(text.removeprefix("sleep:")))
        return [_predict(item) for item in items]

    def token_counts(self, items: Sequence[ClassifyItem]) -> list[int]:
        """Whitespace words plus the two special tokens a BERT tokenizer adds ([CLS], [SEP])."""
        return [len(item.text.split()) + len((item.text_pair or "").split()) + 2 + bool(item.text_pair) for item in items]

    def pretokenize(self, items: Sequence[ClassifyItem]) -> list[ClassifyItem]:
        """Whitespace words as the tokens; rows of a `pretokenize_inline` miss come here."""
        with self._lock:
            self.pretokenized.append(threading.current_thread().name)
        return [replace(it, encoded=Encoded([0] * (len(it.text.split()) + 2), None, 0)) for it in items]

    def pretokenize_inline(self, items: Sequence[ClassifyItem]) -> list[ClassifyItem] | None:
        """Like the engine: rows of up to INLINE_TOKENIZE_CHARS characters in all, at once."""
        if sum(len(it.text) + len(it.text_pair or "") for it in items) > INLINE_TOKENIZE_CHARS:
            return None
        return self.pretokenize(items)

    def warmup(self) -> None:
        if self.warmup_gate is not None:
            self.warmup_gate.wait(GATE_TIMEOUT_S)
        if self.warmup_error is not None:
            raise self.warmup_error
        self.warmed = True

    def seen_texts(self) -> set[str]:
        with self._lock:
            return {text for batch in self.batches for text in batch}


FAKE_LAYERS = 2  # an exit task answers at layer 1 under any policy but `off`, else at the last


def _predict(item: ClassifyItem) -> Prediction:
    """Softmax over logits that favour label len(text) % n."""
    labels = item.task.labels
    favourite = len(item.text) % len(labels)
    logits = [2.0 if i == favourite else 0.0 for i in range(len(labels))]
    total = sum(math.exp(x) for x in logits)
    probs = [math.exp(x) / total for x in logits]
    return Prediction(
        label=labels[favourite],
        score=probs[favourite],
        scores=dict(zip(labels, probs)),
        version=item.task.key.version,
        logits=tuple(logits),
        exit_layer=1 if item.task.has_exits and item.exit_policy is not None and item.exit_policy.name != "off"
        else FAKE_LAYERS,
    )


def write_task(
    store: Path,
    name: str,
    version: str = "v1",
    *,
    labels: Sequence[str] = ("neg", "pos"),
    input_kind: str = "single",
    active: bool = False,
    config_text: str | None = None,
) -> Path:
    """Write a fake bundle `<store>/<name>/<version>/` and, if `active`, point ACTIVE at it."""
    bundle = store / name / version
    bundle.mkdir(parents=True, exist_ok=True)
    if config_text is None:
        config_text = json.dumps({"labels": list(labels), "input_kind": input_kind})
    (bundle / "adapter_config.json").write_text(config_text)
    (bundle / "adapter_model.safetensors").write_bytes(b"")
    if active:
        (store / name / "ACTIVE").write_text(version + "\n")
    return bundle
