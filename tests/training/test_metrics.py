"""training.metrics against hand-computed values, and training.report's tables."""
from __future__ import annotations

import json
import random

import pytest
import torch

from training.metrics import ClassScores, Metrics, compute_metrics
from training.report import format_comparison, format_metrics, format_table


def scores(predictions, references, label_names) -> Metrics:
    return compute_metrics(predictions=predictions, references=references, label_names=label_names)


def test_three_classes_by_hand() -> None:
    # confusion [reference][predicted]: a -> a,a,b ; b -> b,c ; c -> c
    m = scores([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], ["a", "b", "c"])
    assert m.n == 6
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.confusion == ((2, 1, 0), (0, 1, 1), (0, 0, 1))
    # a: tp 2 of 2 predicted, 3 true -> P 1, R 2/3, F1 0.8
    assert m.per_class["a"] == ClassScores(1.0, pytest.approx(2 / 3), pytest.approx(0.8), 3, 2)
    # b: tp 1 of 2 predicted, 2 true -> P R F1 0.5
    assert m.per_class["b"] == ClassScores(0.5, 0.5, 0.5, 2, 2)
    # c: tp 1 of 2 predicted, 1 true -> P 0.5, R 1, F1 2/3
    assert m.per_class["c"] == ClassScores(0.5, 1.0, pytest.approx(2 / 3), 1, 2)
    assert m.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # = 59/90
    assert list(m.per_class) == ["a", "b", "c"]


def test_class_never_predicted_scores_zero_without_dividing_by_zero() -> None:
    m = scores([0, 0, 0], [0, 1, 1], ["neg", "pos"])
    assert m.per_class["pos"] == ClassScores(0.0, 0.0, 0.0, 2, 0)
    assert m.per_class["neg"] == ClassScores(pytest.approx(1 / 3), 1.0, pytest.approx(0.5), 1, 3)
    assert m.accuracy == pytest.approx(1 / 3)
    assert m.macro_f1 == pytest.approx(0.25)


def test_class_only_predicted_counts_in_macro_f1() -> None:
    m = scores([0, 1], [0, 0], ["neg", "pos"])
    assert m.per_class["pos"] == ClassScores(0.0, 0.0, 0.0, 0, 1)
    assert m.per_class["neg"].f1 == pytest.approx(2 / 3)
    assert m.macro_f1 == pytest.approx(1 / 3)


def test_class_absent_everywhere_is_listed_but_not_averaged() -> None:
    m = scores([0, 1], [0, 1], ["a", "b", "c"])
    assert m.per_class["c"] == ClassScores(0.0, 0.0, 0.0, 0, 0)
    assert m.macro_f1 == 1.0
    assert m.accuracy == 1.0


def test_all_wrong() -> None:
    m = scores([1, 0], [0, 1], ["a", "b"])
    assert m.accuracy == 0.0
    assert m.macro_f1 == 0.0


def test_tensors_give_the_same_result_as_lists() -> None:
    preds, refs = [0, 2, 1, 1, 0], [0, 1, 1, 2, 0]
    from_lists = scores(preds, refs, ["a", "b", "c"])
    from_tensors = scores(torch.tensor(preds), torch.tensor(refs), ["a", "b", "c"])
    assert from_tensors == from_lists


def test_matches_sklearn_on_random_labels() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for k in (2, 3, 5):
        refs = [rng.randrange(k) for _ in range(200)]
        # skewed predictions, so some classes are rarely or never predicted
        preds = [min(rng.randrange(k), rng.randrange(k)) for _ in range(200)]
        m = scores(preds, refs, [f"c{i}" for i in range(k)])
        assert m.accuracy == pytest.approx(sk.accuracy_score(refs, preds))
        expected_f1 = sk.f1_score(refs, preds, average="macro", zero_division=0)
        assert m.macro_f1 == pytest.approx(expected_f1)
        p, r, f, s = sk.precision_recall_fscore_support(
            refs, preds, labels=list(range(k)), zero_division=0
        )
        for i, name in enumerate(m.label_names):
            c = m.per_class[name]
            ours = (c.precision, c.recall, c.f1, c.support)
            assert ours == pytest.approx((p[i], r[i], f[i], s[i]))


