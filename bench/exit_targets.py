"""What the early-exit confidence predictors should learn: `--exit-target` safe vs right vs agrees.

    /work/venv/bin/python bench/exit_targets.py --threads 2        # CPU: ~4 min per data set

Per data set (sst2, agnews): trains the task `bench/early_exit.py` trains (LoRA `--early-exit`,
2 epochs, seed 42, sst2 2,000 / agnews 1,000 training rows), reads every exit's pooled states once
on train, dev, test (sst2 all 872, agnews 1,000 drawn with seed 42) and the training rows the task
never saw ("pool"), then, with the exit classifiers fixed, fits the confidence MLPs from the same
start once per target (`training.exits.confidence_targets`):

* right   BERxiT's: the exit's argmax is the gold label;
* agrees  the exit's argmax is the full-depth head's;
* safe    exiting there loses nothing vs the full depth: not (exit wrong and full depth right).

For each, on test and pool: the accuracy loss vs full depth (points) and mean exit layer at the
threshold calibrated on dev (`calibrate`, the trainer's rule), and, threshold-free, the loss at
the sweep points nearest 3.0 and 3.5 mean exit layers (what ranks rows better loses less at the
same depth). No test number plays a part in any choice made here.
Results: bench/results/exit_targets.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import RESULTS, environment, write_json  # noqa: E402  (sets HF_HUB_OFFLINE)

import torch  # noqa: E402

from bench.exit_calibration import chosen, replay, rows  # noqa: E402
from bench.train_methods import DATA_ROOT, subsample  # noqa: E402
from service.engine.backbone import load_backbone  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.methods.exits import ExitWeights  # noqa: E402
from training.config import EXIT_TARGETS, TrainConfig  # noqa: E402
from training.data import Splits, load_splits  # noqa: E402
from training.evaluate import load_published  # noqa: E402
from training.exits import LayerFeatures, collect, fit_confidence, sweep, tables  # noqa: E402
from training.publish import save_to_store  # noqa: E402
from training.trainer import train  # noqa: E402

TRAIN_ROWS = {"sst2": 2000, "agnews": 1000}  # as bench/early_exit.py
DEPTHS = (3.0, 3.5)


def score(exits: ExitWeights, feats: dict[str, LayerFeatures], cfg: TrainConfig) -> dict:
    entry = chosen(tables(exits, feats["dev"]), cfg.exit_max_drop, cfg.exit_confidence)["confidence"]
    out = {}
    for split in ("test", "pool"):
        t = tables(exits, feats[split])
        full = float((t.final_pred == t.labels).double().mean())
        r: dict = {}
        if entry["met"]:
            loss, layer = replay(t, entry)
            r["calibrated"] = {"loss_points": round(loss, 2), "mean_exit_layer": round(layer, 3)}
        points = sweep(t, "confidence")
        for depth in DEPTHS:
            p = min(points, key=lambda q: abs(q.mean_exit_layer - depth))
            r[f"at_{depth}"] = {"loss_points": round(100 * (full - p.accuracy), 2), "mean_exit_layer": round(p.mean_exit_layer, 3)}
        out[split] = r
    return out


def run(name: str, backbone, args: argparse.Namespace) -> dict:
    root = DATA_ROOT / name
    full = load_splits(root / "train.csv", root / "dev.csv", root / "test.csv")
    n = TRAIN_ROWS[name]
    picked = sorted(torch.randperm(len(full.train), generator=torch.Generator().manual_seed(args.seed))[:n].tolist())
    taken = set(picked)
    train_d = rows(full.train, picked)  # what `subsample(full.train, n, seed)` draws
    pool_d = rows(full.train, [i for i in range(len(full.train)) if i not in taken])
    test_d = subsample(full.test, 1000, args.seed)
    cfg = TrainConfig(method="lora", epochs=2, seed=args.seed, early_exit=True)
    t0 = time.perf_counter()
    result = train(Splits(train_d, full.dev), cfg, name=f"{name}-ee", backbone=backbone, progress=False)
    store = Path(tempfile.mkdtemp(prefix="exit-targets-"))
    engine = Engine(backbone)
    task = load_published(engine, store, result.name, save_to_store(result, store))
    exits: ExitWeights = task.weights["exits"]
    feats = {k: collect(engine, task, d, exits.pooling, cfg.eval_batch_size)
             for k, d in (("train", train_d), ("dev", full.dev), ("test", test_d), ("pool", pool_d))}
    start = ExitWeights.init(backbone.info, num_labels=len(full.train.label_names), pooling=exits.pooling,
                             generator=torch.Generator().manual_seed(args.seed))
    out = {"dataset": name, "rows": {k: int(f.labels.numel()) for k, f in feats.items()}, "targets": {}}
    for target in EXIT_TARGETS:
        with torch.no_grad():
            for layer in exits.layers:
                for t, s in zip(exits.layers[layer][2:], start.layers[layer][2:]):
                    t.copy_(s)
        fit_confidence(exits, feats["train"], feats["dev"], torch.Generator().manual_seed(args.seed), target=target)
        out["targets"][target] = score(exits, feats, cfg)
        print(f"{name} {target}: {out['targets'][target]}", flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="sst2,agnews")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "exit_targets.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = load_backbone(None, device="cpu", dtype="float32")
    t0 = time.perf_counter()
    results = [run(name, backbone, args) for name in args.datasets.split(",")]
    write_json(args.out, {"benchmark": "exit_targets", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                          "environment": environment(backbone.device, backbone.dtype),
                          "wall_s": round(time.perf_counter() - t0, 1), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
