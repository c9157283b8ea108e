"""The Dockerfile: hadolint finds nothing at warning level or above, and the image is built the
way docs/deploy.md says (multi-stage, non-root, one worker, health check, offline)."""
from __future__ import annotations

import fnmatch
import json
import subprocess
from pathlib import Path

from tests.deploy.conftest import REPO, tool
from tests.deploy.dockerfile import copy_sources, env_pairs, expand, parse, strip_run_flags

DOCKERFILE = REPO / "Dockerfile"


def hadolint(path: Path) -> list[dict]:
    """hadolint's findings at level warning or error. Inline `# hadolint ignore=` pragmas are
    disabled: a finding is fixed or argued about in review, not silenced in the file."""
    result = subprocess.run(
        [tool("hadolint"), "--format", "json", "--no-fail", "--disable-ignore-pragma", str(path)],
        capture_output=True, text=True, timeout=60, cwd=path.parent,
    )
    assert result.returncode == 0, result.stderr
    return [finding for finding in json.loads(result.stdout or "[]") if finding["level"] in ("error", "warning")]


def test_hadolint_finds_nothing_at_warning_level() -> None:
    findings = hadolint(DOCKERFILE)
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    # The control: the linter runs and reports, so the empty result above means something.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install flask\n")
    assert {f["code"] for f in hadolint(bad)} >= {"DL3007", "DL3003", "DL3013"}


def test_multi_stage_build_through_install_script() -> None:
    dockerfile = parse(DOCKERFILE)
    build, runtime = dockerfile.stage("build"), dockerfile.stages[-1]
    assert build is not runtime
    # One base for both stages: the venv built in one points at the other's python.
    assert build.base == runtime.base == "${BASE_IMAGE}"
    assert dockerfile.global_args["BASE_IMAGE"].startswith("python:3.11-")
    args = dockerfile.arg_defaults(build)
    assert args["TORCH_VARIANT"] == "cpu" and args["TORCH_VERSION"] == "2.13.0"
    runs = [strip_run_flags(run) for run in build.all("RUN")]
    assert [run.split("docker/install.sh ")[1].split()[0] for run in runs] == ["torch", "app"], runs
    # The runtime stage gets the venv only: no compilers, no source tree, no pip cache.
    copies = runtime.all("COPY")
    assert any(c.args.startswith("--from=build") for c in copies)
    assert not runtime.all("RUN") or all("install.sh" not in r.args for r in runtime.all("RUN"))


def test_runtime_stage_runs_one_offline_non_root_worker() -> None:
    dockerfile = parse(DOCKERFILE)
    runtime = dockerfile.stages[-1]
    user = runtime.one("USER").args.split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root uid, so runAsNonRoot can verify it"
    env = {}
    for instruction in runtime.all("ENV"):
        env.update(env_pairs(instruction))
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["ADAPTSERVE_HOST"] == "0.0.0.0"
    assert runtime.one("STOPSIGNAL").args == "SIGTERM"
    command = runtime.one("ENTRYPOINT").exec_form() + runtime.one("CMD").exec_form()
    assert command == ["adaptserve", "serve"]  # one uvicorn worker: service/cli.py's serve
    exposed = runtime.one("EXPOSE").args.split()
    assert exposed == [env["ADAPTSERVE_PORT"]]


def test_healthcheck_probes_healthz_with_python_alone() -> None:
    runtime = parse(DOCKERFILE).stages[-1]
    healthcheck = runtime.one("HEALTHCHECK").args
    options, _, command = healthcheck.partition(" CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2] and "urllib.request" in argv[2]
    assert "--start-period=" in options and "--timeout=" in options


def test_every_copied_path_is_in_the_build_context() -> None:
    """.dockerignore is an allow-list: each COPY source must be re-included by a `!` line and
    exist, or the build fails with 'not found' only on a machine with Docker."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    dockerfile = parse(DOCKERFILE)
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            if copy.args.startswith("--from"):
                continue
            sources, _ = copy_sources(copy)
            for source in sources:
                source = expand(source, dockerfile.arg_defaults(stage)).rstrip("/")
                assert (REPO / source).exists(), f"COPY {source}: no such path"
                assert any(source == a or source.startswith(a + "/") or fnmatch.fnmatch(source, a) for a in allowed), (
                    f"COPY {source} is excluded by .dockerignore"
                )


def test_install_script_is_strict_bash() -> None:
    path = REPO / "docker/install.sh"
    assert path.stat().st_mode & 0o111, "docker/install.sh is not executable"
    assert "set -euo pipefail" in path.read_text()
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