def test_as_dict_is_json_ready() -> None:
    m = scores([0, 1, 1], [0, 1, 0], ["neg", "pos"])
    d = json.loads(json.dumps(m.as_dict()))
    assert d["n"] == 3
    assert d["accuracy"] == pytest.approx(2 / 3)
    assert d["macro_f1"] == pytest.approx(m.macro_f1)
    assert d["label_names"] == ["neg", "pos"]
    assert d["per_class"]["pos"] == {
        "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1, "predicted": 2
    }
    assert d["confusion"] == [[1, 1], [0, 1]]


BAD_METRIC_INPUTS = [
    ("length mismatch", [0, 1], [0], ["a", "b"], "2 predictions but 1 references"),
    ("empty", [], [], ["a", "b"], "no examples"),
    ("index too large", [0, 2], [0, 1], ["a", "b"], "predictions hold index 2, outside 0..1"),
    ("negative index", [0, 1], [-1, 1], ["a", "b"], "references hold index -1"),
    ("float", [0.0, 1.0], [0, 1], ["a", "b"], "got the float 0.0"),
    ("string", ["a", "b"], [0, 1], ["a", "b"], "must be label indices"),
    ("no labels", [0], [0], [], "label_names is empty"),
    ("2-D tensor", torch.zeros(2, 2, dtype=torch.long), [0, 1], ["a", "b"], "must be 1-D"),
]


@pytest.mark.parametrize(
    "predictions, references, label_names, message",
    [case[1:] for case in BAD_METRIC_INPUTS],
    ids=[case[0] for case in BAD_METRIC_INPUTS],
)
def test_bad_metric_inputs(predictions, references, label_names, message) -> None:
    with pytest.raises(ValueError, match=message):
        scores(predictions, references, label_names)


def test_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        compute_metrics([0], [0], ["a"])  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# training.report


def test_format_table_aligns_numbers_right_and_text_left() -> None:
    table = format_table(["split", "n", "accuracy"], [["dev", 32, 0.8125], ["test", 872, 0.9]])
    assert table.split("\n") == [
        "split    n  accuracy",
        "-----  ---  --------",
        "dev     32    0.8125",
        "test   872    0.9000",
    ]
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        format_table(["a", "b"], [["x"]])


def test_format_metrics_lists_every_class() -> None:
    m = scores([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], ["a", "b", "c"])
    text = format_metrics(m, title="dev")
    lines = text.split("\n")
    assert lines[0] == "dev"
    assert lines[1] == "n=6  accuracy=0.6667  macro_f1=0.6556"
    assert lines[2].split() == ["label", "precision", "recall", "f1", "support", "predicted"]
    assert lines[4].split() == ["a", "1.0000", "0.6667", "0.8000", "3", "2"]
    assert len(lines) == 7


def test_format_comparison_with_mean_and_std() -> None:
    good = scores([0, 1, 1, 1, 0], [0, 1, 1, 1, 1], ["a", "b"])  # accuracy 0.8
    better = scores([0] + [1] * 9, [0] + [1] * 4 + [0] + [1] * 4, ["a", "b"])  # 0.9
    text = format_comparison({"16-13": good, "16-21": better}, name_header="seed", mean_std=True)
    lines = text.split("\n")
    assert lines[0].split() == ["seed", "n", "accuracy", "macro_f1"]
    assert lines[2].split()[:3] == ["16-13", "5", "0.8000"]
    assert lines[3].split()[:3] == ["16-21", "10", "0.9000"]
    # population std of (0.8, 0.9) is 0.05
    assert "accuracy 0.8500 ± 0.0500" in lines[4]
    with pytest.raises(ValueError, match="no results"):
        format_comparison({})
