"""Plain-text summary tables for the end of a training or evaluation run.

Everything returns a string (the caller prints or logs it), uses no dependencies, and lines up in
a monospace terminal or log file:

    split   n  accuracy  macro_f1
    -----  --  --------  --------
    dev    32    0.8125    0.8095
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from training.metrics import Metrics

# Four decimals resolve one example in 10,000, finer than any split here (the largest test set
# has 7,600 rows), without suggesting more precision than the numbers have.
DEFAULT_DIGITS = 4


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    title: str | None = None,
    digits: int = DEFAULT_DIGITS,
) -> str:
    """A table with a dashed rule under the headers; numbers right-aligned, text left-aligned.

    Floats are shown with ``digits`` decimals; None is shown as "-".
    """
    width = len(headers)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"row {i} has {len(row)} cells but there are {width} headers")
    cells = [[_cell(v, digits) for v in row] for row in rows]
    # A column is right-aligned when every value in it is a number (or missing).
    numeric = [
        all(isinstance(row[j], (int, float)) or row[j] is None for row in rows) and bool(rows)
        for j in range(width)
    ]
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ]
        return "  ".join(padded).rstrip()

    out = [] if title is None else [title]
    out.append(line(list(headers)))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def format_metrics(
    metrics: Metrics, *, title: str | None = None, digits: int = DEFAULT_DIGITS
) -> str:
    """One evaluation: a headline (n, accuracy, macro-F1) and a per-class table."""
    headline = (
        f"n={metrics.n}  accuracy={metrics.accuracy:.{digits}f}  "
        f"macro_f1={metrics.macro_f1:.{digits}f}"
    )
    rows = [
        [name, s.precision, s.recall, s.f1, s.support, s.predicted]
        for name, s in metrics.per_class.items()
    ]
    table = format_table(
        ["label", "precision", "recall", "f1", "support", "predicted"], rows, digits=digits
    )
    parts = ([title] if title else []) + [headline, table]
    return "\n".join(parts)


def format_comparison(
    results: Mapping[str, Metrics],
    *,
    title: str | None = None,
    name_header: str = "run",
    mean_std: bool = False,
    digits: int = DEFAULT_DIGITS,
) -> str:
    """Several evaluations side by side (splits, seeds or methods), one row each.

    ``mean_std`` adds a "mean ± std" row over the runs, as few-shot results are reported over
    seeds. The std is the population std (ddof=0), as numpy's default used by LM-BFF's scripts.
    """
    if not results:
        raise ValueError("no results to compare")
    rows: list[list[object]] = [[name, m.n, m.accuracy, m.macro_f1] for name, m in results.items()]
    headers = [name_header, "n", "accuracy", "macro_f1"]
    if not mean_std:
        return format_table(headers, rows, title=title, digits=digits)
    table = format_table(headers, rows, digits=digits).split("\n")
    acc = [m.accuracy for m in results.values()]
    f1 = [m.macro_f1 for m in results.values()]
    summary = (
        f"mean ± std over {len(results)}: accuracy {_mean_std(acc, digits)}  "
        f"macro_f1 {_mean_std(f1, digits)}"
    )
    return "\n".join(([title] if title else []) + table + [summary])


def _mean_std(values: Sequence[float], digits: int) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(value: object, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
