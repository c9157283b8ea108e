"""Why prefix tuning starts from the backbone's own keys/values: the alternatives, side by side.

    /work/venv/bin/python bench/prefix_init.py --max-train 256 --max-dev 128 --epochs 1   # CPU smoke
    python bench/prefix_init.py --device cuda --max-train 3000 --max-dev 500 --epochs 3

Trains prefix tuning on one data set (default sst2) with the trainer's defaults, changing only how
the prefix keys/values start:

  real        the keys/values the frozen backbone computes for random common tokens (ours)
  normal-0.02 N(0, 0.02): small, so at first the prefix only dilutes attention
  normal-1    N(0, 1): roughly the scale of real keys, but random directions

Each variant runs with the same seeds, data subsample and learning rate (and one 3x lower, since
a start off the activations' scale may need it); dev accuracy of the chosen checkpoint and test
accuracy are reported per seed and as a mean. Results go to bench/results/prefix_init.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import RESULTS, environment, write_json  # noqa: E402

import torch  # noqa: E402

from bench.train_methods import DATA_ROOT, subsample  # noqa: E402
from service.engine.backbone import load_backbone  # noqa: E402
from service.methods.base import trainable  # noqa: E402
from service.methods.prefix import PrefixWeights  # noqa: E402
from training.config import DEFAULT_LR, TrainConfig  # noqa: E402
from training.data import Splits, load_splits  # noqa: E402
from training.report import format_table  # noqa: E402
from training.trainer import evaluate, train  # noqa: E402

REAL_INIT = PrefixWeights.__dict__["init"]  # the classmethod object


def normal_init(std: float):
    """A drop-in for PrefixWeights.init drawing keys/values from N(0, std) instead."""

    def init(cls, backbone, *, num_virtual_tokens, shift_positions=True, generator=None):
        info = backbone.info
        shape = (info.num_layers, num_virtual_tokens, info.hidden_size)
        k = torch.empty(shape).normal_(0.0, std, generator=generator)
        v = torch.empty(shape).normal_(0.0, std, generator=generator)
        return cls(keys=trainable(k, info), values=trainable(v, info), num_heads=info.num_heads,
                   shift_positions=shift_positions)

    return classmethod(init)


VARIANTS = {"real": REAL_INIT, "normal-0.02": normal_init(0.02), "normal-1": normal_init(1.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--dataset", default="sst2")
    p.add_argument("--backbone", type=Path, help="local encoder folder [the bundled all-MiniLM-L6-v2]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-train", type=int, default=3000)
    p.add_argument("--max-dev", type=int, default=500)
    p.add_argument("--max-test", type=int)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--out", type=Path, default=RESULTS / "prefix_init.json")
    args = p.parse_args(argv)
    backbone = load_backbone(args.backbone, device=args.device, dtype="float32")
    root = args.data_root / args.dataset
    full = load_splits(root / "train.csv", root / "dev.csv", root / "test.csv")
    splits = Splits(subsample(full.train, args.max_train, 0), subsample(full.dev, args.max_dev, 0))
    test = subsample(full.test, args.max_test, 0)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    try:
        for lr in (DEFAULT_LR["prefix"], DEFAULT_LR["prefix"] / 3):
            for variant, init in VARIANTS.items():
                PrefixWeights.init = init  # type: ignore[method-assign]
                for seed in seeds:
                    cfg = TrainConfig(method="prefix", epochs=args.epochs, seed=seed, lr=lr)
                    r = train(splits, cfg, name="prefix-init", backbone=backbone, progress=False)
                    t = evaluate(r.engine, r.task, test, cfg.eval_batch_size)
                    runs.append({"variant": variant, "lr": lr, "seed": seed, "dev_accuracy": r.dev_metrics.accuracy,
                                 "test_accuracy": t.accuracy, "test_macro_f1": t.macro_f1, "train_s": r.train_seconds,
                                 "history": [h.as_dict() for h in r.history]})
                    print(f"{variant:12s} lr {lr:.2e} seed {seed}: dev {r.dev_metrics.accuracy:.4f} test {t.accuracy:.4f}", flush=True)
    finally:
        PrefixWeights.init = REAL_INIT  # type: ignore[method-assign]
    table = []
    for lr in sorted({r["lr"] for r in runs}, reverse=True):
        for variant in VARIANTS:
            sel = [r for r in runs if r["variant"] == variant and r["lr"] == lr]
            table.append([variant, lr, statistics.mean(r["dev_accuracy"] for r in sel),
                          statistics.mean(r["test_accuracy"] for r in sel), len(sel)])
    print(format_table(["init", "lr", "dev acc (mean)", "test acc (mean)", "seeds"], table,
                       title=f"prefix init on {args.dataset}: train {len(splits.train)}, {args.epochs} epochs"))
    write_json(args.out, {"benchmark": "prefix_init", "args": {k: str(v) for k, v in vars(args).items()},
                          "environment": environment(backbone.device, backbone.dtype), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
