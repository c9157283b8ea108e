"""The few-shot benchmark's verdict (bench/few_shot.py): what counts as the best few-shot method,
and the paired comparison it reports beside the target."""
from __future__ import annotations

import pytest

from bench import few_shot


def _row(task, seed, method, acc, **extra):
    return {"task": task, "seed": seed, "method": method, "accuracy": acc, "bytes": 1000,
            "pct_of_backbone_bytes": 0.5, "train_s": 1.0, **extra}


def _rows():
    rows = []
    for task in ("sst2", "agnews"):
        rows.append(_row(task, None, "zs-prompt", 0.99))  # best of all, but not a few-shot method
        for seed, (setfit, prompt) in zip((13, 21, 42), ((0.70, 0.75), (0.80, 0.78), (0.60, 0.66))):
            rows.append(_row(task, seed, "setfit", setfit))
            rows.append(_row(task, seed, "prompt", prompt))
            rows.append(_row(task, seed, "pet", setfit - 0.01, teachers_test=[prompt, 0.5, 0.6]))
    return rows


def test_best_few_shot_method_excludes_zero_shot_and_reports_the_paired_difference():
    rows = _rows()
    target = few_shot._targets(rows, few_shot._summary(rows))[0]
    assert target["best"] == "prompt"  # zs-prompt's 0.99 is reported, not a candidate
    assert target["best_mean"] == pytest.approx((0.75 + 0.78 + 0.66) / 3)
    assert target["pass"] is True
    paired = target["paired_vs_setfit"]
    assert paired["runs"] == 6 and paired["wins"] == 4 and paired["losses"] == 2 and paired["ties"] == 0
    assert paired["mean_diff"] == pytest.approx((0.05 - 0.02 + 0.06) / 3)


def test_pet_target_counts_the_runs_where_the_student_beats_its_teachers():
    rows = _rows()
    pet = next(t for t in few_shot._targets(rows, few_shot._summary(rows)) if t["target"].startswith("PET"))
    # students 0.69 / 0.79 / 0.59 against teacher means 0.6167 / 0.6267 / 0.5867
    assert pet["runs"] == 6 and pet["student_ahead_in"] == 6 and pet["student_behind_in"] == 0
    rows = [dict(r, teachers_test=[0.9, 0.9, 0.9]) if r["method"] == "pet" else r for r in rows]
    pet = next(t for t in few_shot._targets(rows, few_shot._summary(rows)) if t["target"].startswith("PET"))
    assert pet["pass"] is False and pet["student_behind_in"] == 6
