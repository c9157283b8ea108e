"""`--early-exit` training: served == trained (policy off and exit decisions), the calibrated
threshold is stored and loads, and calibration meets its accuracy-drop target (point estimate and
paired upper bound)."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from service.engine.engine import Engine
from service.engine.types import ClassifyItem
from service.methods.exits import DEFAULT_THRESHOLDS, ExitPolicy
from tests.factories import save_tiny_backbone
from tests.training.conftest import tiny_config
from training.cli import build_train_parser, config_from_args
from training.config import ConfigError, TrainConfig
from training.data import load_splits
from training.evaluate import load_published
from training.exits import (ExitTables, LayerFeatures, calibrate, collect, confidence_targets, exit_logits_at, pick,
                            simulate, sweep, tables)
from training.publish import save_to_store
from training.trainer import train

ATOL = 1e-5  # fp32
LAYERS = 4  # three exits, so rows can leave at 1, 2 or 3


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A tiny random BERT with 4 layers (the shared tiny one has 2: a single exit)."""
    import transformers as T

    from service.engine.backbone import load_backbone

    path = save_tiny_backbone("bert", tmp_path_factory.mktemp("deep") / "bert", seed=0)
    cfg = T.AutoConfig.from_pretrained(path)
    cfg.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    T.AutoModel.from_config(cfg).save_pretrained(path)
    return load_backbone(path, device="cpu", dtype="float32")


@pytest.mark.parametrize("exit_loss", ["two-stage", "weighted"])
def test_early_exit_round_trip(exit_loss, deep, csvs, tmp_path):
    splits = load_splits(csvs["train"], csvs["dev"])
    cfg = tiny_config("lora", early_exit=True, exit_loss=exit_loss)
    result = train(splits, cfg, name=f"ee-{exit_loss}", backbone=deep, progress=False)
    assert result.steps == 2
    trained = result.weights["exits"]
    assert sorted(trained.layers) == [0, 1, 2]
    cal = trained.calibration
    assert cal["layers"] == LAYERS and cal["rows"] == len(splits.dev)
    assert (cal["max_drop_points"], cal["confidence"]) == (cfg.exit_max_drop, cfg.exit_confidence)
    assert cal["rule"] == "paired upper bound"
    assert set(cal["policies"]) == {"confidence", "entropy", "patience"}
    conf = cal["policies"]["confidence"]
    if conf["met"]:  # the stored default is the calibrated confidence threshold, within the target
        assert trained.policy == ExitPolicy("confidence", conf["threshold"])
        assert conf["drop_bound_points"] <= cfg.exit_max_drop + 1e-9
        assert conf["accuracy"] >= cal["full_depth_accuracy"] - cfg.exit_max_drop / 100 - 1e-12
    else:
        assert trained.policy == ExitPolicy("off")

    save_to_store(result, tmp_path)
    engine = Engine(deep)  # a fresh engine, as the service would have
    task = load_published(engine, tmp_path, result.name)
    served_exits = task.weights["exits"]
    assert served_exits.policy == trained.policy and served_exits.calibration == cal  # stored and loaded
    assert result.config.hyperparameters()["early_exit"] == {
        "exit_loss": exit_loss, "exit_target": "safe", "exit_max_drop": cfg.exit_max_drop,
        "exit_confidence": cfg.exit_confidence}
    assert cal["confidence_target"] == "safe"
    for name, stored in cal["policies"].items():  # what a request naming only the policy gets
        assert served_exits.threshold_for(name) == (stored["threshold"] if stored["met"] else DEFAULT_THRESHOLDS[name])

    texts = list(splits.dev.texts)
    off = engine.classify([ClassifyItem(task, t, exit_policy=ExitPolicy("off")) for t in texts])
    assert {p.exit_layer for p in off} == {LAYERS}
    torch.testing.assert_close(torch.tensor([p.logits for p in off]), result.logits(texts), atol=ATOL, rtol=0)

    # Exits on: every row's served logits are the trained exit classifier at its layer, and the
    # layer is the one the trainer's calibration replay (`simulate`) predicts for that policy.
    batch = engine.tokenize([ClassifyItem(task, t) for t in texts])
    with torch.no_grad():
        states, final = result.engine.layer_states(batch)
        assert all(torch.equal(a, b) for a, b in zip(final, result.engine.full_depth_logits(batch)))
        per_layer = [z for _, z in exit_logits_at(trained, states)] + [torch.stack(final)]
    t = tables(trained, collect(result.engine, result.task, splits.dev, trained.pooling))
    seen: set[int] = set()
    for policy in (ExitPolicy("patience", 2), ExitPolicy("entropy", _in_widest_gap(t.entropy)),
                   ExitPolicy("confidence", _in_widest_gap(t.confidence))):
        served = engine.classify([ClassifyItem(task, x, exit_policy=policy) for x in texts])
        for r, p in enumerate(served):
            torch.testing.assert_close(torch.tensor(p.logits), per_layer[p.exit_layer - 1][r], atol=ATOL, rtol=0)
        _, layers = simulate(t, policy)
        assert [p.exit_layer for p in served] == layers.tolist()
        seen.update(p.exit_layer for p in served)
    assert len(seen) >= 2, f"the policies should spread rows over layers, saw {seen}"


