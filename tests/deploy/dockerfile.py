"""Just enough of a Dockerfile parser for the deploy tests: instructions by stage, ARG defaults,
ENV pairs, COPY sources. Line continuations and comment lines are handled as Docker does."""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the (joined) line
    line: int  # 1-based line where it starts

    def exec_form(self) -> list[str] | None:
        """`["a", "b"]` arguments as a list; None for the shell form."""
        text = self.args.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, list) else None
        return None


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name or self.base}: expected one {keyword}, found {len(found)}"
        return found[0]


@dataclass
class Dockerfile:
    global_args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}")

    def arg_defaults(self, stage: Stage) -> dict[str, str]:
        """ARG defaults visible in `stage` (globals re-declared without a value keep theirs)."""
        values = dict(self.global_args)
        for instruction in stage.all("ARG"):
            name, _, default = instruction.args.strip().partition("=")
            if default:
                values[name] = default.strip('"')
        return values


def instructions(text: str) -> list[Instruction]:
    result, buffer, start = [], [], 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue  # a comment line (parser directives included) or a blank line
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped, as Docker does
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        joined = " ".join(part for part in buffer if part)
        keyword, _, args = joined.partition(" ")
        result.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = []
    assert not buffer, "Dockerfile ends inside a line continuation"
    return result


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions(path.read_text()):
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--")]  # --platform=...
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(name=name, base=words[0]))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {instruction.line}: only ARG may precede FROM"
            name, _, default = instruction.args.strip().partition("=")
            global_args[name] = default.strip('"')
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args=global_args, stages=stages)


def expand(text: str, values: dict[str, str]) -> str:
    """`${NAME}` / `$NAME` replaced from `values`; unknown names are left as they are."""
    return _VAR.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def env_pairs(instruction: Instruction) -> dict[str, str]:
    """`ENV A=1 B="two words"` -> {"A": "1", "B": "two words"} (the legacy `ENV A 1` form too)."""
    words = shlex.split(instruction.args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def strip_run_flags(instruction: Instruction) -> str:
    """A RUN's shell command without its leading `--mount=...` / `--network=...` flags."""
    words = instruction.args.split(" ")
    while words and words[0].startswith("--"):
        words.pop(0)
    return " ".join(words).strip()


def copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    """(sources, destination) of a COPY from the build context (not --from)."""
    words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
    return words[:-1], words[-1]
