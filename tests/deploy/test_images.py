"""Image tags: every image compose and the Kubernetes renders run is pinned to a release, the same
one in both places, so a restart or a reschedule never pulls something nobody tested."""
from __future__ import annotations

import re
import tomllib

import pytest

from tests.deploy.conftest import OVERLAYS, REPO
from tests.deploy.test_compose import compose, interpolate
from tests.deploy.test_k8s import render

# A release: major.minor.patch (an optional variant after it, `-alpine`, `-cuda`), or MinIO's
# RELEASE.<date>. `7.4-alpine` or `latest` float: the next pull may get another build.
PINNED = re.compile(r"^(\d+\.\d+\.\d+(-[\w.]+)?|RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ)$")
APP = "adaptserve"


def version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def split(image: str) -> tuple[str, str]:
    """(name, tag); the tag is "" when there is none (a registry's `host:port/` is not a tag)."""
    if ":" not in image.rsplit("/", 1)[-1]:
        return image, ""
    name, tag = image.rsplit(":", 1)
    return name, tag


def compose_images() -> dict[str, str]:
    return {name: interpolate(service["image"]) for name, service in compose()["services"].items() if "image" in service}


def k8s_images(directory: str) -> dict[str, str]:
    return {f"{d['kind']}/{d['metadata']['name']}/{c['name']}": c["image"] for d in render(directory)
            if d["kind"] in ("Deployment", "Job")
            for c in d["spec"]["template"]["spec"].get("initContainers", []) + d["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("where", ("compose", *OVERLAYS))
def test_every_image_is_pinned_to_a_release(where: str) -> None:
    images = compose_images() if where == "compose" else k8s_images(where)
    for user, image in images.items():
        name, tag = split(image)
        assert PINNED.match(tag), f"{where}: {user} runs {image!r}, a floating tag"
        if name.rsplit("/", 1)[-1] == APP:  # ours: the release in pyproject.toml (plus `-cuda` for the CUDA build)
            assert tag in (version(), f"{version()}-cuda"), f"{where}: {user} runs {image!r}, not release {version()}"


def test_redis_is_the_same_release_everywhere() -> None:
    # The registry's Redis is tested once: compose and the manifests run that one build.
    redis = {compose_images()["redis"]} | {image for d in OVERLAYS for image in k8s_images(d).values()
                                           if split(image)[0] == "redis"}
    assert len(redis) == 1, redis
