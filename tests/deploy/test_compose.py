"""docker-compose.yml: valid against the compose-spec JSON schema (the copy check-jsonschema
vendors, so no network), and wired as docs/deploy.md says: two replicas behind nginx, every
dependency waited for by health or completion, settings that the server accepts."""
from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import REPO, client_variables, memory_bytes, setting_names, tool, worst_case_rss

COMPOSE = REPO / "docker-compose.yml"
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def check_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with an empty environment: the defaults."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def test_valid_against_compose_spec() -> None:
    result = check_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("service, culprit", [
    ("image: x\n    deploy:\n      replicas: [2]\n", "replicas"),  # a wrong type
    ("image: x\n    restart_policy: always\n", "restart_policy"),  # an unknown key
    ("image: x\n    depends_on:\n      db:\n        condition: healthy\n", "condition"),  # a bad enum
])
def test_an_invalid_file_is_rejected(tmp_path: Path, service: str, culprit: str) -> None:
    # The control: the schema is really applied.
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(f"services:\n  a:\n    {service}")
    result = check_schema(bad)
    assert result.returncode != 0 and culprit in result.stdout + result.stderr, result.stdout


def test_two_server_replicas_behind_one_front_door() -> None:
    services = compose()["services"]
    server = services["adaptserve"]
    assert server["deploy"]["replicas"] == 2
    assert "ports" not in server and "container_name" not in server, "replicas cannot share a host port or a name"
    assert server["command"] == ["serve"]
    (published,) = services["nginx"]["ports"]
    assert published.endswith(":8080")
    nginx_conf = (REPO / "docker/nginx.conf").read_text()
    assert "http://adaptserve:8000" in nginx_conf and "listen 8080;" in nginx_conf


def test_dependencies_wait_for_health_or_completion() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            target = services[dependency]
            if condition == "service_healthy":
                assert "healthcheck" in target, f"{name} waits for {dependency}'s health, which it does not report"
            else:
                assert condition == "service_completed_successfully", f"{name} -> {dependency}: {condition}"
                assert target.get("restart") == "no", f"one-shot {dependency} must not restart"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "/readyz" in " ".join(services["adaptserve"]["healthcheck"]["test"])
    # The one-shot jobs and what they wait for.
    assert services["minio-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["train-demo"]["depends_on"]["adaptserve"]["condition"] == "service_healthy"
    assert services["adaptserve"]["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"


def test_training_job_publishes_to_the_servers() -> None:
    services = compose()["services"]
    job = services["train-demo"]
    assert job["image"] == services["adaptserve"]["image"]
    assert job["command"][0] == "train" and "--task=demo" in job["command"]
    port = interpolate(services["adaptserve"]["environment"]["ADAPTSERVE_PORT"])
    assert f"--publish=http://adaptserve:{port}" in job["command"]


def nginx_body_limits() -> tuple[int, int]:
    """client_max_body_size of docker/nginx.conf's server block and of its upload location."""
    conf = (REPO / "docker/nginx.conf").read_text()
    size = lambda text: memory_bytes(re.search(r"client_max_body_size\s+(\d+)m;", text)[1] + "Mi")  # noqa: E731
    upload = re.search(r"location ~ \^/v1/tasks/\[\^/\]\+/versions\$ \{(.*?)\}", conf, flags=re.S)
    assert upload, "docker/nginx.conf has no location for uploads (POST /v1/tasks/{task}/versions)"
    server = conf.replace(upload[0], "")
    return size(server), size(upload[1])


def test_server_environment_is_accepted_by_settings(settings_from_env) -> None:
    services = compose()["services"]
    environment = {k: interpolate(str(v)) for k, v in services["adaptserve"]["environment"].items()}
    unknown = {k for k in environment if k.startswith("ADAPTSERVE_")} - setting_names()
    assert not unknown, f"not adaptserve settings: {sorted(unknown)}"
    settings = settings_from_env({k: v for k, v in environment.items() if k.startswith("ADAPTSERVE_")})
    assert settings.host == "0.0.0.0" and settings.redis_url == "redis://redis:6379/0"
    assert settings.store_backend == "s3" and settings.s3_bucket == interpolate(
        services["minio-bucket"]["environment"]["S3_BUCKET"])
    limit = memory_bytes(services["adaptserve"]["deploy"]["resources"]["limits"]["memory"], binary_suffixes=True)
    assert limit >= worst_case_rss(settings), f"memory limit {limit} < worst case {worst_case_rss(settings)}"
    # nginx lets through every body the servers accept, so the servers answer 413 themselves (JSON).
    general, uploads = nginx_body_limits()
    assert general > settings.body_limit_bytes, (general, settings.body_limit_bytes)
    assert uploads > settings.upload_limit_bytes, (uploads, settings.upload_limit_bytes)
    for name, service in services.items():
        for key in (service.get("environment") or {}):
            if key.startswith("ADAPTSERVE_"):
                assert key in setting_names() | client_variables(), f"{name}: {key}"


def test_replicas_do_not_each_take_every_core() -> None:
    # torch's default thread pool is one thread per host core, in each replica: N replicas on one
    # host would oversubscribe it N times. The servers get an explicit share.
    services = compose()["services"]
    threads = interpolate(str(services["adaptserve"]["environment"].get("OMP_NUM_THREADS", "")))
    assert threads.isdigit() and int(threads) >= 1, f"OMP_NUM_THREADS={threads!r}"
    variable = _INTERPOLATION.match(str(services["adaptserve"]["environment"]["OMP_NUM_THREADS"]))
    if variable:  # a knob in .env: .env.example documents it with its default
        assert f"# {variable[1]}={threads}" in (REPO / ".env.example").read_text()


def test_stop_grace_period_covers_the_drain(settings_from_env) -> None:
    # Compose has no preStop: SIGTERM starts the server's drain at once, bounded by the longest
    # classify request (uploads still running then are cancelled); SIGKILL must not come first.
    from service.server import drain_timeout_s

    server = compose()["services"]["adaptserve"]
    environment = {k: interpolate(str(v)) for k, v in server["environment"].items() if k.startswith("ADAPTSERVE_")}
    grace = int(re.fullmatch(r"(\d+)s", server["stop_grace_period"])[1])
    assert grace >= drain_timeout_s(settings_from_env(environment)) + 5, grace
