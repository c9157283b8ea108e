"""Labelled text-classification data: read CSV, TSV or JSONL files into a small typed dataset.

A file has a text column, optionally a second text column for sentence-pair tasks, and a label
column; labels are names (strings). The label vocabulary is built from the training file and every
other split is mapped onto it, so label index ``i`` means the same class everywhere. An unlabelled
file (PET's, ``read_texts``) is read by the same rules, without the label column.

Every problem with a file raises ``DataError`` with a message that names the file, the line/row
where it applies and what to do about it; nothing here prints or warns.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from service.engine.types import unprintable

FileFormat = Literal["csv", "tsv", "jsonl"]
# What to do with a row whose text (or text pair) is empty: the default refuses, because it is
# usually a broken export; "keep" reads it as "" (the public cr splits have 7 such rows, kept by
# LM-BFF, so "keep" is what reproduces published numbers); "skip" drops the row.
EmptyText = Literal["error", "keep", "skip"]
PathLike = str | os.PathLike[str]

log = logging.getLogger(__name__)

# The csv module refuses fields over 128 KiB by default; a long document is a valid training text
# (truncated to --max-length anyway), so allow up to this many characters per field.
MAX_FIELD_CHARS = 16 * 1024 * 1024
csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))

# Column names of the project's normalised data (see /work/shared/data/README.md).
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_TEXT_PAIR_COLUMN = "text_pair"
DEFAULT_LABEL_COLUMN = "label"

_FORMATS: tuple[FileFormat, ...] = ("csv", "tsv", "jsonl")
_EXTENSIONS: dict[str, FileFormat] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


class DataError(ValueError):
    """A data file (or an argument describing it) cannot be used; the message says what to fix."""


@dataclass(frozen=True, repr=False)
class LabelledData:
    """One split: parallel tuples of texts, optional second texts, and label names.

    ``label_names`` is the vocabulary shared by all splits of a task (its order defines the label
    indices); a split need not contain every class.
    """

    texts: tuple[str, ...]
    text_pairs: tuple[str, ...] | None
    labels: tuple[str, ...]
    label_names: tuple[str, ...]
    source: str | None = None  # the file it was read from, for messages and reports

    def __post_init__(self) -> None:
        # Accept any sequence from callers; store tuples so the dataset cannot change under a run.
        for name in ("texts", "labels", "label_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.text_pairs is not None:
            object.__setattr__(self, "text_pairs", tuple(self.text_pairs))
        n = len(self.texts)
        if len(self.labels) != n or (self.text_pairs is not None and len(self.text_pairs) != n):
            pairs = "-" if self.text_pairs is None else len(self.text_pairs)
            raise DataError(
                f"{self._name}: texts, text_pairs and labels differ in length "
                f"({n}, {pairs}, {len(self.labels)})"
            )
        duplicates = sorted(k for k, c in Counter(self.label_names).items() if c > 1)
        if duplicates:
            raise DataError(f"{self._name}: label_names repeats {_quoted(duplicates)}")
        unknown = sorted(set(self.labels) - set(self.label_names))
        if unknown:
            raise DataError(
                f"{self._name}: labels {_quoted(unknown)} are not in label_names "
                f"({', '.join(self.label_names)})"
            )

    @property
    def _name(self) -> str:
        return self.source or "<dataset>"

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return (
            f"LabelledData(source={self.source!r}, n={len(self)}, "
            f"pairs={self.has_pairs}, label_names={self.label_names!r})"
        )

    @property
    def has_pairs(self) -> bool:
        return self.text_pairs is not None

    @cached_property
    def label_ids(self) -> tuple[int, ...]:
        """Each row's label as an index into ``label_names``."""
        index = {name: i for i, name in enumerate(self.label_names)}
        return tuple(index[label] for label in self.labels)

    def label_counts(self) -> dict[str, int]:
        """Rows per class, in ``label_names`` order (0 for classes absent from this split)."""
        counts = Counter(self.labels)
        return {name: counts[name] for name in self.label_names}


