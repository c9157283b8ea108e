"""The docs name only settings that exist, and quote their defaults as service/settings.py has them.

An operator copies `ADAPTSERVE_*` names out of the README and docs/*.md: a renamed setting left in a
doc is silently ignored (only warned about) when set, and a default quoted wrong sizes a deployment
wrong. Defaults are read where a doc writes one right after the name: `ADAPTSERVE_X` (default 15 s),
`ADAPTSERVE_X`, default 2, `ADAPTSERVE_X` (64 KiB), `ADAPTSERVE_X` (8000 by default), or a table
row `| ADAPTSERVE_X ... | 64 |`.
"""
from __future__ import annotations

import re

import pytest

from service.settings import ENV_PREFIX, OTHER_VARIABLES, Settings
from tests.docs import DOCS, REPO

SETTINGS = {f"{ENV_PREFIX}{name.upper()}": name for name in Settings.model_fields}

# A whole name; a family (`ADAPTSERVE_S3_*`) is none.
_NAME = re.compile(rf"{ENV_PREFIX}[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_])")
_NUMBER = r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|KiB|MiB|GiB)?\b"
_QUOTED_DEFAULT = [
    re.compile(rf"`?\s*\((?:default\s+)?{_NUMBER}(?:\s+by default)?[;:),]"),  # (default 15 s) (64 KiB) (8000 by default)
    re.compile(rf"`?,\s*default\s+{_NUMBER}"),                                  # , default 2
    re.compile(rf"`?[^|\n]*\|\s*{_NUMBER}\s*\|"),                              # | `ADAPTSERVE_X` (...) | 64 |
]
_UNITS = {None: 1, "s": 1, "ms": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _mentions(pattern: re.Pattern[str]):
    for doc in DOCS:
        text = doc.read_text()
        for match in pattern.finditer(text):
            yield f"{doc.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}", text, match


def test_every_setting_the_docs_name_exists() -> None:
    unknown = [f"{where}: {match.group(0)}" for where, _, match in _mentions(_NAME)
               if match.group(0) not in SETTINGS and match.group(0) not in OTHER_VARIABLES]
    assert not unknown, "no such setting in service/settings.py:\n" + "\n".join(unknown)


def quoted_defaults() -> list[tuple[str, str, float]]:
    """(where, field, value) for every default a doc writes right after a setting's name."""
    found = []
    for where, text, match in _mentions(_NAME):
        field = SETTINGS.get(match.group(0))
        if field is None:
            continue
        for pattern in _QUOTED_DEFAULT:
            if quoted := pattern.match(text, match.end()):
                found.append((where, field, float(quoted["value"]) * _UNITS[quoted["unit"]]))
                break
    return found


def test_the_docs_quote_defaults_as_the_settings_have_them() -> None:
    found = quoted_defaults()
    assert len(found) >= 10, f"the patterns stopped matching the docs' way of quoting defaults: {found}"
    wrong = [f"{where}: {ENV_PREFIX}{field.upper()} is quoted as {value:g}, but defaults to "
             f"{Settings.model_fields[field].default!r}"
             for where, field, value in found if Settings.model_fields[field].default != pytest.approx(value)]
    assert not wrong, "\n".join(wrong)
