"""Shared helpers of the deployment checks: where the files are, where the tools are, and how to
ask `Settings` whether a set of ADAPTSERVE_* values is acceptable."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("base", "overlays/cpu", "overlays/gpu")  # every directory `kubectl kustomize` renders


MiB = 1024 * 1024
# Resident memory of one server besides its task cache. CPU: measured with the bundled backbone
# (docs/deploy.md, "Sizing"): 0.52 GiB once ready, 0.62 GiB at peak under load. CUDA: the host
# side is an estimate (CUDA runtime and libraries), not a measurement.
BASELINE_RSS_BYTES = {"cpu": 640 * MiB, "cuda": 2048 * MiB}
# Peak RSS of the training Job's demo run (`adaptserve train --method lora --epochs 10` on
# docker/demo-data, CPU, OMP_NUM_THREADS=2; /usr/bin/time -v: 1,216,732 KiB): docs/deploy.md, "Sizing".
TRAIN_DEMO_PEAK_RSS_BYTES = 1188 * MiB
_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": MiB, "Gi": 1024 * MiB}


def memory_bytes(quantity: str | int, binary_suffixes: bool = False) -> int:
    """A Kubernetes quantity (`1536Mi`, `4Gi`, `1G`) in bytes. Docker/compose sizes (`1536M`)
    are binary: pass binary_suffixes=True."""
    text = str(quantity)
    number = text.rstrip("kMGi")
    unit = text[len(number):]
    if binary_suffixes and unit in ("k", "M", "G"):
        unit = {"k": "Ki", "M": "Mi", "G": "Gi"}[unit]
    return int(float(number) * _UNITS[unit])


def upload_bytes(settings) -> int:
    """Memory one upload may hold while it is validated: the body, its unpacked files and the
    parsed weights (Settings.max_concurrent_uploads says so)."""
    return settings.upload_limit_bytes + settings.upload_uncompressed_limit_bytes + settings.upload_max_weights_bytes


def worst_case_rss(settings) -> int:
    """Baseline plus every byte of task cache that lives in host memory (on CPU both tiers, and the
    methods' slot pools, which share a cap of the device tier's budget), plus every upload that
    may be validated at once."""
    device = "cpu" if settings.device == "cpu" else "cuda"
    cache = settings.cache_host_max_bytes + (2 * settings.cache_max_bytes if device == "cpu" else 0)
    return BASELINE_RSS_BYTES[device] + cache + settings.max_concurrent_uploads * upload_bytes(settings)


def tool(name: str) -> str:
    """A command-line tool from the test extra: the copy in this interpreter's venv first (the
    pinned one), then PATH. A missing tool fails the test: a check that skips proves nothing."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: install the test extra (pip install -e '.[test]')")
    return found


@pytest.fixture
def settings_from_env(monkeypatch: pytest.MonkeyPatch):
    """Build `Settings()` from exactly the given ADAPTSERVE_* variables, as the server would."""
    from service.settings import ENV_PREFIX, Settings

    def build(values: dict[str, str]):
        for name in list(os.environ):
            if name.startswith(ENV_PREFIX):
                monkeypatch.delenv(name)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return build


def setting_names() -> set[str]:
    from service.settings import ENV_PREFIX, Settings

    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def client_variables() -> set[str]:
    """ADAPTSERVE_* variables read by programs other than the server (the trainer's token)."""
    from training.publish import TOKEN_ENV

    return {TOKEN_ENV}