def test_evaluate_says_where_rows_exited_and_scores_full_depth_on_request(deep, csvs, tmp_path, capsys):
    """`adaptserve evaluate` answers as the service does, under the task's stored policy; it says
    so (policy, rows per exit layer, in print and --json), and --no-early-exit scores at full
    depth, which is what the trainer's own dev/test scores are."""
    import dataclasses
    import json

    from training.cli import evaluate_main
    from training.report import format_metrics
    from training.trainer import evaluate

    splits = load_splits(csvs["train"], csvs["dev"], csvs["test"])
    result = train(splits, tiny_config("lora", early_exit=True), name="ee-eval", backbone=deep, progress=False)
    # patience 1 as the stored policy: the first exit answers every row, whatever the weights learnt
    result.weights["exits"] = dataclasses.replace(result.weights["exits"], policy=ExitPolicy("patience", 1))
    save_to_store(result, tmp_path / "store")
    base = ["--task", "ee-eval", "--store", str(tmp_path / "store"), "--data", str(csvs["test"]),
            "--backbone", str(deep.path), "--no-progress"]

    assert evaluate_main([*base, "--json", str(tmp_path / "served.json")]) == 0
    printed = capsys.readouterr().out
    assert ("early exit: patience 1 (the task's stored policy, as the service answers): 16 of 16 rows left early "
            "(layer 1: 16); 0 ran all 4 layers; mean exit layer 1.00; --no-early-exit scores at full depth") in printed
    served = json.loads((tmp_path / "served.json").read_text())["early_exit"]
    assert served == {"policy": "patience", "threshold": 1.0, "full_depth_forced": False, "layers": LAYERS,
                      "rows_by_exit_layer": {"1": 16}, "rows_exited_early": 16, "mean_exit_layer": 1.0}

    assert evaluate_main([*base, "--no-early-exit", "--json", str(tmp_path / "full.json")]) == 0
    printed = capsys.readouterr().out
    assert format_metrics(evaluate(result.engine, result.task, splits.test)) in printed  # the trainer's full depth
    assert "early exit: off (full depth asked for): no row left early; 16 ran all 4 layers" in printed
    full = json.loads((tmp_path / "full.json").read_text())["early_exit"]
    assert full["policy"] == "off" and full["full_depth_forced"] and full["rows_by_exit_layer"] == {str(LAYERS): 16}

    # stored policy off: the served scores are the full-depth ones, and the line says so (it used to
    # point at --no-early-exit, which would change nothing)
    result.weights["exits"] = dataclasses.replace(result.weights["exits"], policy=ExitPolicy("off"))
    save_to_store(result, tmp_path / "store-off")
    assert evaluate_main([*base[:2], "--store", str(tmp_path / "store-off"), *base[4:]]) == 0
    printed = capsys.readouterr().out
    assert format_metrics(evaluate(result.engine, result.task, splits.test)) in printed
    assert ("early exit: off (the task's stored policy, as the service answers): no row left early; 16 ran all 4 "
            "layers; mean exit layer 4.00; the stored policy is off, so these are the full-depth scores\n") in printed

    # a stored patience its exits can never reach (more than its LAYERS - 1 exit layers; an upload refuses
    # one, a bundle written before still loads): the same full-depth scores, and the line says why
    result.weights["exits"] = dataclasses.replace(result.weights["exits"], policy=ExitPolicy("patience", LAYERS))
    save_to_store(result, tmp_path / "store-never")
    assert evaluate_main([*base[:2], "--store", str(tmp_path / "store-never"), *base[4:]]) == 0
    printed = capsys.readouterr().out
    assert format_metrics(evaluate(result.engine, result.task, splits.test)) in printed
    assert (f"early exit: patience {LAYERS} (the task's stored policy, as the service answers): no row left early; "
            f"16 ran all 4 layers; mean exit layer 4.00; the stored patience {LAYERS} is more than the task's "
            f"{LAYERS - 1} exit layers, so no row can exit early: these are the full-depth scores\n") in printed


