"""PET: the soft-label ensemble and the distillation loss against hand-computed values, pattern
files, and a whole run (tiny causal LM teachers -> tiny BERT student) published and served."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from training.config import ConfigError, TrainConfig
from training.data import DataError, load_splits
from training.fewshot_cli import pet_main
from training.pet import (
    PetConfig,
    distillation_loss,
    ensemble_soft_labels,
    load_patterns,
    read_unlabelled,
    run_pet,
    save_pet,
)
from tests.factories import save_tiny_lm
from tests.training.conftest import TINY, assert_served_equals_trained, rows, write_csv

PATTERNS = [
    {"template": "{text} it was {mask}", "verbalizer": "negative=bad;positive=good"},
    {"template": "{text} really {mask}", "verbalizer": {"negative": ["terrible"], "positive": ["great", "fun"]}},
    {"template": "the movie {text} is {mask}", "verbalizer": "negative=boring;positive=love"},
]


def test_soft_labels_by_hand():
    """Three patterns, one row: softmax(z/T) per pattern, averaged with weights 1, 1, 2 (T = 2)."""
    z = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    hi = math.e / (math.e + 1)  # softmax([1, 0])[0]
    want = [(hi + 0.5 + 2 * (1 - hi)) / 4, ((1 - hi) + 0.5 + 2 * hi) / 4]
    torch.testing.assert_close(ensemble_soft_labels(z, [1, 1, 2], temperature=2.0), torch.tensor([want]))
    torch.testing.assert_close(ensemble_soft_labels(z, None, temperature=2.0), torch.tensor([[0.5, 0.5]]))  # uniform
    t1 = ensemble_soft_labels(z[:1], None, temperature=1.0)  # T = 1 is the plain softmax
    torch.testing.assert_close(t1, torch.softmax(z[0], -1))
    for bad in ([1, 1], [1, -1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="pattern weights"):
            ensemble_soft_labels(z, bad)


def test_distillation_loss_by_hand():
    s = torch.tensor([[1.0, 3.0]])
    q = torch.tensor([[0.25, 0.75]])
    p1 = 1 / (1 + math.exp(-1.0))  # softmax([0.5, 1.5])[1]
    want = 4.0 * (0.25 * math.log(0.25 / (1 - p1)) + 0.75 * math.log(0.75 / p1))  # KL(q || p) x T^2
    assert distillation_loss(s, q, 2.0).item() == pytest.approx(want, rel=1e-4)
    assert distillation_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 0.5]]), 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_patterns_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(PATTERNS))
    pats = load_patterns(str(f))
    assert [p.name for p in pats] == ["p1", "p2", "p3"] and pats[1].label_words["positive"] == ("great", "fun")
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(PATTERNS).encode())  # a BOM, as Windows editors write: dropped
    assert load_patterns(f) == pats
    f.write_text(json.dumps(PATTERNS[:2]))
    with pytest.raises(ConfigError, match="at least 3 patterns, got 2"):
        load_patterns(str(f))
    f.write_text(json.dumps([{"template": "x"}] * 3))
    with pytest.raises(ConfigError, match="pattern 1 needs"):
        load_patterns(str(f))


def test_inline_patterns_are_read_as_typed(tmp_path):
    """--patterns takes the JSON itself too (as load_patterns does): kept as typed, not made a Path,
    which collapsed the `//` of a URL in a template. A file is still a path."""
    from training.fewshot_cli import build_pet_parser

    patterns = [{**p, "template": "{text} (see https://example.org/a//b) " + p["template"]} for p in PATTERNS]
    base = "--task t --data a.csv --unlabelled u.csv --dev b.csv --backbone lm --no-publish".split()
    inline = build_pet_parser().parse_args([*base, "--patterns", json.dumps(patterns)])
    assert [p.template for p in load_patterns(inline.patterns)] == [p["template"] for p in patterns]
    (tmp_path / "p.json").write_text(json.dumps(patterns))
    from_file = build_pet_parser().parse_args([*base, "--patterns", str(tmp_path / "p.json")])
    assert from_file.patterns == tmp_path / "p.json" and load_patterns(from_file.patterns) == load_patterns(inline.patterns)


@pytest.mark.parametrize("role, bad, message", [
    ("teacher", {"lr": 10.0}, "--teacher-lr must be in (0, 3]"),
    ("student", {"lr": -1.0}, "--student-lr must be in (0, 3]"),
    ("teacher", {"epochs": 0}, "--teacher-epochs must be an integer >= 1"),
])
def test_a_bad_teacher_or_student_option_is_named_as_pet_spells_it(role, bad, message):
    config = PetConfig(**{role: TrainConfig(method="lora", **bad)})
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.check()


def test_read_unlabelled_ignores_labels(tmp_path):
    f = write_csv(tmp_path / "u.csv", [("good fun", "pos"), ("", "neg"), ("bad plot", "neg")])
    texts, pairs = read_unlabelled(f, empty_text="skip")
    assert texts == ["good fun", "bad plot"] and pairs is None
    assert len(read_unlabelled(f, limit=1, empty_text="skip")[0]) == 1
    with pytest.raises(DataError, match=r"u\.csv: row 2 \(line 3\): empty 'text'"):  # as train's data: refused unless asked
        read_unlabelled(f)


def test_a_pair_column_in_the_unlabelled_file_of_a_single_text_task_is_refused(tmp_path):
    """Dropped without a word, the pairs would teach the student on half of each input."""
    f = tmp_path / "u.csv"
    f.write_text("text,text_pair\ngood fun,a film\nbad plot,another\n", encoding="utf-8")
    with pytest.raises(DataError, match="classifies single texts .* but this file has a 'text_pair' column"):
        read_unlabelled(f)
    texts, pairs = read_unlabelled(f, text_pair_column="text_pair")
    assert pairs == ["a film", "another"]


@pytest.fixture(scope="module")
def pet_setup(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("pet")
    names = {"pos": "positive", "neg": "negative"}
    splits = load_splits(write_csv(d / "train.csv", [(t, names[y]) for t, y in rows(16, 21)]),
                         write_csv(d / "dev.csv", [(t, names[y]) for t, y in rows(8, 22)]),
                         write_csv(d / "test.csv", [(t, names[y]) for t, y in rows(8, 23)]))
    lm_path = save_tiny_lm("causal", d / "lm")
    from service.engine.backbone import load_backbone

    return d, splits, load_backbone(lm_path, device="cpu", dtype="float32"), lm_path


def test_pet_run_publishes_a_student_served_as_trained(pet_setup, tiny, tmp_path):
    d, splits, lm, _ = pet_setup
    unlabelled = [t for t, _ in rows(12, 24)]
    cfg = PetConfig(teacher=TrainConfig(method="lora", **{**TINY, "max_length": 32}),
                    student=TrainConfig(method="lora", **{**TINY, "max_length": 32}), weighting="dev").check()
    from training.pet import load_patterns as lp

    res = run_pet(splits, unlabelled, lp(PATTERNS), cfg, name="pet", teacher_backbone=lm, student_backbone=tiny,
                  progress=False)
    assert len(res.teachers) == 3 and res.soft_labels.shape == (12, 2)
    torch.testing.assert_close(res.soft_labels.sum(-1), torch.ones(12))
    assert [t.weight for t in res.teachers] == [t.result.dev_metrics.accuracy for t in res.teachers]
    assert all("verbalizer" in t.result.weights for t in res.teachers)
    assert "head" in res.student.weights and "lora" in res.student.weights  # the student is a head task on the encoder
    version = save_pet(res, tmp_path)
    cfg_json = json.loads((tmp_path / "pet" / version / "adapter_config.json").read_text())
    pet = cfg_json["training"]["pet"]
    assert pet["temperature"] == 2.0 and len(pet["patterns"]) == 3 and pet["unlabelled_rows"] == 12
    assert 0 < res.label_seconds < res.seconds and "seconds" not in pet and "label_seconds" not in pet  # the run's
    assert_served_equals_trained(tiny, tmp_path, "pet", list(splits.test.texts), res.student.logits)


def test_student_loss_is_the_distillation_loss(pet_setup, tiny, monkeypatch):
    """The student's training loss is KL to the targets: labelled rows one-hot, unlabelled soft."""
    d, splits, lm, _ = pet_setup
    seen = []
    import training.pet as pet_mod

    real = pet_mod.distillation_loss

    def spy(logits, targets, temperature):
        seen.append(targets.clone())
        return real(logits, targets, temperature)

    monkeypatch.setattr(pet_mod, "distillation_loss", spy)
    cfg = PetConfig(teacher=TrainConfig(method="lora", **{**TINY, "max_length": 32, "max_steps": 1}),
                    student=TrainConfig(method="head", **{**TINY, "max_length": 32, "max_steps": 8, "batch_size": 64}),
                    weighting="uniform")
    res = run_pet(splits, ["good fun day", "bad boring plot"], load_patterns(PATTERNS), cfg, name="pet2",
                  teacher_backbone=lm, student_backbone=tiny, progress=False)
    (targets,) = seen[:1]
    n = len(splits.train)
    assert targets.shape == (n + 2, 2)
    onehot = (targets.max(-1).values == 1).sum().item()
    soft = ((targets > 0) & (targets < 1)).all(-1).sum().item()
    assert (onehot, soft) == (n, 2)  # labelled rows one-hot, unlabelled rows soft (one batch holds them all)
    assert res.config.weighting == "uniform" and [t.weight for t in res.teachers] == [1.0, 1.0, 1.0]


