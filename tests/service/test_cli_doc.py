"""Every flag of an `adaptserve <command>` line in the docs is a flag of that command.

The README and docs/*.md show `adaptserve serve|train|evaluate|pet|zeroshot` command lines, in code
blocks (continued over lines with `\\`) and inline; a flag renamed in the code and not in a doc
makes the documented command exit 2.
"""
from __future__ import annotations

import argparse
import re

from service.cli import build_parser
from tests.docs import DOCS, REPO
from training.cli import build_evaluate_parser, build_train_parser
from training.fewshot_cli import build_pet_parser, build_zeroshot_parser

# A command line: `adaptserve train ...` (also `.venv/bin/adaptserve`, `python -m training train`),
# up to the end of its line; in prose also up to the end of its code span or table cell.
_START = r"(?:\badaptserve|python -m (?:training|service))\s+(serve|train|evaluate|pet|zeroshot)\b"
_IN_BLOCK = re.compile(_START + r"([^\n]*)")
_IN_PROSE = re.compile(_START + r"([^\n`|]*)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _serve_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


FLAGS = {
    "serve": _flags(_serve_parser()),
    "train": _flags(build_train_parser()),
    "evaluate": _flags(build_evaluate_parser()),
    "pet": _flags(build_pet_parser()),
    "zeroshot": _flags(build_zeroshot_parser()),
}


def documented_commands() -> list[tuple[str, str, str]]:
    """(where, command, the rest of its line) for every command line in the docs."""
    found = []
    for doc in DOCS:
        in_block, pending, first = False, "", 0
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            if not pending:
                first = number
            if in_block and line.endswith("\\"):  # a shell line continued
                pending += line[:-1] + " "
                continue
            text, pending = pending + line, ""
            for match in (_IN_BLOCK if in_block else _IN_PROSE).finditer(text):
                found.append((f"{doc.relative_to(REPO)}:{first}", match[1], match[2].split(" # ")[0]))  # no comment
    return found


def test_every_documented_flag_exists() -> None:
    commands = documented_commands()
    assert {command for _, command, _ in commands} == set(FLAGS), "the docs should show every command"
    unknown = [f"{where}: adaptserve {command} {flag}" for where, command, rest in commands
               for flag in _FLAG.findall(rest) if flag not in FLAGS[command]]
    assert not unknown, "no such flag:\n" + "\n".join(unknown)
