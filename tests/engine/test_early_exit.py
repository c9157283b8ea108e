"""Early exit in mixed batches: off == no-exit path, exit logits == that layer's classifier,
compaction keeps rows and tasks aligned."""
from __future__ import annotations

import json

import pytest
import torch

from service.engine.bundle import CONFIG
from service.engine.engine import Engine
from service.engine.types import ClassifyItem, TaskKey
from service.errors import BundleError
from service.methods.exits import ExitPolicy, ExitWeights
from service.methods.head import pool
from tests.factories import publish, random_head, random_method
from tests.engine.test_mixed_batch import _texts


def random_exits(info, g, labels: int, pooling: str = "cls", scale: float = 1.0) -> ExitWeights:
    h, k = info.hidden_size, 8
    r = lambda *s: torch.randn(*s, generator=g) * scale  # noqa: E731
    layers = {layer: (r(labels, h), r(labels), r(k, h + labels), r(k), r(1, k), r(1)) for layer in range(info.num_layers - 1)}
    return ExitWeights(pooling=pooling, layers=layers)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ee")
    from service.engine.backbone import load_backbone
    from tests.factories import save_tiny_backbone

    # 4 layers so rows can leave at 1, 2 or 3
    import transformers as T

    path = save_tiny_backbone("bert", tmp / "bb")
    cfg = T.AutoConfig.from_pretrained(path)
    cfg.num_hidden_layers = 4
    torch.manual_seed(1)
    T.AutoModel.from_config(cfg).save_pretrained(path)
    engine = Engine(load_backbone(path, device="cpu", dtype="float32"))
    info = engine.backbone.info
    g = torch.Generator().manual_seed(0)
    tasks = []
    for i, (method, with_exits) in enumerate([("lora", True), ("adapter", False), ("prefix", True), ("prompt", True), ("lora", False)]):
        n = 2 + i % 2
        w = {method: random_method(method, info, g, i), "head": random_head(info, g, labels=n)}
        if with_exits:
            w["exits"] = random_exits(info, g, n, pooling=("cls", "mean")[i % 2])
        name = f"t{i}"
        v = publish(tmp / "store", name, w, [f"l{k}" for k in range(n)])
        tasks.append(engine.load_task(tmp / "store" / name / v, TaskKey(name, v)))
    return engine, tasks


def _items(tasks, n=20, policy=None):
    texts = _texts(n, seed=5)
    return [ClassifyItem(tasks[i % len(tasks)], texts[i], exit_policy=policy) for i in range(n)]


def test_exits_round_trip_through_the_bundle(setup):
    engine, tasks = setup
    assert "exits" in tasks[0].weights and "exits" not in tasks[1].weights
    assert sorted(tasks[0].weights["exits"].layers) == [0, 1, 2]


def test_policy_off_equals_no_exit_path_exactly(setup):
    engine, tasks = setup
    items = _items(tasks)
    batch = engine.tokenize(items)
    with torch.inference_mode():
        off = engine.run(batch, [ExitPolicy("off")] * len(items))
        ref = engine.full_depth_logits(batch)
    for (z, layer), r in zip(off, ref):
        assert layer == engine.backbone.encoder.num_layers
        assert torch.equal(z, r.float())


@pytest.mark.parametrize("policy", [ExitPolicy("entropy", 0.6), ExitPolicy("patience", 2), ExitPolicy("confidence", 0.5)])
def test_exit_logits_are_that_layers_classifier(setup, policy):
    engine, tasks = setup
    items = _items(tasks, policy=policy)
    batch = engine.tokenize(items)
    with torch.inference_mode():
        got = engine.run(batch, [policy] * len(items))
        # reference: full-depth hidden states of every layer, exit classifier applied by hand
        plan, _ = engine.plan(batch.tasks, batch.row_part)
        enc = engine.backbone.encoder
        st = enc.embed(batch.input_ids, batch.attention_mask, batch.token_type_ids, plan)
        states = []
        for i in range(enc.num_layers):
            st = enc.layer(i, st)
            states.append(st)
    layers_seen = set()
    for r, (it, (z, layer)) in enumerate(zip(items, got)):
        ew = it.task.weights.get("exits")
        if ew is None:
            assert layer == enc.num_layers  # tasks without exit heads run to the end
            continue
        layers_seen.add(layer)
        if layer == enc.num_layers:
            continue
        s = states[layer - 1]
        pooled = pool(s.hidden[r:r + 1], s.keep[r:r + 1], s.text_start[r:r + 1], s.text_len[r:r + 1], ew.pooling)
        torch.testing.assert_close(z, ew.exit_logits(layer - 1, pooled)[0], atol=1e-5, rtol=0)
    assert len(layers_seen) >= 2, f"policy {policy} should spread exits over layers, saw {layers_seen}"