@dataclass(frozen=True, repr=False)
class UnlabelledData:
    """Texts (and optional second texts) without labels: PET's unlabelled set (`read_texts`)."""

    texts: tuple[str, ...]
    text_pairs: tuple[str, ...] | None
    source: str | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return f"UnlabelledData(source={self.source!r}, n={len(self)}, pairs={self.has_pairs})"

    @property
    def has_pairs(self) -> bool:
        return self.text_pairs is not None


@dataclass(frozen=True)
class Splits:
    """The splits of one task, all sharing the training label vocabulary."""

    train: LabelledData
    dev: LabelledData | None = None
    test: LabelledData | None = None

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.train.label_names


# --------------------------------------------------------------------------------------------
# Public entry points


def read_train(
    path: PathLike,
    *,
    label_order: Sequence[str] | None = None,
    file_format: FileFormat | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
    text_pair_column: str | None = None,
    label_column: str = DEFAULT_LABEL_COLUMN,
    empty_text: EmptyText = "error",
) -> LabelledData:
    """Read a training file and build the label vocabulary from it.

    The vocabulary is ``label_order`` when given (every training label must be in it; it may name
    classes the file lacks), else the training labels sorted (numerically if all are integers, so
    "2" sorts before "10"). The file must contain at least two distinct labels.

    ``text_pair_column``: None reads the ``text_pair`` column if the file has one and single texts
    otherwise; a name makes that column required. ``empty_text``: see ``EmptyText``.
    """
    source = str(path)
    rows = _read_rows(path, file_format, text_column, text_pair_column, label_column, empty_text)
    counts = Counter(row.label for row in rows)
    if len(counts) < 2:
        (only,) = counts
        raise DataError(
            f"{source}: every training row ({len(rows)}) has label '{only}'; a classifier needs "
            f"at least two classes (is '{label_column}' the right label column?)"
        )
    _warn_near_duplicates(source, counts)
    if label_order is None:
        label_names = _sorted_labels(counts)
    else:
        label_names = _checked_label_order(label_order, "label_order")
        _check_labels_known(
            source, rows, label_names, f"not in label_order ({', '.join(label_names)})"
        )
    return _dataset(rows, label_names, source)


def read_eval(
    path: PathLike,
    label_names: Sequence[str],
    *,
    file_format: FileFormat | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
    text_pair_column: str | None = None,
    label_column: str = DEFAULT_LABEL_COLUMN,
    empty_text: EmptyText = "error",
    known_as: str = "the training labels",
) -> LabelledData:
    """Read a dev/test file and map its labels onto the training vocabulary ``label_names``.

    A label that is not in ``label_names`` is an error (the model could never predict it);
    ``known_as`` names that vocabulary in the message (a zero-shot task has no training labels).
    """
    source = str(path)
    label_names = _checked_label_order(label_names, "label_names")
    rows = _read_rows(path, file_format, text_column, text_pair_column, label_column, empty_text)
    _check_labels_known(source, rows, label_names, f"not in {known_as} ({', '.join(label_names)})")
    return _dataset(rows, label_names, source)


def load_splits(
    train: PathLike,
    dev: PathLike | None = None,
    test: PathLike | None = None,
    *,
    label_order: Sequence[str] | None = None,
    file_format: FileFormat | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
    text_pair_column: str | None = None,
    label_column: str = DEFAULT_LABEL_COLUMN,
    empty_text: EmptyText = "error",
) -> Splits:
    """Read train (and optionally dev/test) files of one task with one label vocabulary.

    All files must agree on whether the task is single-text or sentence-pair.
    """
    columns = dict(
        file_format=file_format,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        empty_text=empty_text,
    )
    train_data = read_train(train, label_order=label_order, **columns)
    others: dict[str, LabelledData | None] = {}
    for split, path in (("dev", dev), ("test", test)):
        if path is None:
            others[split] = None
            continue
        data = read_eval(path, train_data.label_names, **columns)
        if data.has_pairs != train_data.has_pairs:
            pair_column = text_pair_column or DEFAULT_TEXT_PAIR_COLUMN
            with_pairs, without = (train, path) if train_data.has_pairs else (path, train)
            raise DataError(
                f"{path}: {split} and train disagree on sentence pairs: {with_pairs} has a "
                f"'{pair_column}' column and {without} does not"
            )
        others[split] = data
    return Splits(train=train_data, dev=others["dev"], test=others["test"])


