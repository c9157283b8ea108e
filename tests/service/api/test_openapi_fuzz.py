"""Schemathesis against the OpenAPI document, in process (ASGI), on a tiny real engine: every
operation gets generated valid and invalid requests; no answer may be a 5xx, and every answer must
match what the document declares (status codes, content types, body schemas, headers).

Bounded: a few examples per operation, so the whole module takes well under a minute."""
from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (a dependency of schemathesis)

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.factories import publish, random_head, random_lora, save_tiny_backbone  # noqa: E402

ADMIN = "fuzz-admin-token-3c9e"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
EXAMPLES_PER_OPERATION = 12


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_backbone("bert", tmp_path_factory.mktemp("openapi-fuzz") / "backbone")


@pytest.fixture
def api_schema(backbone_dir: Path, tmp_path: Path):
    """A fresh app and store per test: schemathesis's pytest plugin ends an app's lifespan with the
    test that started it."""
    import time

    import torch
    from schemathesis.python import asgi

    from service.engine.backbone import load_backbone

    info = load_backbone(backbone_dir, device="cpu", dtype="float32").info
    store = tmp_path / "store"
    g = torch.Generator().manual_seed(0)
    for name, kind in (("sentiment", "single"), ("nli", "pair")):
        publish(store, name, {"lora": random_lora(info, g), "head": random_head(info, g)}, ["neg", "pos"],
                input_kind=kind, fingerprint=info.fingerprint)
    settings_ = Settings(store=store, backbone=backbone_dir, device="cpu", dtype="float32", admin_tokens=ADMIN,
                         max_wait_ms=0.0, max_inputs_per_request=8, max_chars_per_input=200,
                         upload_max_weights_bytes=64 * 1024, upload_max_config_bytes=8 * 1024)
    app = create_app(settings_)
    # Wait until ready, so that no 503 `not_ready` is mistaken for (or hides) a server error.
    with asgi.get_client(app) as client:
        give_up = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < give_up, "the app never got ready"
            time.sleep(0.05)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_conforms_to_its_schema_and_never_answers_5xx(api_schema, mode: str) -> None:
    """Every operation, requests that fit the schema (`positive`) and that do not (`negative`).

    Driven by hand rather than by schemathesis's pytest plugin, whose lazy fixture loader does not
    run under pytest 9; the checks are schemathesis's own (`call_and_validate`)."""
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12 and "/v1/token" in {op.path for op in operations}  # every route is in the document
    for operation in operations:
        strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

        @given(case=strategy)
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            # An upload is validated far beyond what a schema can say (a safetensors header, the
            # weights against the backbone), so schema-valid random bytes are rightly refused.
            excluded = [positive_data_acceptance] if case.operation.path.endswith("/versions") and case.method == "POST" else []
            response = case.call_and_validate(headers=AUTH, excluded_checks=excluded)
            assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"

        try:
            run()
        except Unsatisfiable:  # nothing can be invalid about it (GET /v1/tasks: no parameters, no body)
            assert mode == "negative", operation.label
        except Exception as err:  # noqa: BLE001 - collect every operation's failure, then report them all
            failures[operation.label] = f"{type(err).__name__}: {err}"[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{why}" for label, why in failures.items())
