"""The container's install steps, exercised without a Docker engine.

The Dockerfile's build stage is replayed on this machine: its COPY sources are copied into a
fresh build context, its RUN lines run verbatim with /bin/sh (the ARG defaults as environment,
VENV pointing into tmp), and the venv they produce serves: `adaptserve serve` with the runtime
stage's ENV gets ready, answers the image's HEALTHCHECK command, and drains on its STOPSIGNAL.
About 2-4 minutes on two cores, mostly unpacking torch (pip's cache makes reruns faster).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import REPO
from tests.deploy.dockerfile import copy_sources, env_pairs, expand, parse, strip_run_flags

pytestmark = pytest.mark.slow

INSTALL_TIMEOUT_S = 900  # per RUN line; a cold pip cache on a slow disk, with margin
READY_TIMEOUT_S = 180  # the k8s startupProbe's budget
DRAIN_TIMEOUT_S = 30  # the k8s terminationGracePeriodSeconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that would make the venv see the checkout
    or this test run's own venv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ADAPTSERVE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_NO_INPUT"] = "1"
    return env


def build_stage(tmp_path: Path) -> Path:
    """Replay the build stage; the venv it made."""
    dockerfile = parse(REPO / "Dockerfile")
    build = dockerfile.stage("build")
    args = dockerfile.arg_defaults(build)
    workdir = build.one("WORKDIR").args
    context = tmp_path / "context"  # stands for the image's WORKDIR
    venv = tmp_path / "venv"
    args["VENV"] = str(venv)
    env = {**clean_environment(), **args}
    context.mkdir()
    for instruction in build.instructions:
        if instruction.keyword == "COPY":
            sources, destination = copy_sources(instruction)
            assert not os.path.isabs(destination) or destination.startswith(workdir), instruction.args
            destination = context / os.path.relpath(os.path.join(workdir, destination), workdir)
            for source in sources:
                source_path = REPO / source
                target = destination if len(sources) == 1 else destination / source_path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if source_path.is_dir():
                    shutil.copytree(source_path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(source_path, target)
        elif instruction.keyword == "RUN":
            command = expand(strip_run_flags(instruction), {})  # the shell expands $VARS itself
            started = time.monotonic()
            result = subprocess.run(["/bin/sh", "-c", command], cwd=context, env=env, capture_output=True,
                                    text=True, timeout=INSTALL_TIMEOUT_S)
            print(f"RUN {command!r}: {time.monotonic() - started:.0f} s")
            assert result.returncode == 0, f"RUN {command}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return venv


def runtime_environment(venv: Path, port: int, home: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """The runtime stage's ENV (PATH onto the test venv, the server on loopback and tmp), its
    command (ENTRYPOINT + CMD) and its HEALTHCHECK command."""
    dockerfile = parse(REPO / "Dockerfile")
    runtime = dockerfile.stages[-1]
    env = clean_environment()
    for instruction in runtime.all("ENV"):
        for name, value in env_pairs(instruction).items():
            if name != "PATH":
                env[name] = expand(value, {**dockerfile.arg_defaults(runtime), "VENV": str(venv)})
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        ADAPTSERVE_HOST="127.0.0.1",  # tests listen on loopback only, never 0.0.0.0
        ADAPTSERVE_PORT=str(port),
        ADAPTSERVE_STORE=str(home / "store"),
        HF_HOME=str(home / "hf"),
        HOME=str(home),
    )
    command = runtime.one("ENTRYPOINT").exec_form() + runtime.one("CMD").exec_form()
    healthcheck = json.loads(runtime.one("HEALTHCHECK").args.partition(" CMD ")[2])
    return env, command, healthcheck


def test_install_steps_build_a_venv_that_serves(tmp_path: Path) -> None:
    venv = build_stage(tmp_path)
    assert (venv / "adaptserve-freeze.txt").read_text().count("torch==") == 1

    home = tmp_path / "home"
    (home / "store").mkdir(parents=True)
    port = free_port()
    env, command, healthcheck = runtime_environment(venv, port, home)
    executable = venv / "bin" / command[0]
    assert executable.is_file(), f"{command[0]} is not in the venv"
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen([str(executable), *command[1:]], cwd=home, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        give_up = time.monotonic() + READY_TIMEOUT_S
        ready = None
        while ready is None or ready.status_code != 200:
            assert server.poll() is None, f"server exited with {server.returncode}:\n{_tail(log)}"
            assert time.monotonic() < give_up, f"not ready after {READY_TIMEOUT_S} s:\n{_tail(log)}"
            time.sleep(0.5)
            try:
                ready = httpx.get(f"{url}/readyz", timeout=5)
            except httpx.TransportError:
                ready = None
        assert ready.json()["status"] == "ready"
        assert ready.json()["backbone"]["device"] == "cpu"

        # The image's HEALTHCHECK command, as Docker would run it inside the container.
        probe = subprocess.run(healthcheck, env=env, cwd=home, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr

        # STOPSIGNAL: a clean drain well inside the grace period. uvicorn re-raises the signal
        # once shut down, so the status is "terminated by SIGTERM" (143 to a shell), not a crash.
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=DRAIN_TIMEOUT_S) in (0, -signal.SIGTERM), _tail(log)
        assert "Application shutdown complete" in _tail(log), _tail(log)
        # The same probe fails once nothing listens: the check can tell the difference.
        probe = subprocess.run(healthcheck, env=env, cwd=home, capture_output=True, text=True, timeout=30)
        assert probe.returncode != 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


def _tail(log, lines: int = 40) -> str:
    log.flush()
    log.seek(0)
    return "".join(log.readlines()[-lines:])
