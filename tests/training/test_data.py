"""training.data: reading labelled CSV/TSV/JSONL, label vocabularies, and the errors people see."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from training.data import (
    DataError,
    LabelledData,
    data_hash,
    load_splits,
    read_eval,
    read_texts,
    read_train,
)

SHARED_DATA = Path("/work/shared/data")
TRAIN = "text,label\ngood film,positive\nbad film,negative\n"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Bad inputs: one table, each case asserting what the message tells the person.


@dataclass
class Bad:
    id: str
    name: str  # file name inside tmp_path
    content: str | bytes | None  # None: the file does not exist
    expected: list[str]  # substrings of the message
    kwargs: dict = field(default_factory=dict)
    call: str = "train"  # "train", "eval" (against negative/positive) or "splits"
    names_file: bool = True  # the message must contain the file's path


BAD_CASES = [
    Bad("missing file", "nope.csv", None, ["file not found"]),
    Bad("not utf-8", "latin1.csv", b"text,label\ncaf\xe9 au lait,positive\nbad,negative\n",
        ["not valid UTF-8", "line 2", "0xe9", "iconv"]),
    Bad("empty file", "empty.csv", "", ["file is empty"]),
    Bad("blank file", "blank.tsv", "\n   \n", ["file is empty"]),
    Bad("empty jsonl", "empty.jsonl", "\n\n", ["file is empty"]),
    Bad("header only", "header.csv", "text,label\n", ["has a header but no data rows"]),
    Bad("header only, blank lines", "header2.csv", "text,label\n\n\n",
        ["has a header but no data rows"]),
    Bad("unknown text column", "cols.csv", "sentence,label\na,positive\nb,negative\n",
        ["no column 'text'", "the file has columns: sentence, label", "text_column="]),
    Bad("unknown label column", "cols2.csv", TRAIN,
        ["no column 'gold'", "the file has columns: text, label", "label_column="],
        kwargs={"label_column": "gold"}),
    Bad("unknown pair column", "cols3.csv", TRAIN,
        ["no column 'hypothesis'", "text, label", "text_pair_column="],
        kwargs={"text_pair_column": "hypothesis"}),
    Bad("label column as the text pair", "same.csv", TRAIN,
        ["text_pair_column='label' and label_column='label' name the same column"], kwargs={"text_pair_column": "label"}),
    Bad("text column as the text pair", "same2.csv", TRAIN,
        ["text_column='text' and text_pair_column='text' name the same column"], kwargs={"text_pair_column": "text"}),
    Bad("header again mid-file", "joined.csv", "text,label\ngood,pos\ntext,label\nbad,neg\n",
        ["row 2 (line 3) repeats the header (files joined into one?)"]),
    Bad("repeated header", "dup.csv", "text,label,text\na,positive,b\n",
        ["the header repeats column 'text'"]),
    Bad("empty text cell", "cells.csv", "text,label\ngood,positive\n,negative\n",
        ["row 2 (line 3)", "empty 'text'", "empty_text='keep'"]),
    Bad("whitespace text cell", "cells2.csv", "text,label\ngood,positive\n   ,negative\n",
        ["row 2 (line 3)", "empty 'text'"]),
    Bad("empty pair cell", "pairs.csv", "text,text_pair,label\na,b,yes\nc,,no\n",
        ["row 2 (line 3)", "empty 'text_pair'"]),
    Bad("empty label cell", "labels.csv", "text,label\ngood,\nbad,negative\n",
        ["row 1 (line 2)", "empty 'label'"]),
    Bad("control character in a label", "ctl.jsonl",
        '{"text": "a", "label": "pos\\u0000"}\n{"text": "b", "label": "neg"}\n',
        ["line 1: 'label' 'pos\\x00' holds a control character", "printable"]),
    Bad("lone surrogate in a text", "sur.jsonl",
        '{"text": "a", "label": "pos"}\n{"text": "b\\ud800c", "label": "neg"}\n',
        ["line 2: 'text' holds a lone surrogate ('\\ud800' at character 1)"]),
    Bad("row numbers count quoted newlines", "multi.csv",
        'text,label\n"two\nlines",positive\n,negative\n', ["row 2 (line 4)", "empty 'text'"]),
    Bad("too many csv fields", "fields.csv", "text,label\ngood,positive\nbad, sad,film,negative\n",
        ["row 2 (line 3) has 4 fields but the header has 2", "quote fields"]),
    Bad("unclosed quote", "unclosed.csv", 'text,label\ngood,pos\n"fine movie,pos\nbad,neg\nmeh,neg\n',
        ["cannot parse line 5 as CSV: unexpected end of data", "the record that starts on line 3", "never closed"]),
    Bad("quote closed mid-field", "midfield.csv",
        'text,label\ngood,pos\n"fine movie,pos\nbad,neg\nsaid "hi" twice,neg\nok,pos\n',
        ["cannot parse line 5 as CSV", "the record that starts on line 3"]),  # it used to swallow two rows
    Bad("too few tsv fields", "fields.tsv", "text\tlabel\ngood\tpositive\nbad negative\n",
        ["row 2 (line 3) has 1 fields but the header has 2", "tab"]),
    Bad("label not in train", "dev.csv",
        "text,label\na,positive\nb,neutral\nc,neutral\nd,negative\n",
        ["label not in the training labels (negative, positive)",
         "'neutral' (2 rows, first at row 2 (line 3))"], call="eval"),
    Bad("two labels not in train", "dev2.csv", "text,label\na,meh\nb,neutral\n",
        ["labels not in the training labels", "'meh' (1 row, first at row 1 (line 2))",
         "'neutral'"], call="eval"),
    Bad("train label not in label_order", "order.csv", "text,label\na,pos\nb,neg\nc,mixed\n",
        ["not in label_order (neg, pos)", "'mixed' (1 row, first at row 3 (line 4))"],
        kwargs={"label_order": ["neg", "pos"]}),
    Bad("single class", "one.csv", "text,label\na,positive\nb,positive\n",
        ["every training row (2) has label 'positive'", "at least two classes"]),
    Bad("malformed jsonl", "bad.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n',
        ["line 2 is not valid JSON", "column"]),
    Bad("jsonl line not an object", "list.jsonl", '["a", "x"]\n', ["line 1 is a JSON list"]),
    Bad("jsonl missing key", "keys.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "labels": "y"}\n',
        ["line 2: no key 'label'", "it has keys: text, labels", "label_column="]),
    Bad("jsonl text not a string", "types.jsonl",
        '{"text": 3, "label": "x"}\n{"text": "b", "label": "y"}\n',
        ["line 1: 'text' is a JSON int, expected a string"]),
    Bad("jsonl float label", "types2.jsonl",
        '{"text": "a", "label": 0.5}\n{"text": "b", "label": 1}\n',
        ["line 1: 'label' is a JSON float, expected a string or an integer"]),
    Bad("jsonl null text", "null.jsonl",
        '{"text": "a", "label": "x"}\n{"text": null, "label": "y"}\n',
        ["line 2: empty 'text'"]),
    Bad("jsonl pair key on some lines only", "somepairs.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "text_pair": "c", "label": "y"}\n',
        ["line 1: no key 'text_pair'"]),
    Bad("unknown extension", "data.txt", TRAIN, ["extension '.txt'", "file_format="]),
    Bad("no extension", "data", TRAIN, ["no extension", "file_format="]),
    Bad("unknown file_format", "data.csv", TRAIN, ["unknown file_format 'xlsx'"],
        kwargs={"file_format": "xlsx"}),
    Bad("all rows skipped", "skipall.csv", "text,label\n,positive\n ,negative\n",
        ["no rows left after skipping"], kwargs={"empty_text": "skip"}),
    Bad("bad empty_text", "data.csv", TRAIN, ["empty_text must be"],
        kwargs={"empty_text": "drop"}, names_file=False),
    Bad("repeated label_order", "data.csv", TRAIN, ["label_order repeats 'positive'"],
        kwargs={"label_order": ["positive", "negative", "positive"]}, names_file=False),
    Bad("label_order is a string", "data.csv", TRAIN, ["not the string 'positive'"],
        kwargs={"label_order": "positive"}, names_file=False),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_bad_input_message(tmp_path: Path, case: Bad) -> None:
    path = tmp_path / case.name
    if case.content is not None:
        write(path, case.content)
    with pytest.raises(DataError) as info:
        if case.call == "train":
            read_train(path, **case.kwargs)
        else:
            read_eval(path, ["negative", "positive"], **case.kwargs)
    message = str(info.value)
    for expected in case.expected:
        assert expected in message, f"{expected!r} not in {message!r}"
    if case.names_file:
        assert str(path) in message


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.mkdir()
    with pytest.raises(DataError, match="is a directory"):
        read_train(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", TRAIN)
    path.chmod(0)
    with pytest.raises(DataError, match="permission denied"):
        read_train(path)


def test_splits_disagree_on_pairs(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", "text,text_pair,label\na,b,yes\nc,d,no\n")
    dev = write(tmp_path / "dev.csv", "text,label\na,yes\n")
    with pytest.raises(DataError) as info:
        load_splits(train, dev)
    message = str(info.value)
    assert "dev and train disagree on sentence pairs" in message
    assert f"{train} has a 'text_pair' column and {dev} does not" in message


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


def test_dataset_checks_its_fields() -> None:
    with pytest.raises(DataError, match="differ in length"):
        LabelledData(texts=["a", "b"], text_pairs=None, labels=["x"], label_names=["x", "y"])
    with pytest.raises(DataError, match="'z' are not in label_names"):
        LabelledData(texts=["a"], text_pairs=None, labels=["z"], label_names=["x", "y"])
    with pytest.raises(DataError, match="repeats 'x'"):
        LabelledData(texts=["a"], text_pairs=None, labels=["x"], label_names=["x", "x"])


# --------------------------------------------------------------------------------------------
# Happy paths


def test_csv(tmp_path: Path) -> None:
    content = 'text,label\n"good, really",positive\nbad,negative\nok,positive\n'
    path = write(tmp_path / "train.csv", content)
    data = read_train(path)
    assert data.texts == ("good, really", "bad", "ok")
    assert data.text_pairs is None and not data.has_pairs
    assert data.labels == ("positive", "negative", "positive")
    assert data.label_names == ("negative", "positive")  # sorted
    assert data.label_ids == (1, 0, 1)
    assert data.label_counts() == {"negative": 1, "positive": 2}
    assert len(data) == 3
    assert data.source == str(path)
    assert "n=3" in repr(data)


def test_tsv_has_no_quoting(tmp_path: Path) -> None:
    # A lone '"' in a TSV sentence is text, not the start of a quoted field spanning lines.
    path = write(tmp_path / "train.tsv", 'text\tlabel\nhe said "no\tnegative\nfine\tpositive\n')
    data = read_train(path)
    assert data.texts == ('he said "no', "fine")
    assert data.labels == ("negative", "positive")


def test_jsonl_with_integer_labels_sorts_numerically(tmp_path: Path) -> None:
    lines = [
        '{"text": "a", "label": 10}',
        "",
        '{"text": "b", "label": 2}',
        '{"text": "c", "label": "2"}',
    ]
    data = read_train(write(tmp_path / "train.jsonl", "\n".join(lines) + "\n"))
    assert data.labels == ("10", "2", "2")
    assert data.label_names == ("2", "10")  # numeric order, not "10" < "2"


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    text = "first\u2028second"
    content = '{"text": "%s", "label": "x"}\n{"text": "b", "label": "y"}\n' % text
    data = read_train(write(tmp_path / "train.jsonl", content))
    assert data.texts == (text, "b")


def test_pair_data_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = write(
        tmp_path / "train.csv",
        "text,text_pair,label\n"
        "A man sleeps.,A person rests.,entailment\n"
        "It rains.,It is dry.,not_entailment\n",
    )
    jsonl_path = write(
        tmp_path / "train.jsonl",
        '{"text": "A man sleeps.", "text_pair": "A person rests.", "label": "entailment"}\n'
        '{"label": "not_entailment", "text_pair": "It is dry.", "text": "It rains."}\n',
    )
    for path in (csv_path, jsonl_path):
        data = read_train(path)
        assert data.has_pairs
        assert data.texts == ("A man sleeps.", "It rains.")
        assert data.text_pairs == ("A person rests.", "It is dry.")
        assert data.label_names == ("entailment", "not_entailment")


def test_configurable_columns_and_explicit_format(tmp_path: Path) -> None:
    path = write(
        tmp_path / "train.txt",
        "premise\thypothesis\tgold\textra\np1\th1\tyes\t-\np2\th2\tno\t-\n",
    )
    data = read_train(
        path,
        file_format="tsv",
        text_column="premise",
        text_pair_column="hypothesis",
        label_column="gold",
    )
    assert data.texts == ("p1", "p2")
    assert data.text_pairs == ("h1", "h2")
    assert data.labels == ("yes", "no")


def test_bom_crlf_blank_lines_and_label_whitespace(tmp_path: Path) -> None:
    content = "\ufefftext,label\r\ngood, positive\r\n\r\nbad,negative\r\n\r\n"
    data = read_train(write(tmp_path / "train.csv", content))
    assert data.texts == ("good", "bad")
    assert data.labels == ("positive", "negative")


def test_label_order_may_name_classes_missing_from_train(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", TRAIN)
    data = read_train(path, label_order=["positive", "neutral", "negative"])
    assert data.label_names == ("positive", "neutral", "negative")
    assert data.label_ids == (0, 2)
    assert data.label_counts() == {"positive": 1, "neutral": 0, "negative": 1}


def test_empty_text_keep_and_skip(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\ngood,positive\n,negative\nbad,negative\n")
    kept = read_train(path, empty_text="keep")
    assert kept.texts == ("good", "", "bad")
    skipped = read_train(path, empty_text="skip")
    assert skipped.texts == ("good", "bad")
    assert skipped.labels == ("positive", "negative")


# An unlabelled file (PET's) is read by the same rules, minus the label column: (file name,
# content, read_texts options, the message's text, or the texts and pairs read).
UNLABELLED = [
    ("labels ignored", "u.csv", "text,label\ngood,positive\nbad,\n", {}, (("good", "bad"), None)),
    ("no label column", "u.tsv", "text\ngood film\nbad \"film\n", {}, (("good film", 'bad "film'), None)),
    ("pairs", "u.jsonl", '{"text": "a", "text_pair": "b"}\n{"text": "c", "text_pair": "d"}\n', {},
     (("a", "c"), ("b", "d"))),
    ("--format", "u.txt", '{"text": "a"}\n\n{"text": "b"}\n', {"file_format": "jsonl"}, (("a", "b"), None)),
    ("empty kept", "u.csv", "text\ngood\n\"\"\n", {"empty_text": "keep"}, (("good", ""), None)),
    ("empty skipped", "u.csv", "text\ngood\n\"\"\n", {"empty_text": "skip"}, (("good",), None)),
    ("empty refused", "u.csv", "text\ngood\n\"\"\n", {},
     "u.csv: row 2 (line 3): empty 'text'; fill it in or remove the row (or pass empty_text='keep' or 'skip')"),
    ("bad JSON line", "u.jsonl", '{"text": "a"}\n{"text": b}\n', {},
     "u.jsonl: line 2 is not valid JSON (Expecting value at column 10); each line must be one JSON object"),
    ("not an object", "u.jsonl", '["a"]\n', {}, 'u.jsonl: line 1 is a JSON list, expected an object like {"text": "..."}'),
    ("a number as text", "u.jsonl", '{"text": 3}\n', {}, "u.jsonl: line 1: 'text' is a JSON int, expected a string"),
    ("no text column", "u.csv", "sentence\ngood\n", {},
     "u.csv: no column 'text' (the file has columns: sentence); pass text_column= to use another column"),
    ("unknown extension", "u.txt", "text\ngood\n", {}, "u.txt: cannot tell the format from extension '.txt'"),
    ("short row", "u.csv", "text,label\ngood\n", {}, "u.csv: row 1 (line 2) has 1 fields but the header has 2"),
    ("header repeated", "u.csv", "text\ngood\ntext\n", {},
     "u.csv: row 2 (line 3) repeats the header (files joined into one?); remove it, or it would be read as a text"),
    ("no rows", "u.csv", "text\n", {}, "u.csv: has a header but no data rows"),
]


@pytest.mark.parametrize("name, content, options, expected", [c[1:] for c in UNLABELLED], ids=[c[0] for c in UNLABELLED])
def test_an_unlabelled_file_is_read_by_the_labelled_rules(tmp_path: Path, name, content, options, expected) -> None:
    path = write(tmp_path / name, content)
    if isinstance(expected, str):
        with pytest.raises(DataError) as err:
            read_texts(path, **options)
        assert str(err.value).startswith(f"{tmp_path / expected}"), err.value
        return
    data = read_texts(path, **options)
    assert (data.texts, data.text_pairs) == expected and data.source == str(path)


def test_load_splits_maps_dev_and_test_onto_train_labels(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", "text,label\na,b_cls\nb,a_cls\nc,c_cls\n")
    dev = write(tmp_path / "dev.csv", "text,label\nd,c_cls\ne,c_cls\n")  # not every class
    test = write(tmp_path / "test.jsonl", '{"text": "f", "label": "a_cls"}\n')
    splits = load_splits(train, dev, test)
    assert splits.label_names == ("a_cls", "b_cls", "c_cls")
    assert splits.dev is not None and splits.test is not None
    assert splits.dev.label_names == splits.label_names
    assert splits.dev.label_ids == (2, 2)
    assert splits.test.label_ids == (0,)
    assert load_splits(train).dev is None


def test_data_hash(tmp_path: Path) -> None:
    a = write(tmp_path / "a.csv", TRAIN)
    b = write(tmp_path / "b.csv", "text,label\nx,y\n")
    moved = write(tmp_path / "elsewhere.csv", TRAIN)
    assert data_hash(a) == hashlib.sha256(TRAIN.encode()).hexdigest()
    assert data_hash([a]) == data_hash(str(a))
    assert data_hash([a, b]) == data_hash([moved, b])  # names do not matter
    assert data_hash([a, b]) != data_hash([b, a])  # order does
    assert len(data_hash([a, b])) == 64
    with pytest.raises(DataError, match="file not found"):
        data_hash([a, tmp_path / "missing.csv"])
    with pytest.raises(DataError, match="no files"):
        data_hash([])


# --------------------------------------------------------------------------------------------
# The project's real data (/work/shared/data), where this machine has it.


def test_real_sst2_kshot_train() -> None:
    path = SHARED_DATA / "sst2" / "k-shot" / "16-13" / "train.csv"
    if not path.exists():
        pytest.skip(f"{path} not present")
    data = read_train(path)
    assert not data.has_pairs
    assert data.label_names == ("negative", "positive")
    assert data.label_counts() == {"negative": 16, "positive": 16}
    assert all(text.strip() for text in data.texts)
    assert len(data_hash(path)) == 64


KSHOT_TASKS = ["sst2", "mr", "cr", "mpqa", "subj", "rte", "mrpc", "agnews"]


@pytest.mark.parametrize("task", KSHOT_TASKS)
def test_real_kshot_splits(task: str) -> None:
    root = SHARED_DATA / task / "k-shot" / "16-13"
    if not (root / "train.csv").exists():
        pytest.skip(f"{root} not present")
    # empty_text="keep": the public cr splits have rows with empty text (see EmptyText).
    splits = load_splits(root / "train.csv", root / "dev.csv", empty_text="keep")
    assert splits.dev is not None
    assert set(splits.train.label_counts().values()) == {16}
    assert splits.dev.label_names == splits.train.label_names
    assert splits.train.has_pairs == (task in ("rte", "mrpc"))


def test_labels_differing_only_in_case_are_kept_apart_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "t.csv", "text,label\ngood,Pos\nfine,pos\nnice,pos \nbad,neg\n")
    with caplog.at_level("WARNING", logger="training.data"):
        data = read_train(path)
    assert data.label_names == ("Pos", "neg", "pos")  # cells are stripped: 'pos ' is 'pos'
    (record,) = caplog.records
    assert "labels 'Pos', 'pos' differ only in case (1, 2 rows)" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.data"):
        read_train(write(tmp_path / "ok.csv", TRAIN))
    assert caplog.records == []


def test_a_long_document_is_a_valid_field_and_a_runaway_one_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fields past the csv module's 128 KiB default are read (a long text is truncated to
    --max-length later); past this reader's own limit the message says what happened, without
    blaming a quote the file does not have."""
    import csv

    from training import data as data_module

    long_text = "word " * 60_000  # 300,000 characters, unquoted
    path = write(tmp_path / "long.csv", f"text,label\n{long_text},pos\nshort,neg\n")
    assert read_train(path).texts[0].strip() == long_text.strip()
    monkeypatch.setattr(data_module, "MAX_FIELD_CHARS", 100_000)
    limit = csv.field_size_limit(100_000)
    try:
        with pytest.raises(DataError, match=r"the record that starts on line 2 has a field of more than 100,000 characters"):
            read_train(path)
    finally:
        csv.field_size_limit(limit)