def _pet_args(pet_setup, tmp_path, task: str, patterns: list) -> list[str]:
    """`adaptserve pet` arguments for the tiny setup: 6 unlabelled rows, a tiny student, 32 tokens."""
    from tests.training.conftest import save_tiny_backbone

    _, splits, _, lm_path = pet_setup
    (tmp_path / "patterns.json").write_text(json.dumps(patterns))
    unl = write_csv(tmp_path / "u.csv", rows(6, 25))
    student = save_tiny_backbone("bert", tmp_path / "student")
    return ["--task", task, "--data", splits.train.source, "--dev", splits.dev.source, "--unlabelled", str(unl),
            "--patterns", str(tmp_path / "patterns.json"), "--backbone", str(lm_path), "--student-backbone", str(student),
            "--max-length", "32", "--store", str(tmp_path / "store"), "--no-progress", "--device", "cpu"]


def test_pet_cli(pet_setup, tmp_path, capsys):
    args = [*_pet_args(pet_setup, tmp_path, "pet-cli", PATTERNS), "--teacher-max-steps", "1", "--student-epochs", "1",
            "--batch-size", "8", "--json", str(tmp_path / "s.json")]
    pats = tmp_path / "patterns.json"
    assert pet_main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "teacher p1" in out and "student" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["unlabelled"] == 6 and len(summary["pet"]["patterns"]) == 3
    # a bad patterns file is one line on stderr
    pats.write_text("[]")
    assert pet_main(args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("adaptserve pet: error: --patterns")


@pytest.mark.parametrize("extra,patterns,message", [
    (["--teacher-method", "prefix"], PATTERNS, "--teacher-method prefix on lm: prefix tuning is not supported on causal-LM backbones"),
    (["--max-length", "8"], [*PATTERNS[:2], {"template": "the movie {text} is a very good and fun one it was {mask}",
                                             "verbalizer": "negative=bad;positive=good", "name": "long"}],
     "--patterns: pattern long: --template: template 'the movie {text} is a very good and fun one it was {mask}' leaves no room"),
    (["--temperature", "inf"], PATTERNS, "--temperature must be a positive finite number, got inf"),
    # sysfs refuses a new file to anyone, root too (tests/training/test_cli.py: UNWRITABLE)
    (["--task", "kernel", "--store", "/sys"], PATTERNS, "--store /sys: the task directory /sys/kernel cannot be written into"),
])
def test_pet_refuses_before_training_anything(extra, patterns, message, pet_setup, tmp_path, capsys, monkeypatch):
    """What would stop the run part way (a prefix teacher on a causal LM, a pattern with no room for
    the input) is found before the first teacher trains."""
    import training.pet as pet_mod

    if "/sys" in extra and not Path("/sys/kernel").is_dir():
        pytest.skip("needs /sys (Linux)")
    monkeypatch.setattr(pet_mod, "train", lambda *a, **k: pytest.fail("a teacher trained before the run was checked"))
    assert pet_main([*_pet_args(pet_setup, tmp_path, "pet-bad", patterns), *extra]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("adaptserve pet: error: ") and message in last, last
    assert not (tmp_path / "store").exists()


def test_a_non_utf8_unlabelled_file_is_named_by_line_and_byte_as_train_names_its_data(pet_setup, tmp_path, capsys,
                                                                                     monkeypatch):
    """--unlabelled is read by train's own reader (training.data.read_utf8), so a Latin-1 byte is
    found where it is, not only said to be somewhere in the file."""
    import training.pet as pet_mod

    args = _pet_args(pet_setup, tmp_path, "pet-latin", PATTERNS)
    (tmp_path / "u.csv").write_bytes(b"text\ngood fun\ncaf\xe9 noir\n")
    monkeypatch.setattr(pet_mod, "train", lambda *a, **k: pytest.fail("trained before the files were read"))
    assert pet_main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"adaptserve pet: error: {tmp_path / 'u.csv'}: not valid UTF-8 (line 3, byte offset 17: 0xe9); "
                    "re-save it as UTF-8 (e.g. `iconv -f cp1252 -t utf-8` if it came from Windows/Excel)"), last


def test_a_non_utf8_patterns_file_is_named_by_line_and_byte_as_train_names_its_data(pet_setup, tmp_path, capsys):
    """--patterns is read by train's reader (training.data.read_utf8): the line and byte offset of
    the bad byte, not the codec's "position 57"."""
    args = _pet_args(pet_setup, tmp_path, "pet-latin", PATTERNS)
    pats = tmp_path / "patterns.json"
    raw = (b'[{"template": "{text} it was {mask}",\n  "verbalizer": "negative=bad;positive=good"},\n'
           b' {"template": "{text} caf\xe9 {mask}", "verbalizer": "negative=bad;positive=good"}]\n')
    pats.write_bytes(raw)
    assert pet_main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"adaptserve pet: error: --patterns {pats}: not valid UTF-8 (line 3, byte offset {raw.index(0xe9)}: 0xe9); "
        "re-save it as UTF-8 (e.g. `iconv -f cp1252 -t utf-8` if it came from Windows/Excel)"), err
    with pytest.raises(ConfigError, match=r"--patterns .*: is a directory; expected a JSON file"):
        load_patterns(tmp_path)