def read_texts(
    path: PathLike,
    *,
    file_format: FileFormat | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
    text_pair_column: str | None = None,
    empty_text: EmptyText = "error",
) -> UnlabelledData:
    """Read a file of texts without labels by ``read_train``'s rules (format, columns, empty
    texts, every problem a ``DataError`` naming the file and line), minus the label column: a
    label column, if the file has one, is ignored."""
    rows = _read_rows(path, file_format, text_column, text_pair_column, None, empty_text)
    pairs = [row.text_pair for row in rows if row.text_pair is not None]
    return UnlabelledData(tuple(row.text for row in rows), tuple(pairs) if pairs else None, str(path))


def data_hash(paths: PathLike | Iterable[PathLike]) -> str:
    """SHA-256 of the files' bytes, as a hex string, for recording which data a run used.

    For one file it is that file's own SHA-256 (what ``sha256sum`` prints). For several, it is
    the SHA-256 of their hex digests joined by newlines, in the order given: file names do not
    enter it, so the same data in another directory hashes the same, but swapping train and dev
    does not.
    """
    if isinstance(paths, (str, os.PathLike)):
        return _file_sha256(paths)
    digests = [_file_sha256(p) for p in paths]
    if not digests:
        raise DataError("data_hash: no files given")
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------
# Reading files


@dataclass(frozen=True)
class _Row:
    where: str  # "row 3 (line 4)" or "line 4", for messages
    text: str
    text_pair: str | None
    label: str | None  # None in an unlabelled file


def _read_rows(
    path: PathLike,
    file_format: FileFormat | None,
    text_column: str,
    text_pair_column: str | None,
    label_column: str | None,  # None: an unlabelled file (a label column there is ignored)
    empty_text: EmptyText,
) -> list[_Row]:
    source = str(path)
    if empty_text not in ("error", "keep", "skip"):
        raise DataError(f"empty_text must be 'error', 'keep' or 'skip', not {empty_text!r}")
    fmt = _resolve_format(source, file_format)
    content = read_utf8(Path(path))
    if not content.strip():
        raise DataError(f"{source}: file is empty")
    try:
        if fmt == "jsonl":
            rows = _read_jsonl(source, content, text_column, text_pair_column, label_column, empty_text)
        else:
            rows = _read_delimited(
                source, content, fmt, text_column, text_pair_column, label_column, empty_text
            )
    except DataError as err:
        by_extension = _EXTENSIONS.get(Path(source).suffix.lower())
        if file_format is None or by_extension in (None, fmt):
            raise
        # One format given for every file (`--format`), and this file's extension names another:
        # most likely train.csv + unlabelled.jsonl, which each read by their extension.
        raise DataError(f"{source}: read as {fmt.upper()} since file_format={fmt} is every file's format, but its "
                        f"extension says {by_extension.upper()}; leave out file_format= to read each file by its "
                        f"extension (as {fmt.upper()}: {str(err).removeprefix(f'{source}: ')})") from None
    if not rows:  # every row skipped for an empty text
        raise DataError(f"{source}: no rows left after skipping rows with empty text")
    return rows


def _resolve_format(source: str, file_format: str | None) -> FileFormat:
    if file_format is not None:
        if file_format not in _FORMATS:
            raise DataError(
                f"{source}: unknown file_format '{file_format}'; use one of {', '.join(_FORMATS)}"
            )
        return file_format  # type: ignore[return-value]  # checked just above
    suffix = Path(source).suffix.lower()
    if Path(source).is_dir():
        raise DataError(f"{source}: is a directory, not a data file")
    if suffix not in _EXTENSIONS:
        shown = f"extension '{suffix}'" if suffix else "no extension"
        raise DataError(
            f"{source}: cannot tell the format from {shown}; name the file "
            f"{' / '.join(_EXTENSIONS)} or pass file_format= one of {', '.join(_FORMATS)}"
        )
    return _EXTENSIONS[suffix]


