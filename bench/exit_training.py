"""How to train early-exit classifiers: DeeBERT's two stages vs PABEE's weighted loss, measured.

    /work/venv/bin/python bench/exit_training.py --max-train 1500 --epochs 2 --threads 1   # CPU, ~10 min
    python bench/exit_training.py --device cuda --epochs 3                                                # full sst2

Trains one LoRA task with `--early-exit` per variant (same data subsample, seeds and defaults;
only `exit_loss` differs), then reports for each: the full-depth task's dev and test accuracy
(does the weighted loss cost the final head?), every exit's dev accuracy, and, per policy, the
calibrated threshold (<= --max-drop points on dev) with its dev accuracy and mean exit layer and
the same threshold replayed on test (`training.exits.simulate` over the test set's per-layer
tables: what serving answers, without timing it). Results: bench/results/exit_training.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import RESULTS, environment, write_json  # noqa: E402  (sets HF_HUB_OFFLINE)

import torch  # noqa: E402

from bench.train_methods import DATA_ROOT, subsample  # noqa: E402
from service.engine.backbone import load_backbone  # noqa: E402
from service.methods.exits import ExitPolicy  # noqa: E402
from training.config import EXIT_LOSSES, TrainConfig  # noqa: E402
from training.data import Splits, load_splits  # noqa: E402
from training.exits import collect, simulate, tables  # noqa: E402
from training.report import format_table  # noqa: E402
from training.trainer import train  # noqa: E402


def run_one(exit_loss: str, seed: int, splits: Splits, test, backbone, args) -> dict:
    cfg = TrainConfig(method="lora", epochs=args.epochs, seed=seed, early_exit=True, exit_loss=exit_loss,
                      exit_max_drop=args.max_drop, patience=None)
    t0 = time.perf_counter()
    result = train(splits, cfg, name=f"ee-{exit_loss}", backbone=backbone, progress=not args.no_progress)
    seconds = time.perf_counter() - t0  # training + exits + calibration
    exits = result.weights["exits"]
    cal = exits.calibration
    t = tables(exits, collect(result.engine, result.task, test, exits.pooling, cfg.eval_batch_size))
    on_test = {}
    for name, p in cal["policies"].items():
        if not p["met"]:
            on_test[name] = None
            continue
        pred, layer = simulate(t, ExitPolicy(name, p["threshold"]))
        on_test[name] = {"accuracy": float((pred == t.labels).double().mean()), "mean_exit_layer": float(layer.double().mean())}
    row = {
        "exit_loss": exit_loss, "seed": seed, "seconds": seconds, "steps": result.steps,
        "dev_full_depth": cal["full_depth_accuracy"], "test_full_depth": result.test_metrics.accuracy,
        "dev_exit_accuracy": cal["exit_accuracy"], "calibrated_dev": cal["policies"], "calibrated_test": on_test,
    }
    c, ct = cal["policies"]["confidence"], on_test["confidence"]
    print(f"{exit_loss} seed {seed}: full depth dev {row['dev_full_depth']:.4f} test {row['test_full_depth']:.4f}; "
          f"exits dev {', '.join(f'{a:.3f}' for a in cal['exit_accuracy'])}; confidence "
          + (f"{c['threshold']:.3f}: dev {c['accuracy']:.4f} @ {c['mean_exit_layer']:.2f}, test {ct['accuracy']:.4f} "
             f"@ {ct['mean_exit_layer']:.2f}" if c["met"] else "unmet") + f"  ({seconds:.0f}s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--dataset", default="sst2")
    p.add_argument("--max-train", type=int)
    p.add_argument("--max-dev", type=int)
    p.add_argument("--max-test", type=int)
    p.add_argument("--epochs", type=int, default=TrainConfig(method="lora").num_epochs)
    p.add_argument("--seeds", default="42", help="comma-separated [%(default)s]")
    p.add_argument("--max-drop", type=float, default=TrainConfig(method="lora").exit_max_drop, help="[%(default)s]")
    p.add_argument("--variants", default=",".join(EXIT_LOSSES), help="[%(default)s]")
    p.add_argument("--backbone", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "exit_training.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.data_root / args.dataset
    full = load_splits(root / "train.csv", root / "dev.csv", root / "test.csv")
    splits = Splits(subsample(full.train, args.max_train, 0), subsample(full.dev, args.max_dev, 0),
                    subsample(full.test, args.max_test, 0))
    print(f"{args.dataset}: train {len(splits.train)}  dev {len(splits.dev)}  test {len(splits.test)}", flush=True)
    backbone = load_backbone(args.backbone, device=args.device, dtype="float32")
    t0 = time.perf_counter()
    rows = [run_one(v, int(s), splits, splits.test, backbone, args)
            for s in args.seeds.split(",") for v in args.variants.split(",")]
    table = []
    for v in args.variants.split(","):
        mine = [r for r in rows if r["exit_loss"] == v]
        mean = lambda f: statistics.mean(f(r) for r in mine)  # noqa: E731
        met = [r for r in mine if r["calibrated_dev"]["confidence"]["met"]]
        table.append([v, len(mine), mean(lambda r: r["dev_full_depth"]), mean(lambda r: r["test_full_depth"]),
                      mean(lambda r: r["dev_exit_accuracy"][0]), mean(lambda r: r["dev_exit_accuracy"][-1]),
                      statistics.mean(r["calibrated_dev"]["confidence"]["mean_exit_layer"] for r in met) if met else None,
                      statistics.mean(r["calibrated_test"]["confidence"]["accuracy"] for r in met) if met else None,
                      statistics.mean(r["calibrated_test"]["confidence"]["mean_exit_layer"] for r in met) if met else None,
                      mean(lambda r: r["seconds"])])
    print()
    print(format_table(["exit loss", "seeds", "dev full", "test full", "exit1 dev", "exit5 dev", "conf layer dev",
                        "conf test acc", "conf layer test", "train s"], table,
                       title=f"exit training on {args.dataset} (LoRA, {args.epochs} epochs, <= {args.max_drop:g} points on dev)"))
    write_json(args.out, {
        "benchmark": "exit_training",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(backbone.device, backbone.dtype),
        "data": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test)},
        "wall_s": time.perf_counter() - t0,
        "results": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