class _Read(Exception):
    """Raised by a stand-in run_pet: the files were read, here is what it was given."""


# --unlabelled is read as --data is (training.data.read_texts): the same --format and --empty-text,
# and a problem named by file and line. (id, unlabelled file name, its content, extra flags, the
# error's text after the file's path, or the texts run_pet is given)
UNLABELLED = [
    ("bad JSON line", "u.jsonl", '{"text": "good fun"}\n{"text": good}\n', [],
     "line 2 is not valid JSON (Expecting value at column 10); each line must be one JSON object"),
    ("not an object", "u.jsonl", '"good fun"\n', [], 'line 1 is a JSON str, expected an object like {"text": "..."}'),
    ("an empty text refused", "u.csv", 'text,label\ngood fun,pos\n"",neg\nbad plot,neg\n', [],
     "row 2 (line 3): empty 'text'; fill it in or remove the row (or pass --empty-text 'keep' or 'skip')"),
    ("--empty-text skip", "u.csv", 'text,label\ngood fun,pos\n"",neg\nbad plot,neg\n', ["--empty-text", "skip"],
     ["good fun", "bad plot"]),
    ("--format jsonl", "u.txt", '{"text": "good fun"}\n{"text": "bad plot", "label": "neg"}\n', ["--format", "jsonl"],
     ["good fun", "bad plot"]),
    ("no text column", "u.csv", "sentence\ngood fun\n", [],
     "no column 'text' (the file has columns: sentence); pass --text-column to use another column"),
    # Without --format each file is read by its own extension: CSV labelled files, a JSONL unlabelled one.
    ("CSV data, JSONL unlabelled", "u.jsonl", '{"text": "good fun"}\n{"text": "bad plot"}\n', [], ["good fun", "bad plot"]),
    ("--format against the extension", "u.jsonl", '{"text": "good fun"}\n', ["--format", "csv"],
     "read as CSV since --format csv is every file's format, but its extension says JSONL; leave out --format to "
     "read each file by its extension (as CSV: no column 'text' (the file has columns: {\"text\": \"good fun\"}); "
     "pass --text-column to use another column)"),
]