@pytest.mark.parametrize("policy", [ExitPolicy("entropy", 0.6), ExitPolicy("patience", 2)])
def test_compaction_keeps_rows_and_tasks_aligned(setup, policy):
    """Mixed batch with exiting and non-exiting tasks == every row alone (same exit layer too)."""
    engine, tasks = setup
    items = _items(tasks, n=25, policy=policy)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(3)).tolist()
    items = [items[i] for i in order]
    mixed = engine.classify(items)
    exits_seen = set()
    for it, p in zip(items, mixed):
        alone = engine.classify([it])[0]
        assert p.exit_layer == alone.exit_layer
        assert p.version == it.task.key.version and len(p.scores) == len(it.task.labels)
        torch.testing.assert_close(torch.tensor(p.logits), torch.tensor(alone.logits), atol=1e-5, rtol=0)
        exits_seen.add(p.exit_layer)
    assert len(exits_seen) >= 2


def test_bad_exit_bundle_is_refused(setup, tmp_path):
    engine, tasks = setup
    info = engine.backbone.info
    g = torch.Generator().manual_seed(0)
    ex = random_exits(info, g, 2)
    bad = ExitWeights(pooling="cls", layers={**ex.layers, 3: ex.layers[0]})  # the last layer cannot exit early
    v = publish(tmp_path, "bad", {"head": random_head(info, g), "exits": bad}, ["a", "b"])
    from service.errors import BundleError

    with pytest.raises(BundleError, match="only layers 0..2 can exit early"):
        engine.load_task(tmp_path / "bad" / v, TaskKey("bad", v))
    v = publish(tmp_path, "bad2", {"head": random_head(info, g, labels=3), "exits": ex}, ["a", "b", "c"])
    with pytest.raises(BundleError, match="exit classifiers have 2 outputs but 3 labels"):
        engine.load_task(tmp_path / "bad2" / v, TaskKey("bad2", v))


# One malformed tensor of the first exit layer -> the one problem named: the shapes most layers
# agree on are the expected ones (the first layer's used to be, blaming every layer after it).
H = 32  # the tiny backbone's hidden size
ONE_BAD_TENSOR = [
    ("exits.0.conf1.weight", lambda t: t[:4], f"tensor 'exits.0.conf1.weight' has shape [4, {H + 2}], expected [8, {H + 2}]"),
    ("exits.0.conf1.weight", None, "missing tensor 'exits.0.conf1.weight'"),
    ("exits.0.out.weight", lambda t: t[:1], f"tensor 'exits.0.out.weight' has shape [1, {H}], expected [2, {H}]"),
    ("exits.0.out.weight", lambda t: t.flatten(), f"tensor 'exits.0.out.weight' has shape [{2 * H}], expected [2, {H}]"),
    ("exits.0.out.weight", None, "missing tensor 'exits.0.out.weight'"),
]


@pytest.mark.parametrize("name,edit,message", ONE_BAD_TENSOR, ids=[m for _, _, m in ONE_BAD_TENSOR])
def test_one_malformed_exit_tensor_is_the_one_named(setup, tmp_path, name, edit, message):
    from safetensors.torch import load_file, save_file

    from service.engine.bundle import WEIGHTS

    engine, _ = setup
    info = engine.backbone.info
    assert info.hidden_size == H
    g = torch.Generator().manual_seed(0)
    v = publish(tmp_path, "t", {"head": random_head(info, g), "exits": random_exits(info, g, 2)}, ["a", "b"])
    path = tmp_path / "t" / v / WEIGHTS
    tensors = load_file(path)
    if edit is None:
        del tensors[name]
    else:
        tensors[name] = edit(tensors[name]).contiguous()
    save_file(tensors, path)
    with pytest.raises(BundleError) as e:
        engine.load_task(tmp_path / "t" / v, TaskKey("t", v))
    assert e.value.problems == [f"task 't': exits: {message}"]


def test_a_wrong_sized_exit_classifier_on_every_layer_is_named_with_its_shapes(setup, tmp_path):
    """Exit classifiers with 3 outputs on every layer of a 2-label task (confidence MLPs sized for
    2): the classifiers' rows were taken as the rule, and every layer's confidence MLP was reported
    as the wrong shape instead."""
    from safetensors.torch import load_file, save_file

    from service.engine.bundle import WEIGHTS

    engine, _ = setup
    info = engine.backbone.info
    g = torch.Generator().manual_seed(0)
    v = publish(tmp_path, "t", {"head": random_head(info, g), "exits": random_exits(info, g, 2)}, ["a", "b"])
    path = tmp_path / "t" / v / WEIGHTS
    tensors = load_file(path)
    for layer in range(info.num_layers - 1):
        tensors[f"exits.{layer}.out.weight"] = torch.randn(3, H, generator=g)
        tensors[f"exits.{layer}.out.bias"] = torch.zeros(3)
    save_file(tensors, path)
    with pytest.raises(BundleError) as e:
        engine.load_task(tmp_path / "t" / v, TaskKey("t", v))
    assert e.value.problems[0] == (f"task 't': exits: exit classifiers have 3 outputs but 2 labels are named: "
                                   f"exits.<layer>.out.weight is [3, {H}] on layers [0, 1, 2], expected [2, {H}] "
                                   "(and exits.<layer>.out.bias [2])")
    assert not any("conf1" in problem for problem in e.value.problems)