def read_utf8(path: Path, expected: str = "a CSV, TSV or JSONL file") -> str:
    """A data file's text, or a DataError naming what is wrong: a missing or unreadable file, or
    the line and byte offset of the first byte that is not UTF-8. Every data file a command reads
    (labelled or not: `adaptserve pet --unlabelled`, its `--patterns`) goes through here;
    `expected` names what a directory given instead should have been."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; expected {expected}") from None
    except PermissionError:
        raise DataError(f"{path}: cannot read the file (permission denied)") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None
    try:
        # utf-8-sig drops the byte-order mark spreadsheet programs put at the start of UTF-8 CSV.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        bad = raw[err.start : err.end].hex()
        raise DataError(
            f"{path}: not valid UTF-8 (line {line}, byte offset {err.start}: 0x{bad}); re-save it "
            f"as UTF-8 (e.g. `iconv -f cp1252 -t utf-8` if it came from Windows/Excel)"
        ) from None


def _read_delimited(
    source: str,
    content: str,
    fmt: FileFormat,
    text_column: str,
    text_pair_column: str | None,
    label_column: str | None,
    empty_text: EmptyText,
) -> list[_Row]:
    if fmt == "tsv":
        # TSV has no quoting (IANA text/tab-separated-values; GLUE's .tsv files): a stray '"' in a
        # sentence must not swallow the following lines, as it would under CSV quoting rules.
        reader = csv.reader(
            io.StringIO(content, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE
        )
    else:
        # strict: a quote closed mid-field (`"a" b`) is an error, not a field that swallows the
        # rows up to the next quote
        reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    last_line = 0  # the line the last complete record ended on
    try:
        header = [name.strip() for name in next(reader)]
        repeated = sorted(k for k, c in Counter(header).items() if c > 1)
        if repeated:
            raise DataError(f"{source}: the header repeats column {_quoted(repeated)}")
        text_i, pair_i, label_i = _column_indices(
            source, header, text_column, text_pair_column, label_column, "column", "the file has"
        )
        rows: list[_Row] = []
        n_records = 0
        last_line = reader.line_num
        for record in reader:
            # A record may span several lines (quoted newlines); report the line it starts on.
            start_line, last_line = last_line + 1, reader.line_num
            if not record:  # a blank line
                continue
            n_records += 1
            where = f"row {n_records} (line {start_line})"
            if [cell.strip() for cell in record] == header:
                raise DataError(f"{source}: {where} repeats the header (files joined into one?); remove it, or "
                                + ("it would be read as a text" if label_i is None else
                                   f"its '{header[label_i]}' would become a class of its own"))
            if len(record) != len(header):
                hint = (
                    "quote fields that contain commas"
                    if fmt == "csv"
                    else "fields must not contain tab characters"
                )
                raise DataError(
                    f"{source}: {where} has {len(record)} fields but the header has "
                    f"{len(header)} ({hint})"
                )
            row = _row(
                source,
                where,
                (header[text_i], record[text_i]),
                None if pair_i is None else (header[pair_i], record[pair_i]),
                None if label_i is None else (header[label_i], record[label_i]),
                empty_text,
            )
            if row is not None:
                rows.append(row)
    except csv.Error as err:
        if "field larger than field limit" in str(err):
            raise DataError(f"{source}: the record that starts on line {last_line + 1} has a field of more than "
                            f"{MAX_FIELD_CHARS:,} characters" + (" (or a quote opened there and never closed)" if fmt == "csv" else "")
                            ) from None
        hint = (f" (in the record that starts on line {last_line + 1}: a quote opened there and never closed, or a "
                'quote inside a quoted field not doubled ("")?)' if fmt == "csv" else "")
        raise DataError(
            f"{source}: cannot parse line {reader.line_num} as {fmt.upper()}: {err}{hint}"
        ) from None
    if n_records == 0:
        raise DataError(f"{source}: has a header but no data rows")
    return rows


def _read_jsonl(
    source: str,
    content: str,
    text_column: str,
    text_pair_column: str | None,
    label_column: str | None,
    empty_text: EmptyText,
) -> list[_Row]:
    records: list[tuple[int, dict[str, object]]] = []
    # Split on "\n" only: str.splitlines() would also split on U+2028 etc., which JSON strings
    # may contain unescaped.
    for line_no, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{source}: line {line_no} is not valid JSON ({err.msg} at column {err.colno}); "
                f"each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            label = "" if label_column is None else f', "{label_column}": "..."'
            raise DataError(
                f"{source}: line {line_no} is a JSON {type(obj).__name__}, expected an object "
                f'like {{"{text_column}": "..."{label}}}'
            )
        records.append((line_no, obj))
    if not records:
        raise DataError(f"{source}: file is empty")
    if text_pair_column is None and any(DEFAULT_TEXT_PAIR_COLUMN in obj for _, obj in records):
        # Auto-detected pairs: decided over the whole file, so a pair key that only appears from
        # line 2 on is not silently dropped, and lines lacking it are reported.
        text_pair_column = DEFAULT_TEXT_PAIR_COLUMN
    rows: list[_Row] = []
    for line_no, obj in records:
        keys = list(obj)
        where = f"line {line_no}"
        text_i, pair_i, label_i = _column_indices(
            f"{source}: {where}", keys, text_column, text_pair_column, label_column, "key", "it has"
        )
        row = _row(
            source,
            where,
            (keys[text_i], obj[keys[text_i]]),
            None if pair_i is None else (keys[pair_i], obj[keys[pair_i]]),
            None if label_i is None else (keys[label_i], obj[keys[label_i]]),
            empty_text,
        )
        if row is not None:
            rows.append(row)
    return rows


def _column_indices(
    context: str,
    available: list[str],
    text_column: str,
    text_pair_column: str | None,
    label_column: str | None,
    noun: str,
    has: str,
) -> tuple[int, int | None, int | None]:
    """Positions of the text, optional text-pair and label columns among ``available`` (no label
    position without a ``label_column``: an unlabelled file)."""

    def find(name: str, param: str) -> int:
        if name in available:
            return available.index(name)
        shown = ", ".join(available) if available else "none"
        hint = ""
        for sep, what, fmt in (("\t", "tabs", "tsv"), (",", "commas", "csv")):
            if len(available) == 1 and sep in available[0]:  # one column holding separators: read as the wrong format
                hint = f"; its header is one {noun} holding {what}: if the file is {fmt.upper()}, pass file_format={fmt}"
        raise DataError(
            f"{context}: no {noun} '{name}' ({has} {noun}s: {shown}); "
            f"pass {param}= to use another {noun}{hint}"
        )

    text_i = find(text_column, "text_column")
    label_i = None if label_column is None else find(label_column, "label_column")
    if text_pair_column is not None:
        pair_i: int | None = find(text_pair_column, "text_pair_column")
    elif DEFAULT_TEXT_PAIR_COLUMN in available:
        pair_i = available.index(DEFAULT_TEXT_PAIR_COLUMN)
    else:
        pair_i = None
    named = [(param, i) for param, i in (("text_column", text_i), ("text_pair_column", pair_i), ("label_column", label_i))
             if i is not None]
    shared = [f"{param}={available[i]!r}" for param, i in named if sum(j == i for _, j in named) > 1]
    if shared:
        raise DataError(f"{context}: {' and '.join(shared)} name the same {noun}; "
                        f"the text, the text pair and the label each need their own {noun}")
    return text_i, pair_i, label_i


def _row(
    source: str,
    where: str,
    text: tuple[str, object],
    text_pair: tuple[str, object] | None,
    label: tuple[str, object] | None,  # None: an unlabelled file
    empty_text: EmptyText,
) -> _Row | None:
    """Check one record's cells (each given as (column, value)) and build the row.

    Returns None for a row with an empty text that ``empty_text="skip"`` drops.
    """

    def cell(column: str, value: object, allow_int: bool = False) -> str:
        if isinstance(value, str):
            pass
        elif allow_int and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # JSONL labels written as numbers: 0/1 become "0"/"1"
        elif value is None:
            value = ""
        else:
            expected = "a string or an integer" if allow_int else "a string"
            raise DataError(
                f"{source}: {where}: '{column}' is a JSON {type(value).__name__}, "
                f"expected {expected}"
            )
        return value

    def text_cell(column: str, value: object) -> str | None:
        value = cell(column, value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON's "\ud800" escapes decode to half a character
            raise DataError(f"{source}: {where}: '{column}' holds a lone surrogate ({value[err.start]!r} at character "
                            f"{err.start}), which is not text; fix the escape that produced it") from None
        if value.strip() or empty_text == "keep":
            return value
        if empty_text == "skip":
            return None
        raise DataError(
            f"{source}: {where}: empty '{column}'; fill it in or remove the row "
            f"(or pass empty_text='keep' or 'skip')"
        )

    label_value = None if label is None else cell(*label, allow_int=True).strip()
    if label is not None and not label_value:
        raise DataError(f"{source}: {where}: empty '{label[0]}'; every row needs a label")
    if label is not None and unprintable(label_value):
        raise DataError(f"{source}: {where}: '{label[0]}' {label_value!r} holds a control character "
                        "(a tab, a newline, NUL) or a lone surrogate; labels must be printable text")
    first = text_cell(*text)
    second = None if text_pair is None else text_cell(*text_pair)
    if first is None or (text_pair is not None and second is None):
        return None
    return _Row(
        where=where,
        text=first,
        text_pair=second,
        # Labels are identifiers: " positive" from a ", " separated file means "positive".
        label=label_value,
    )


# --------------------------------------------------------------------------------------------
# Labels


def _warn_near_duplicates(source: str, counts: Counter) -> None:
    """Labels that differ only in case ('Pos', 'pos') are separate classes, as written; say so,
    since that is more often a slip in the file than two classes."""
    groups: dict[str, list[str]] = {}
    for label in counts:
        groups.setdefault(label.casefold(), []).append(label)
    for same in (sorted(g) for g in groups.values() if len(g) > 1):
        log.warning("%s: labels %s differ only in case (%s rows); they are trained as %d separate "
                    "classes: if they are one, write them alike", source, _quoted(same),
                    ", ".join(str(counts[x]) for x in same), len(same))


def _sorted_labels(labels: Iterable[str]) -> tuple[str, ...]:
    labels = set(labels)
    try:
        return tuple(sorted(labels, key=int))
    except ValueError:
        return tuple(sorted(labels))


def _checked_label_order(label_names: Sequence[str], param: str) -> tuple[str, ...]:
    if isinstance(label_names, str):
        raise DataError(
            f"{param} must be a sequence of label names, not the string '{label_names}'"
        )
    names = tuple(label_names)
    if not names:
        raise DataError(f"{param} is empty")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{param} must hold non-empty strings, got {name!r}")
    repeated = sorted(k for k, c in Counter(names).items() if c > 1)
    if repeated:
        raise DataError(f"{param} repeats {_quoted(repeated)}: {', '.join(names)}")
    return names


def _check_labels_known(
    source: str, rows: list[_Row], label_names: tuple[str, ...], problem: str
) -> None:
    known = set(label_names)
    first: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for row in rows:
        if row.label not in known:
            first.setdefault(row.label, row.where)
            counts[row.label] += 1
    if not counts:
        return
    details = "; ".join(
        f"'{label}' ({counts[label]} row{'s' if counts[label] > 1 else ''}, first at {where})"
        for label, where in first.items()
    )
    noun = "label" if len(counts) == 1 else "labels"
    raise DataError(f"{source}: {noun} {problem}: {details}")


def _dataset(rows: list[_Row], label_names: tuple[str, ...], source: str) -> LabelledData:
    # Every row of a file has a text pair or none does (the column is in the header or not).
    pairs = [row.text_pair for row in rows if row.text_pair is not None]
    return LabelledData(
        texts=tuple(row.text for row in rows),
        text_pairs=tuple(pairs) if pairs else None,
        labels=tuple(row.label for row in rows),
        label_names=label_names,
        source=source,
    )


def _file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None
    return digest.hexdigest()


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)