@pytest.mark.parametrize("name, content, extra, expected", [c[1:] for c in UNLABELLED], ids=[c[0] for c in UNLABELLED])
def test_the_unlabelled_file_is_read_as_the_labelled_data_is(name, content, extra, expected, pet_setup, tmp_path,
                                                             capsys, monkeypatch):
    import training.pet as pet_mod

    def stand_in(splits, texts, *args, **kwargs):
        raise _Read(texts)

    monkeypatch.setattr(pet_mod, "run_pet", stand_in)
    args = _pet_args(pet_setup, tmp_path, "pet-unl", PATTERNS)
    (tmp_path / name).write_text(content, encoding="utf-8")
    args[args.index("--unlabelled") + 1] = str(tmp_path / name)
    if extra == ["--format", "jsonl"]:  # --format is every file's: the labelled ones in JSONL too, named .txt
        _, splits, _, _ = pet_setup
        for flag, split in (("--data", splits.train), ("--dev", splits.dev)):
            path = tmp_path / f"{flag[2:]}.txt"
            path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(split.texts, split.labels)))
            args[args.index(flag) + 1] = str(path)
    if isinstance(expected, list):
        with pytest.raises(_Read) as read:
            pet_main([*args, *extra])
        assert read.value.args[0] == expected
        return
    assert pet_main([*args, *extra]) == 1  # before run_pet: no traceback, one line naming the file and line
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"adaptserve pet: error: {tmp_path / name}: {expected}", err
