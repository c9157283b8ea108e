# syntax=docker/dockerfile:1
#
# adaptserve: one uvicorn worker per container, the bundled all-MiniLM-L6-v2 baked in.
#
#   docker build -t adaptserve:0.1.0 .                                  CPU torch (default)
#   docker build -t adaptserve:0.1.0-cuda --build-arg TORCH_VARIANT=cuda .   CUDA torch from PyPI
#   docker build --build-arg BASE_IMAGE=... .                           another Python >= 3.10 base
#
# The build stage runs docker/install.sh, the same script tests/deploy/test_install.py runs
# outside Docker (that test also executes this stage's RUN lines verbatim, so keep them plain).
# See docs/deploy.md.

# Debian slim with CPython 3.11, the version the project is developed on. Both stages must use
# the same image: the venv built in the first is copied into the second and points at its python.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# cpu: the CPU-only wheel from PyTorch's index; cuda: PyPI's default (CUDA) wheel.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# adaptserve extras: s3 brings the client of the S3-compatible store (ADAPTSERVE_STORE_BACKEND=s3);
# `--build-arg EXTRAS=` leaves it out of an image that only ever uses a mounted store.
ARG EXTRAS=s3
ARG VENV=/opt/venv
WORKDIR /src
# The torch layer first: it is about half of the image and changes far less often than the code.
COPY docker/install.sh docker/install.sh
RUN --mount=type=cache,target=/root/.cache/pip \
    TORCH_VARIANT="$TORCH_VARIANT" TORCH_VERSION="$TORCH_VERSION" docker/install.sh torch "$VENV"
COPY pyproject.toml pyproject.toml
COPY service service
COPY training training
RUN --mount=type=cache,target=/root/.cache/pip \
    EXTRAS="$EXTRAS" docker/install.sh app "$VENV" .

FROM ${BASE_IMAGE} AS runtime
ARG VENV=/opt/venv
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 adaptserve \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/adaptserve adaptserve \
    && mkdir -p /data/store \
    && chown adaptserve:adaptserve /data/store
COPY --from=build ${VENV} ${VENV}
# Demo data for the one-shot training jobs in docker-compose.yml and k8s/ (SST-2, 16 examples
# per class; see docker/demo-data/README.md). 8 KB; not read by the server.
COPY docker/demo-data/ /opt/adaptserve/demo/
ENV PATH="${VENV}/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    ADAPTSERVE_HOST=0.0.0.0 \
    ADAPTSERVE_PORT=8000 \
    ADAPTSERVE_STORE=/data/store
# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: the backbone is in site-packages and nothing may reach a
# model hub at run time. HF_HOME in /tmp: the root filesystem can be mounted read-only.
USER 10001:10001
WORKDIR /home/adaptserve
EXPOSE 8000
# Liveness, not readiness: /healthz is 200 while the backbone loads and 503 only once startup has
# failed for good. Python's urllib, so the image needs no curl; urlopen raises on a 503.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ADAPTSERVE_PORT', '8000'), timeout=4)"]
# uvicorn drains on SIGTERM: stops accepting, lets in-flight requests finish (each bounded by
# ADAPTSERVE_REQUEST_TIMEOUT_S), then the scheduler drains its queue.
STOPSIGNAL SIGTERM
ENTRYPOINT ["adaptserve"]
# `adaptserve serve` runs exactly one uvicorn worker (the backbone and task cache live in that
# process); scale out with more containers. `docker run IMAGE train ...` runs the trainer.
CMD ["serve"]
