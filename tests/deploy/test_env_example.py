""".env.example documents every setting and cannot drift from service/settings.py: it is what
docker/gen_env_example.py writes, names every field and nothing else, and its values are the
defaults (uncommenting every line changes nothing)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from types import ModuleType

from tests.deploy.conftest import REPO, client_variables, setting_names

ENV_EXAMPLE = REPO / ".env.example"
REGENERATE = "python docker/gen_env_example.py > .env.example"
_ASSIGNMENT = re.compile(r"^# (?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_env_example", REPO / "docker/gen_env_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assignments() -> dict[str, str]:
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := _ASSIGNMENT.match(line):
            assert match["name"] not in found, f"{match['name']} appears twice"
            found[match["name"]] = match["value"]
    return found


def test_every_setting_is_documented() -> None:
    missing = setting_names() - set(assignments())
    assert not missing, f".env.example lacks {sorted(missing)}; run `{REGENERATE}`"


def test_nothing_but_settings_uses_the_prefix() -> None:
    unknown = {n for n in assignments() if n.startswith("ADAPTSERVE_")} - setting_names() - client_variables()
    assert not unknown, f".env.example names {sorted(unknown)}, which no code reads; run `{REGENERATE}`"


def test_uncommenting_every_setting_changes_nothing(settings_from_env) -> None:
    # Every value in the file is the default, written so that the server parses it back to the
    # default (an empty value is unset, `true` a bool, ...), except the example values the
    # generator gives for computed defaults (the file says so). None is skipped for refusing an
    # empty value: a blank variable is unset (env_ignore_empty), so every None default round-trips.
    gen = generator()
    skip = {f"ADAPTSERVE_{name.upper()}" for name in gen.Settings.model_fields if name in gen.EXAMPLES}
    values = {n: v for n, v in assignments().items() if n in setting_names() and n not in skip}
    assert len(values) > len(setting_names()) / 2, "most settings should round-trip"
    assert settings_from_env(values).model_dump() == settings_from_env({}).model_dump()


def test_file_is_what_the_generator_writes() -> None:
    generated = subprocess.run([sys.executable, str(REPO / "docker/gen_env_example.py")],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    assert ENV_EXAMPLE.read_text() == generated, f".env.example is stale; run `{REGENERATE}`"