# (policy, threshold) stored in a bundle's exits section -> fragment of the refusal: the rules the
# request's `early_exit` follows (service/api/schemas.py), so no stored default is one a request
# could not ask for (confidence 5 never exits; a NaN threshold reads back as null)
STORED_POLICIES = [
    ("confidence", 5, "a confidence threshold is a probability in [0, 1], got 5.0"),
    ("confidence", -0.1, "a confidence threshold is a probability in [0, 1]"),
    ("entropy", float("nan"), "an early-exit threshold must be a finite number, got nan"),
    ("confidence", float("inf"), "must be a finite number"),
    ("entropy", -0.5, "an entropy threshold is >= 0 nats"),
    ("patience", 1.5, "whole number"),
    ("sometimes", 0.5, "must be one of"),
    ("entropy", None, "with threshold None"),
    ("confidence", 10**400, "got a 401-digit number: out of range"),  # float() of it raised OverflowError
    ("confidence", "0.9", "a threshold is a number, got str"),
]


@pytest.mark.parametrize("policy,threshold,message", STORED_POLICIES, ids=[f"{p}-{t}" for p, t, _ in STORED_POLICIES])
def test_stored_exit_policy_follows_the_request_rules(setup, tmp_path, policy, threshold, message):
    engine, _ = setup
    info = engine.backbone.info
    g = torch.Generator().manual_seed(0)
    v = publish(tmp_path, "t", {"head": random_head(info, g), "exits": random_exits(info, g, 2)}, ["a", "b"])
    bundle = tmp_path / "t" / v
    engine.load_task(bundle, TaskKey("t", "ok"))  # the unedited bundle loads
    cfg = json.loads((bundle / CONFIG).read_text())
    cfg["methods"]["exits"].update(policy=policy, threshold=threshold)
    (bundle / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(BundleError) as e:
        engine.load_task(bundle, TaskKey("t", "bad"))
    assert "exits: stored policy" in str(e.value) and message in str(e.value), str(e.value)


def test_policy_validation():
    with pytest.raises(ValueError, match="one of"):
        ExitPolicy("sometimes")
    with pytest.raises(ValueError, match="whole number"):
        ExitPolicy("patience", 1.5)


# A bundle's calibration record, where the service reads it: `policies.<policy>.threshold` is what a
# request naming only that policy gets (`ExitWeights.threshold_for`), so it follows the same rules.
BAD_CALIBRATIONS = [
    ({"policies": {"entropy": {"threshold": -1}}}, "calibration.policies.entropy.threshold -1: an entropy threshold is >= 0"),
    ({"policies": {"confidence": {"threshold": 10**400}}}, "401-digit number"),
    ({"policies": {"patience": {"threshold": "2"}}}, "calibration.policies.patience.threshold '2': a threshold is a number"),
    ({"policies": {"patience": 2}}, "calibration.policies.patience must be a JSON object, got int"),
    ({"policies": ["confidence"]}, "calibration.policies must be a JSON object"),
    ("calibrated", "calibration must be a JSON object, got str"),
    ("", "calibration must be a JSON object, got str"),
    ([], "calibration must be a JSON object, got list"),
    (False, "calibration must be a JSON object, got bool"),
]


@pytest.mark.parametrize("calibration,message", BAD_CALIBRATIONS, ids=[m[:24] for _, m in BAD_CALIBRATIONS])
def test_a_stored_calibration_the_service_reads_is_checked_at_load(setup, tmp_path, calibration, message):
    engine, _ = setup
    info = engine.backbone.info
    g = torch.Generator().manual_seed(0)
    v = publish(tmp_path, "t", {"head": random_head(info, g), "exits": random_exits(info, g, 2)}, ["a", "b"])
    bundle = tmp_path / "t" / v
    cfg = json.loads((bundle / CONFIG).read_text())
    cfg["methods"]["exits"]["calibration"] = {"policies": {"entropy": {"threshold": None, "met": False},
                                                           "patience": {"threshold": 3}}, "notes": [1, "kept"]}
    (bundle / CONFIG).write_text(json.dumps(cfg))
    task = engine.load_task(bundle, TaskKey("t", "ok"))  # uncalibrated (null) and unread fields are fine
    assert task.weights["exits"].threshold_for("patience") == 3.0
    cfg["methods"]["exits"]["calibration"] = calibration
    (bundle / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(BundleError) as e:
        engine.load_task(bundle, TaskKey("t", "bad"))
    assert message in str(e.value), str(e.value)
