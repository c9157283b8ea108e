"""Typed values that cross the boundary between the engine and the rest of the service.

The backbone never sees these: it sees tensors and a per-row slot mapping. The scheduler, the
cache and the HTTP layer only see these.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, order=True)
class TaskKey:
    """One identity per task version: the task name plus the content hash of its bundle.

    Used everywhere a task version is named (cache keys, metric labels, logs), so that two
    versions of one task can never be confused and names are never matched by substring.
    """

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ClassifyItem:
    """One input row: which loaded task answers it and the text (or text pair) to classify."""

    task: Any  # service.engine.task.Task (kept as Any to avoid an import cycle)
    text: str
    text_pair: str | None = None
    # Per-request early-exit override (service.methods.exits.ExitPolicy); None = the task's default.
    exit_policy: Any = None
    # The row's tokens (`Encoded`), made before it was queued (`Engine.pretokenize`); None: the
    # forward that runs it tokenises it.
    encoded: "Encoded | None" = None


# A request of at most this many characters (texts and pairs together) is tokenised on the event
# loop, which takes about 0.1 ms on MiniLM; a longer one goes to a worker thread (`Engine.pretokenize`).
INLINE_TOKENIZE_CHARS = 2048


@dataclass(frozen=True, slots=True)
class Encoded:
    """One row as the encoder reads it: token ids with the special tokens, truncated to its task's
    max_length (a prompt task's template included), their token types, and the position a
    verbalizer reads (0 for a classification head)."""

    ids: list[int]
    types: list[int] | None
    answer: int


@dataclass(frozen=True)
class Prediction:
    """The answer for one row."""

    label: str
    score: float
    scores: dict[str, float]
    version: str
    logits: tuple[float, ...] = field(default=(), repr=False)
    exit_layer: int | None = None


def unprintable(label: str) -> bool:
    """Whether a label holds a control character (NUL, a newline, a tab) or an unpaired surrogate.
    Labels answer in JSON and show in logs and dashboards, so bundles and training data refuse
    them. Format characters pass: Persian and Indic words need the zero-width (non-)joiner."""
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in label)
