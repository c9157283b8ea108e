"""Per-request early exit over HTTP: the `early_exit` body field, `exit_layer` per prediction and
the exit-layer histogram. The fake engine answers an exit task at layer 1 under any policy but
`off`; the real-engine test at the end checks the same on a tiny backbone with exit heads."""
from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.schemas import ExitPolicyName
from service.app import create_app
from service.methods.exits import POLICIES, ExitWeights
from service.settings import Settings
from tests.factories import publish, random_head, random_lora, save_tiny_backbone
from tests.fakes import FakeEngine, write_task
from tests.service.api.harness import make_app, wait_ready

CLASSIFY = "/v1/tasks/{}/classify"


@pytest.fixture
def client(tmp_path: Path):
    write_task(tmp_path, "plain", "v1")
    write_task(tmp_path, "exiting", "v1", config_text='{"labels": ["neg", "pos"], "exits": true}')
    with TestClient(make_app(tmp_path, FakeEngine())) as client:
        wait_ready(client)
        yield client


def test_the_schema_knows_every_engine_policy() -> None:
    assert typing.get_args(ExitPolicyName) == POLICIES


@pytest.mark.parametrize(
    "early_exit, layer",
    [(None, 2), ({"policy": "confidence"}, 1), ({"policy": "entropy", "threshold": 0.5}, 1),
     ({"policy": "patience", "threshold": 2}, 1), ({"policy": "off"}, 2)],
)
def test_exit_layer_follows_the_requested_policy(client: TestClient, early_exit: dict | None, layer: int) -> None:
    body = {"inputs": ["a", "b"]} | ({"early_exit": early_exit} if early_exit else {})
    response = client.post(CLASSIFY.format("exiting"), json=body)
    assert response.status_code == 200, response.text
    assert [p["exit_layer"] for p in response.json()["predictions"]] == [layer, layer]


@pytest.mark.parametrize(
    "early_exit, message",
    [
        # Each problem at the field it is about: a range error where a type error is.
        ({"policy": "fastest"}, "body.early_exit.policy: Input should be 'confidence', 'entropy', 'patience' or 'off'"),
        ({"policy": "confidence", "threshold": 1.5}, "body.early_exit.threshold: a confidence threshold is a probability in [0, 1]"),
        ({"policy": "entropy", "threshold": -1}, "body.early_exit.threshold: an entropy threshold is >= 0 nats"),
        ({"policy": "patience", "threshold": 1.5}, "body.early_exit.threshold: patience is a whole number"),
        ({"policy": "patience", "threshold": 0}, "body.early_exit.threshold: patience is a whole number"),
        ({"threshold": 0.5}, "early_exit.policy: Field required"),
        ({"policy": "confidence", "margin": 1}, "Extra inputs are not permitted"),
        ({"policy": "confidence", "threshold": "high"}, "body.early_exit.threshold: Input should be a valid number"),
        ({"policy": "confidence", "threshold": "0.5"}, "valid number"),
        ({"policy": "confidence", "threshold": True}, "valid number"),
        ({"policy": "fastest", "threshold": 5}, "body.early_exit.policy: Input should be"),  # no range without a policy
    ],
)
def test_bad_early_exit_values_are_422_naming_the_problem(client: TestClient, early_exit: dict, message: str) -> None:
    response = client.post(CLASSIFY.format("exiting"), json={"inputs": ["a"], "early_exit": early_exit})
    assert response.status_code == 422 and response.json()["error_type"] == "validation_error"
    assert message in response.json()["error"]


# JSON numbers have no range: thresholds no float holds are refused naming the range, not as
# "not a valid number" (a 400-digit integer) or a bare "finite number" (1e400 reads as inf).
OUT_OF_RANGE = "out of range (beyond ±1.8e308)"
READ_AS_INF = "it must be a finite number (JSON numbers beyond ±1.8e308, such as 1e400, read as inf)"