def test_training_warns_of_a_policy_left_at_its_uncalibrated_default(tiny, csvs, monkeypatch, caplog):
    """A policy no dev threshold qualified for answers requests that name it at DEFAULT_THRESHOLDS
    (patience 2): documented, and now said in the training output, not only in the bundle."""
    import training.exits as exits_mod

    real = exits_mod.calibrate

    def no_patience(*args, **kwargs):
        policy, record = real(*args, **kwargs)
        record["policies"]["patience"] = {"threshold": None, "met": False}
        return policy, record

    monkeypatch.setattr(exits_mod, "calibrate", no_patience)
    splits = load_splits(csvs["train"], csvs["dev"])
    with caplog.at_level("WARNING", logger="training"):
        result = train(splits, tiny_config("lora", early_exit=True), name="ee-uncal", backbone=tiny, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "early exit" in r.getMessage()]
    cal = result.weights["exits"].calibration
    missed = [name for name, p in cal["policies"].items() if not p["met"]]
    assert len(warned) == 1 and "patience" in missed, warned
    assert f"falls back to the uncalibrated default ({', '.join(f'{n} {DEFAULT_THRESHOLDS[n]:g}' for n in missed)})" \
        in warned[0] and "patience 2" in warned[0]
    assert result.weights["exits"].threshold_for("patience") == DEFAULT_THRESHOLDS["patience"] == 2.0


def test_training_says_the_task_will_not_exit_when_confidence_is_not_calibrated(tiny, csvs, monkeypatch, caplog):
    """No confidence threshold within the target stores policy off: the task trained with
    --early-exit then never exits unless asked, which the warning says, and on a dev set so small
    that one lost answer is over the target (few-shot: 16 rows, 6.25 points) it says what helps."""
    import training.exits as exits_mod

    real = exits_mod.calibrate

    def no_confidence(*args, **kwargs):
        _, record = real(*args, **kwargs)
        record["policies"]["confidence"] = {"threshold": None, "met": False}
        return ExitPolicy("off"), record

    monkeypatch.setattr(exits_mod, "calibrate", no_confidence)
    splits = load_splits(csvs["train"], csvs["dev"])
    with caplog.at_level("WARNING", logger="training"):
        result = train(splits, tiny_config("lora", early_exit=True), name="ee-off", backbone=tiny, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "early exit" in r.getMessage()]
    assert result.weights["exits"].policy == ExitPolicy("off") and len(warned) == 1, warned
    assert ("the task's stored policy is off: it answers every row at full depth unless a request asks for early "
            "exit") in warned[0]
    assert ("dev has 16 rows, so one answer lost is 6.25 points, more than the 1 allowed: a larger --dev or a "
            "higher --exit-max-drop lets more rows exit") in warned[0]


