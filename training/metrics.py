"""Classification metrics from label indices: accuracy, macro-F1, per-class precision/recall/F1.

Pure Python, so evaluation needs no sklearn; the conventions follow sklearn's defaults so numbers
compare with published ones:
- a class never predicted has precision 0, a class with no examples has recall 0, and F1 is 0
  when precision + recall is 0 (sklearn's ``zero_division=0``) -- never a division by zero;
- macro-F1 averages over the classes that occur in the references or the predictions (sklearn's
  ``labels=None``), so a class absent from both, e.g. from a small dev split, does not pull the
  average towards 0. Such a class is still listed per class, with support 0 and all scores 0.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ClassScores:
    """Scores of one class."""

    precision: float
    recall: float
    f1: float
    support: int  # rows whose reference is this class
    predicted: int  # rows predicted as this class

    def as_dict(self) -> dict[str, float | int]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "support": self.support,
            "predicted": self.predicted,
        }


@dataclass(frozen=True)
class Metrics:
    """Scores of one evaluation; ``per_class`` and ``confusion`` follow ``label_names`` order."""

    label_names: tuple[str, ...]
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassScores]
    confusion: tuple[tuple[int, ...], ...]  # [reference class][predicted class] -> rows
    n: int

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain floats, ints, strings, lists)."""
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": {name: s.as_dict() for name, s in self.per_class.items()},
            "label_names": list(self.label_names),
            "confusion": [list(row) for row in self.confusion],
        }


def compute_metrics(
    *,
    predictions: Sequence[int] | Any,
    references: Sequence[int] | Any,
    label_names: Sequence[str],
) -> Metrics:
    """Score predicted label indices against reference indices (both index ``label_names``).

    Keyword-only because swapping predictions and references silently swaps precision and
    recall. Accepts lists, tuples or 1-D tensors/arrays of integers.
    """
    preds = _as_indices(predictions, "predictions")
    refs = _as_indices(references, "references")
    names = tuple(label_names)
    k = len(names)
    if k == 0:
        raise ValueError("label_names is empty")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not refs:
        raise ValueError("no examples to score (predictions and references are empty)")
    for what, values in (("predictions", preds), ("references", refs)):
        bad = [v for v in values if not 0 <= v < k]
        if bad:
            raise ValueError(
                f"{what} hold index {bad[0]}, outside 0..{k - 1} "
                f"for {k} labels ({', '.join(names)})"
            )

    confusion = [[0] * k for _ in range(k)]  # [reference][predicted]
    for r, p in zip(refs, preds):
        confusion[r][p] += 1

    per_class: dict[str, ClassScores] = {}
    averaged: list[float] = []
    for c, name in enumerate(names):
        tp = confusion[c][c]
        support = sum(confusion[c])
        predicted = sum(row[c] for row in confusion)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = ClassScores(precision, recall, f1, support, predicted)
        if support or predicted:
            averaged.append(f1)

    correct = sum(confusion[c][c] for c in range(k))
    return Metrics(
        label_names=names,
        accuracy=correct / len(refs),
        macro_f1=sum(averaged) / len(averaged),  # not empty: there is at least one row
        per_class=per_class,
        confusion=tuple(tuple(row) for row in confusion),
        n=len(refs),
    )


def _as_indices(values: Sequence[int] | Any, what: str) -> list[int]:
    if hasattr(values, "tolist"):  # torch.Tensor / numpy array, without importing either
        if getattr(values, "ndim", 1) != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()
    out = []
    for v in values:
        if isinstance(v, float):
            raise ValueError(f"{what} must be label indices (ints), got the float {v!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"{what} must be label indices (ints), got {v!r}") from None
    return out