@pytest.mark.parametrize(
    "policy, raw, message",
    [
        ("confidence", b"4" * 400, f"a confidence threshold is a probability in [0, 1], got a 400-digit number: {OUT_OF_RANGE}"),
        ("patience", b"-" + b"9" * 400, f"patience is a whole number of layers >= 1, got a 400-digit number: {OUT_OF_RANGE}"),
        ("off", b"4" * 400, f"an early-exit threshold must be a finite number, got a 400-digit number: {OUT_OF_RANGE}"),
        ("entropy", b"1e400", f"an entropy threshold is >= 0 nats, got inf: {READ_AS_INF}"),
        ("confidence", b"-" + b"4" * 400 + b".5", f"a confidence threshold is a probability in [0, 1], got -inf: {READ_AS_INF}"),
        ("confidence", b"NaN", "an early-exit threshold must be a finite number, got nan"),
        ("confidence", b"4" * 300, "a confidence threshold is a probability in [0, 1], got 4.444444444444445e+299"),
    ],
    ids=["400 digits", "-400 digits, patience", "400 digits, off", "1e400", "400-digit decimal", "NaN", "300 digits fit"],
)
def test_a_threshold_no_float_holds_is_422_naming_the_range(client: TestClient, policy: str, raw: bytes, message: str) -> None:
    body = b'{"inputs": ["a"], "early_exit": {"policy": "%s", "threshold": %s}}' % (policy.encode(), raw)
    response = client.post(CLASSIFY.format("exiting"), content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error_type"] == "validation_error"
    assert response.json()["error"] == f"body.early_exit.threshold: {message}", response.text


def test_an_exit_policy_for_a_task_without_exit_heads_is_refused(client: TestClient) -> None:
    response = client.post(CLASSIFY.format("plain"), json={"inputs": ["a"], "early_exit": {"policy": "entropy"}})
    assert response.status_code == 422 and "no early-exit classifiers" in response.json()["error"]
    off = client.post(CLASSIFY.format("plain"), json={"inputs": ["a"], "early_exit": {"policy": "off"}})
    assert off.status_code == 200


def test_exit_layers_are_a_histogram_per_task(client: TestClient) -> None:
    client.post(CLASSIFY.format("exiting"), json={"inputs": ["a", "b", "c"], "early_exit": {"policy": "confidence"}})
    client.post(CLASSIFY.format("exiting"), json={"inputs": ["a"], "early_exit": {"policy": "off"}})
    client.post(CLASSIFY.format("plain"), json={"inputs": ["a"]})
    text = client.get("/metrics").text
    assert 'adaptserve_exit_layer_bucket{le="1.0",task="exiting"} 3.0' in text
    assert 'adaptserve_exit_layer_bucket{le="2.0",task="exiting"} 4.0' in text
    assert 'adaptserve_exit_layer_count{task="exiting"} 4.0' in text
    assert 'adaptserve_exit_layer_count{task="plain"}' not in text  # no exit heads, no series


def test_the_real_engine_exits_where_the_request_says(tmp_path: Path) -> None:
    backbone_dir = save_tiny_backbone("bert", tmp_path / "backbone")  # 2 layers: exit after layer 1 or run both
    from service.engine.backbone import load_backbone

    info = load_backbone(backbone_dir, device="cpu", dtype="float32").info
    g = torch.Generator().manual_seed(0)
    weights = {"lora": random_lora(info, g), "head": random_head(info, g), "exits": ExitWeights.init(info, num_labels=2, generator=g)}
    publish(tmp_path / "store", "exiting", weights, ["neg", "pos"], fingerprint=info.fingerprint)
    app = create_app(Settings(store=tmp_path / "store", backbone=backbone_dir, device="cpu", dtype="float32"))
    with TestClient(app) as client:
        wait_ready(client, timeout_s=60)
        url = CLASSIFY.format("exiting")
        # Fresh confidence predictors say ~0.5: threshold 0 exits every row at layer 1, 1.0 none.
        early = client.post(url, json={"inputs": ["good", "bad"], "early_exit": {"policy": "confidence", "threshold": 0.0}})
        late = client.post(url, json={"inputs": ["good", "bad"], "early_exit": {"policy": "confidence", "threshold": 1.0}})
        off = client.post(url, json={"inputs": ["good", "bad"], "early_exit": {"policy": "off"}})
        assert [p["exit_layer"] for p in early.json()["predictions"]] == [1, 1]
        assert [p["exit_layer"] for p in late.json()["predictions"]] == [2, 2]
        assert [p["exit_layer"] for p in off.json()["predictions"]] == [2, 2]
        assert off.json()["predictions"][0]["scores"] == pytest.approx(late.json()["predictions"][0]["scores"])
        assert 'adaptserve_exit_layer_count{task="exiting"} 6.0' in client.get("/metrics").text


def test_a_request_naming_only_a_policy_gets_the_tasks_calibrated_threshold(tmp_path: Path) -> None:
    """`adaptserve train --early-exit` stores a calibrated threshold per policy; a request naming a
    policy without a threshold gets it (docs/training.md), not the engine-wide default. The exit
    classifiers here answer logits of 0 (entropy ln 2) and the fresh confidence predictors ~0.5, so
    the defaults (entropy 0.3, confidence 0.9) exit no row and the calibrated 5.0 and 0.0 every row."""
    import dataclasses

    from service.engine.backbone import load_backbone
    from service.methods.exits import ExitPolicy

    backbone_dir = save_tiny_backbone("bert", tmp_path / "backbone")
    info = load_backbone(backbone_dir, device="cpu", dtype="float32").info
    g = torch.Generator().manual_seed(0)
    exits = ExitWeights.init(info, num_labels=2, generator=g)
    for out_w, out_b, *_ in exits.layers.values():
        out_w.data.zero_()
        out_b.data.zero_()
    calibration = {"policies": {"entropy": {"threshold": 5.0, "met": True}, "confidence": {"threshold": 0.0, "met": True},
                                "patience": {"threshold": None, "met": False}}}
    exits = dataclasses.replace(exits, policy=ExitPolicy("off"), calibration=calibration)
    publish(tmp_path / "store", "calibrated", {"head": random_head(info, g), "exits": exits}, ["neg", "pos"],
            fingerprint=info.fingerprint)
    app = create_app(Settings(store=tmp_path / "store", backbone=backbone_dir, device="cpu", dtype="float32"))
    with TestClient(app) as client:
        wait_ready(client, timeout_s=60)
        url = CLASSIFY.format("calibrated")

        def layers(early_exit: dict) -> list[int]:
            response = client.post(url, json={"inputs": ["good", "bad"], "early_exit": early_exit})
            assert response.status_code == 200, response.text
            return [p["exit_layer"] for p in response.json()["predictions"]]

        assert layers({"policy": "entropy"}) == [1, 1]  # calibrated 5.0
        assert layers({"policy": "entropy", "threshold": 0.3}) == [2, 2]  # the default, asked for
        assert layers({"policy": "confidence"}) == [1, 1]  # calibrated 0.0
        assert layers({"policy": "confidence", "threshold": 0.9}) == [2, 2]
        assert layers({"policy": "patience", "threshold": 1}) == [1, 1]
        # Not calibrated: the default 2, more than the one exit layer, would never exit (it used to
        # run every layer as `off` does, silently): refused, saying what to ask for instead.
        response = client.post(url, json={"inputs": ["good"], "early_exit": {"policy": "patience"}})
        assert response.status_code == 422, response.text
        assert response.json()["error"] == (
            "early_exit.threshold (the task's default, as none was given): patience 2 is more than the task's "
            "1 exit layer, so no row could exit early: use at most 1 (or policy 'off' to run every layer) "
            "(task 'calibrated')")



def _off_exit_bundle(tmp_path: Path) -> tuple[Path, dict, bytes]:
    """(a tiny 2-layer backbone, the config and the weights of an exit task stored with policy off,
    as `adaptserve train --early-exit` publishes one where no confidence threshold qualified)."""
    import dataclasses
    import json

    from service.engine.backbone import load_backbone
    from service.engine.bundle import bundle_bytes
    from service.methods.exits import ExitPolicy

    backbone_dir = save_tiny_backbone("bert", tmp_path / "backbone")  # 2 layers: only layer 0 can exit early
    info = load_backbone(backbone_dir, device="cpu", dtype="float32").info
    g = torch.Generator().manual_seed(0)
    exits = dataclasses.replace(ExitWeights.init(info, num_labels=2, generator=g), policy=ExitPolicy("off"))
    spec = {"labels": ["neg", "pos"], "max_length": 32, "backbone": {"fingerprint": info.fingerprint}}
    config, tensors = bundle_bytes(spec, {"head": random_head(info, g), "exits": exits})
    (tmp_path / "store").mkdir()
    return backbone_dir, json.loads(config), tensors


def _upload_exits(client: TestClient, task: str, config: dict, tensors: bytes, **exits: object):
    """Upload the bundle with these fields of its exits section replaced."""
    import json

    from tests.hotswap.bundles import files

    cfg = json.loads(json.dumps(config))
    cfg["methods"]["exits"].update(exits)
    return client.post(f"/v1/tasks/{task}/versions", files=files(json.dumps(cfg).encode(), tensors))


def test_a_task_stored_with_policy_off_shows_no_threshold(tmp_path: Path) -> None:
    """`off` has no threshold: the bundle and `GET /v1/tasks/{task}` say null, as `adaptserve
    evaluate --json` does (they used to say the class default 0.9), and a bundle stored by earlier
    versions with a number there still loads and says null."""
    backbone_dir, config, tensors = _off_exit_bundle(tmp_path)
    assert config["methods"]["exits"]["threshold"] is None  # what the trainer publishes
    app = create_app(Settings(store=tmp_path / "store", backbone=backbone_dir, device="cpu", dtype="float32"))
    with TestClient(app) as client:
        wait_ready(client, timeout_s=60)
        for task, exits in (("off", {}), ("older", {"threshold": 0.9})):
            response = _upload_exits(client, task, config, tensors, **exits)
            assert response.status_code == 201, response.text
            shown = client.get(f"/v1/tasks/{task}").json()["methods"]["exits"]
            assert (shown["policy"], shown["threshold"]) == ("off", None), shown


def test_exit_layers_stated_in_the_config_must_be_the_ones_the_tensors_hold(tmp_path: Path) -> None:
    """An exits section listing `layers` must list the layers its exits.* tensors hold (the
    trainer writes exactly those): an upload that does not is 422 naming both."""
    backbone_dir, config, tensors = _off_exit_bundle(tmp_path)
    assert config["methods"]["exits"]["layers"] == [0]
    app = create_app(Settings(store=tmp_path / "store", backbone=backbone_dir, device="cpu", dtype="float32"))
    with TestClient(app) as client:
        wait_ready(client, timeout_s=60)
        assert _upload_exits(client, "ok", config, tensors).status_code == 201
        response = _upload_exits(client, "fewer", config, tensors, layers=[0, 1])
        assert response.status_code == 422, response.text
        assert "'layers' is [0, 1], but the exits.* tensors hold exit classifiers for layers [0]" in response.text
        response = _upload_exits(client, "odd", config, tensors, layers="all")
        assert response.status_code == 422 and "'layers' must be a list of layer indices, got 'all'" in response.text


def test_a_patience_more_than_the_tasks_exit_layers_is_refused_but_a_stored_one_still_serves(tmp_path: Path) -> None:
    """Patience p exits once p consecutive exits agree: past the task's number of exit layers no
    row could ever exit, `off` under another name. A request asking for one and an upload storing
    one (as the policy or as the calibrated patience) are 422 naming the field and the exit count;
    a bundle already in the store with one still loads, and runs every layer as before."""
    import dataclasses

    from service.methods.exits import ExitPolicy

    backbone_dir, config, tensors = _off_exit_bundle(tmp_path)  # one exit layer
    from service.engine.backbone import load_backbone

    info = load_backbone(backbone_dir, device="cpu", dtype="float32").info
    g = torch.Generator().manual_seed(0)
    stored = dataclasses.replace(ExitWeights.init(info, num_labels=2, generator=g), policy=ExitPolicy("patience", 2.0))
    publish(tmp_path / "store", "stored", {"head": random_head(info, g), "exits": stored}, ["neg", "pos"],
            fingerprint=info.fingerprint)
    app = create_app(Settings(store=tmp_path / "store", backbone=backbone_dir, device="cpu", dtype="float32"))
    with TestClient(app) as client:
        wait_ready(client, timeout_s=60)
        served = client.post(CLASSIFY.format("stored"), json={"inputs": ["good", "bad"]})
        assert served.status_code == 200, served.text
        assert [p["exit_layer"] for p in served.json()["predictions"]] == [2, 2]

        asked = client.post(CLASSIFY.format("stored"), json={"inputs": ["good"], "early_exit": {"policy": "patience", "threshold": 3}})
        assert asked.status_code == 422 and asked.json()["error_type"] == "invalid_input", asked.text
        assert asked.json()["error"] == ("early_exit.threshold: patience 3 is more than the task's 1 exit layer, so no "
                                         "row could exit early: use at most 1 (or policy 'off' to run every layer) "
                                         "(task 'stored')")

        policy = _upload_exits(client, "policy", config, tensors, policy="patience", threshold=2)
        assert policy.status_code == 422, policy.text
        assert policy.json()["problems"] == ["exits: threshold: patience 2 is more than the task's 1 exit layer, so no "
                                             "row could exit early: use at most 1 (or policy 'off' to run every layer)"]
        calibrated = _upload_exits(client, "calibrated", config, tensors,
                                   calibration={"policies": {"patience": {"threshold": 4}}})
        assert calibrated.status_code == 422 and "exits: calibration.policies.patience.threshold: patience 4 is more" \
            in calibrated.text, calibrated.text
        assert client.get("/v1/tasks/policy").status_code == 404  # nothing stored
        assert _upload_exits(client, "fits", config, tensors, policy="patience", threshold=1).status_code == 201