def _in_widest_gap(values: torch.Tensor) -> float:
    """A threshold in the widest gap between the middle half of `values`, so that no row's
    decision hangs on float rounding (served batches and the replay sum in different orders)."""
    v = values.flatten().double().sort().values
    mid = v[len(v) // 4 : 3 * len(v) // 4 + 1]
    k = int((mid[1:] - mid[:-1]).argmax())
    assert mid[k + 1] - mid[k] > 1e-6
    return float((mid[k] + mid[k + 1]) / 2)


def _constructed(n: int = 400, seed: int = 0) -> ExitTables:
    """Rows with a difficulty d: exit e is right when d < (e + 1) / 4 (later exits are right more
    often) and its confidence says so, with noise; the final head is right on 90%."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    e = torch.arange(3)
    right = d[:, None] < (e[None, :] + 1) / 4  # [n, 3]
    top = torch.where(right, labels[:, None], 1 - labels[:, None])
    conf = (right.float() * 0.6 + 0.2 + 0.3 * torch.rand(n, 3, generator=g)).clamp(0, 1)
    entropy = (1 - conf) * 0.7
    final_right = torch.rand(n, generator=g) < 0.9
    final_pred = torch.where(final_right, labels, 1 - labels)
    return ExitTables(conf, entropy, top, final_pred, labels)


@pytest.mark.parametrize("max_drop", [0.0, 0.5, 2.0, 10.0])
def test_calibration_picks_the_most_aggressive_threshold_within_the_drop(max_drop):
    """A constructed case: the chosen threshold meets the drop, and nothing reachable without
    passing below the floor is faster."""
    t = _constructed()
    full = float((t.final_pred == t.labels).double().mean())
    policy, record = calibrate(t, max_drop)
    assert record["full_depth_accuracy"] == full
    for name, chosen in record["policies"].items():
        # from the most conservative threshold, every point up to the chosen one is within the target,
        # and the next more aggressive one is not
        careful = -1 if name == "entropy" else 1
        points = sorted(sweep(t, name), key=lambda p: -careful * p.threshold)
        within = [p.accuracy >= full - max_drop / 100 - 1e-12 for p in points]
        reach = within.index(False) if False in within else len(points)
        if reach == 0:
            assert not chosen["met"]
            continue
        assert chosen["met"] and chosen["accuracy"] >= full - max_drop / 100 - 1e-12
        assert chosen["mean_exit_layer"] == min(p.mean_exit_layer for p in points[:reach])
        if reach < len(points):
            assert min(p.mean_exit_layer for p in points[reach:]) <= chosen["mean_exit_layer"]
        # replaying the stored threshold gives the stored numbers
        pred, layer = simulate(t, ExitPolicy(name, chosen["threshold"]))
        assert float((pred == t.labels).double().mean()) == chosen["accuracy"]
        assert float(layer.double().mean()) == chosen["mean_exit_layer"]
    conf = record["policies"]["confidence"]
    assert policy == ExitPolicy("confidence", conf["threshold"])
    assert conf["mean_exit_layer"] < 4  # rows do leave early on this case


def test_calibration_with_a_looser_target_is_never_slower():
    t = _constructed()
    layers = [calibrate(t, d)[1]["policies"]["confidence"]["mean_exit_layer"] for d in (0.0, 0.5, 2.0, 10.0)]
    assert layers == sorted(layers, reverse=True) and layers[-1] < layers[0]


def test_no_threshold_within_the_target_stores_policy_off():
    t = _constructed()
    # every exit is always wrong: any early exit costs accuracy, so only "never exit" qualifies
    bad = ExitTables(t.confidence, t.entropy, 1 - t.labels[:, None].expand_as(t.top), t.labels.clone(), t.labels)
    policy, record = calibrate(bad, 0.5)
    assert policy == ExitPolicy("off")
    assert not record["policies"]["confidence"]["met"] and record["policies"]["confidence"]["threshold"] is None


def test_sweep_reports_the_paired_standard_error_of_the_drop():
    """drop_se is the standard error of [full depth right] - [policy right] over the rows: zero
    where the policy never changes an answer, and by hand on a small case."""
    t = _constructed()
    for p in sweep(t, "confidence"):
        pred, _ = simulate(t, ExitPolicy("confidence", p.threshold))
        diff = ((t.final_pred == t.labels).double() - (pred == t.labels).double()).tolist()
        assert p.drop_se == pytest.approx(statistics.stdev(diff) / math.sqrt(len(diff)), abs=1e-12)
    # four rows: the policy (patience 1: the first exit answers) turns one right answer wrong and
    # one wrong answer right, and leaves two alone: diffs [1, -1, 0, 0]
    top = torch.tensor([[1, 1], [0, 0], [0, 0], [1, 1]])
    t4 = ExitTables(torch.zeros(4, 2), torch.ones(4, 2), top, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 0, 1]))
    (p1,) = [p for p in sweep(t4, "patience") if p.threshold == 1.0]
    assert p1.accuracy == 0.75 and p1.drop_se == pytest.approx(statistics.stdev([1, -1, 0, 0]) / 2)


@pytest.mark.parametrize("confidence", [0.5, 0.75, 0.9, 0.99])
def test_calibration_bound_holds_at_the_chosen_threshold(confidence):
    """With confidence > 0.5 the chosen point's upper bound (drop + z * SE) is within the target,
    as is every more conservative point on the way to it; the record says so."""
    t = _constructed(n=300, seed=3)
    full = float((t.final_pred == t.labels).double().mean())
    z = statistics.NormalDist().inv_cdf(confidence)
    _, record = calibrate(t, 1.0, confidence)
    assert record["confidence"] == confidence and record["z"] == pytest.approx(z, abs=1e-4)
    for name, chosen in record["policies"].items():
        careful = -1 if name == "entropy" else 1
        points = sorted(sweep(t, name), key=lambda p: -careful * p.threshold)
        bound = [100 * (full - p.accuracy + z * p.drop_se) for p in points]
        reach = next((i for i, b in enumerate(bound) if b > 1.0 + 1e-10), len(points))
        if reach == 0:
            assert not chosen["met"]
            continue
        assert chosen["met"] and chosen["drop_bound_points"] <= 1.0 + 1e-9
        assert chosen["mean_exit_layer"] == min(p.mean_exit_layer for p in points[:reach])


def test_a_higher_confidence_is_never_more_aggressive():
    """The bound only tightens the point-estimate rule: more confidence, never fewer layers."""
    for seed in range(3):
        t = _constructed(n=300, seed=seed)
        for name in ("confidence", "entropy", "patience"):
            layers = [calibrate(t, 1.0, c)[1]["policies"][name].get("mean_exit_layer", LAYERS)
                      for c in (0.5, 0.8, 0.9, 0.99)]
            assert layers == sorted(layers), (seed, name, layers)
        conf = [calibrate(t, 1.0, c)[1]["policies"]["confidence"].get("mean_exit_layer", LAYERS) for c in (0.5, 0.99)]
        assert conf[0] < conf[1]  # and on this case it does cost layers


def test_pick_with_z_stops_where_the_bound_crosses():
    from training.exits import Point

    pts = [Point(0.9, 0.80, 5.0, 0.000), Point(0.7, 0.80, 3.0, 0.004), Point(0.5, 0.795, 2.0, 0.010)]
    floor = 0.80 - 0.01  # a 1-point target
    assert pick(pts, floor, "confidence", z=0.0).threshold == 0.5  # point estimates: all within
    assert pick(pts, floor, "confidence", z=1.0).threshold == 0.7  # 0.795 - 0.010 < 0.79: stop before
    assert pick(pts, floor, "confidence", z=3.0).threshold == 0.9  # 0.80 - 0.012 < 0.79


def test_confidence_targets_per_row_and_exit():
    """Rows: (exit argmaxes at 2 exits, full depth's argmax, gold). `safe` is 0 only where the exit
    is wrong and the full depth right; `agrees` compares with the full depth, `right` with gold."""
    z = torch.tensor([[[2.0, 0.0], [0.0, 2.0]],   # exits say 0, 1
                      [[0.0, 2.0], [0.0, 2.0]],   # 1, 1
                      [[2.0, 0.0], [2.0, 0.0]]])  # 0, 0
    final = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # the full depth says 1 everywhere
    feats = LayerFeatures(torch.zeros(3, 2, 4), final, torch.tensor([1, 0, 0]))  # gold 1, 0, 0
    assert confidence_targets(z, feats, "right").tolist() == [[0, 1], [0, 0], [1, 1]]
    assert confidence_targets(z, feats, "agrees").tolist() == [[0, 1], [1, 1], [0, 0]]
    # row 0: full depth right -> safe only where the exit is right; rows 1-2: full depth wrong -> safe everywhere
    assert confidence_targets(z, feats, "safe").tolist() == [[0, 1], [1, 1], [1, 1]]
    with pytest.raises(ValueError, match="safe, right, agrees"):
        confidence_targets(z, feats, "lucky")


def test_patience_replay_counts_agreeing_exits():
    top = torch.tensor([[0, 0, 1], [1, 0, 0], [1, 1, 1]])
    t = ExitTables(torch.zeros(3, 3), torch.ones(3, 3), top, torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]))
    pred, layer = simulate(t, ExitPolicy("patience", 2))
    assert layer.tolist() == [2, 3, 2] and pred.tolist() == [0, 0, 1]
    pred, layer = simulate(t, ExitPolicy("patience", 3))
    assert layer.tolist() == [4, 4, 3] and pred.tolist() == [1, 1, 1]


@pytest.mark.parametrize("flags, message", [
    (["--exit-loss", "sometimes"], "invalid choice"),
    (["--exit-target", "lucky"], "invalid choice"),
    (["--exit-max-drop", "-1"], "--exit-max-drop"),
    (["--exit-confidence", "1"], "--exit-confidence"),
    (["--exit-confidence", "0.3"], "--exit-confidence"),
])
def test_cli_early_exit_options(flags, message, capsys):
    base = ["--task", "t", "--data", "a.csv", "--dev", "b.csv", "--method", "lora", "--no-publish", "--early-exit"]
    parser = build_train_parser()
    if message == "invalid choice":
        with pytest.raises(SystemExit):
            parser.parse_args(base + flags)
        assert message in capsys.readouterr().err
    else:
        with pytest.raises(ConfigError, match=message):
            config_from_args(parser.parse_args(base + flags))
    cfg = config_from_args(parser.parse_args(base + ["--exit-loss", "weighted", "--exit-max-drop", "0.5",
                                                     "--exit-confidence", "0.95", "--exit-target", "right"]))
    assert cfg.early_exit and cfg.exit_loss == "weighted" and cfg.exit_max_drop == 0.5 and cfg.exit_confidence == 0.95
    assert cfg.exit_target == "right" and config_from_args(parser.parse_args(base)).exit_target == "safe"
    assert not config_from_args(parser.parse_args(base[:-1])).early_exit
    assert TrainConfig(method="lora").exit_loss in ("two-stage", "weighted")
