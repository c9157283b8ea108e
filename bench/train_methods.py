"""Every training method side by side on real data, on the real bundled MiniLM backbone.

    /work/venv/bin/python bench/train_methods.py                                   # full data: hours on CPU
    /work/venv/bin/python bench/train_methods.py --max-train 2000 --epochs 2       # a budgeted run
    /work/venv/bin/python bench/train_methods.py --max-train 64 --max-dev 64 --max-test 64 --epochs 1 \
        --out bench/results/train_methods_smoke.json                               # smoke: a few minutes
    python bench/train_methods.py --device cuda                                    # on a GPU

For each data set (sst2, agnews from ../shared/data) and each method (lora, adapter, prefix,
prompt, head, full) it trains on train.csv with the method's defaults (`training/config.py`
documents where each default comes from: the paper or recipe it follows, and the dev accuracy
`bench/train_defaults.py` chose it on), keeps the best
checkpoint on dev.csv, and scores test.csv. A parameter-efficient task is scored the way a client
would see it: its bundle is written to a temporary store, loaded by `Engine.load_task` and run
through `Engine.classify`; `served-trained` is the largest logit gap between that and the
trainer's own forward (it should be ~1e-6). The full fine-tuning baseline is scored in place.

Every method sees the same subsample (`--max-train/--max-dev/--max-test`, drawn once per data
set with `--seed`) and the same seed, so the table compares methods, not draws. Columns:
test accuracy and macro-F1, the accuracy gap to full fine-tuning, trainable parameters (and as
a share of the backbone), bytes a task adds on disk (the bundle; for full, the whole backbone
copy), training seconds and their ratio to full fine-tuning. Results go to bench/results/ as JSON.
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

from service.engine.backbone import load_backbone  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.task import disk_bytes  # noqa: E402
from service.engine.types import ClassifyItem  # noqa: E402
from training.config import METHODS, TrainConfig  # noqa: E402
from training.data import LabelledData, Splits, load_splits  # noqa: E402
from training.evaluate import evaluate_served, load_published  # noqa: E402
from training.publish import save_to_store  # noqa: E402
from training.report import format_table  # noqa: E402
from training.trainer import evaluate, train  # noqa: E402

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data from the repo
DATASETS = ("sst2", "agnews")
PARITY_ROWS = 32  # test rows whose served and trained logits are compared


def subsample(d: LabelledData, n: int | None, seed: int) -> LabelledData:
    """n rows drawn uniformly without replacement (all rows if n is None or >= len)."""
    if n is None or n >= len(d):
        return d
    idx = sorted(torch.randperm(len(d), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    pairs = None if d.text_pairs is None else [d.text_pairs[i] for i in idx]
    return LabelledData([d.texts[i] for i in idx], pairs, [d.labels[i] for i in idx], d.label_names, d.source)


def run_one(name: str, method: str, splits: Splits, test: LabelledData, backbone, args, store: Path,
            cfg: TrainConfig | None = None) -> dict:
    """Train one method on one data set and score its test split; `cfg` overrides the defaults."""
    if cfg is None:
        cfg = TrainConfig(method=method, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                          max_length=args.max_length, patience=args.patience or None)
    result = train(splits, cfg, name=f"{name}-{method}", backbone=backbone, progress=not args.no_progress)
    row = {
        "dataset": name, "method": method, "lr": cfg.learning_rate, "epochs_run": len(result.history),
        "best_epoch": result.best_epoch, "steps": result.steps, "train_s": result.train_seconds,
        "s_per_step": result.train_seconds / max(1, result.steps), "trainable_params": result.trainable_params,
        "pct_of_backbone": 100.0 * result.trainable_params / backbone.num_params,
        "dev": result.dev_metrics.as_dict(),
        "hyperparameters": cfg.hyperparameters(),
    }
    if method == "full":
        row["bytes"] = backbone.info.num_bytes + sum(w.nbytes() for w in result.weights.values())
        test_m = evaluate(result.engine, result.task, test, cfg.eval_batch_size, progress=not args.no_progress, desc="test")
    else:
        version = save_to_store(result, store)
        engine = Engine(backbone)
        task = load_published(engine, store, result.name, version)
        row["bytes"] = disk_bytes(store / result.name / version)
        test_m = evaluate_served(engine, task, test, cfg.eval_batch_size, progress=not args.no_progress)
        k = min(PARITY_ROWS, len(test))
        pairs = None if test.text_pairs is None else list(test.text_pairs[:k])
        served = engine.classify([ClassifyItem(task, t, p) for t, p in zip(test.texts[:k], pairs or [None] * k)])
        gap = (torch.tensor([p.logits for p in served]) - result.logits(list(test.texts[:k]), pairs)).abs().max()
        row["served_minus_trained"] = float(gap)
    row["test"] = test_m.as_dict()
    print(f"{name} {method}: test accuracy {test_m.accuracy:.4f}  macro_f1 {test_m.macro_f1:.4f}  "
          f"{result.train_seconds:.1f}s", flush=True)
    return row


def summary_rows(rows: list[dict]) -> list[list[object]]:
    full = {r["dataset"]: r for r in rows if r["method"] == "full"}
    out = []
    for r in rows:
        base = full.get(r["dataset"])
        out.append([
            r["dataset"], r["method"], r["test"]["accuracy"], r["test"]["macro_f1"],
            None if base is None else r["test"]["accuracy"] - base["test"]["accuracy"],
            r["trainable_params"], r["pct_of_backbone"], r["bytes"], r["train_s"],
            None if base is None else r["train_s"] / base["train_s"], r.get("served_minus_trained"),
        ])
    return out


HEADERS = ["data", "method", "test acc", "macro_f1", "acc - full", "trainable", "% backbone", "bytes",
           "train s", "time / full", "served-trained"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DATA_ROOT, help="folder with <dataset>/{train,dev,test}.csv [%(default)s]")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated [%(default)s]")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated [%(default)s]")
    p.add_argument("--max-train", type=int, help="subsample the training file to N rows (same rows for every method)")
    p.add_argument("--max-dev", type=int, help="subsample dev to N rows")
    p.add_argument("--max-test", type=int, help="subsample test to N rows")
    p.add_argument("--epochs", type=int, help="[each method's default: training/config.py DEFAULT_EPOCHS]")
    p.add_argument("--patience", type=int, default=TrainConfig(method="lora").patience, help="0 = never stop early [%(default)s]")
    p.add_argument("--batch-size", type=int, default=TrainConfig(method="lora").batch_size, help="[%(default)s]")
    p.add_argument("--max-length", type=int, default=TrainConfig(method="lora").max_length, help="[%(default)s]")
    p.add_argument("--seed", type=int, default=TrainConfig(method="lora").seed, help="[%(default)s]")
    p.add_argument("--backbone", type=Path, help="local encoder folder [the bundled all-MiniLM-L6-v2]")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N [%(default)s]")
    p.add_argument("--threads", type=int, help="torch intra-op threads [torch's default]")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "train_methods.json", help="[%(default)s]")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        p.error(f"unknown methods {bad}; known: {', '.join(METHODS)}")

    backbone = load_backbone(args.backbone, device=args.device, dtype="float32")
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            root = args.data_root / name
            full = load_splits(root / "train.csv", root / "dev.csv", root / "test.csv")
            splits = Splits(subsample(full.train, args.max_train, args.seed), subsample(full.dev, args.max_dev, args.seed))
            test = subsample(full.test, args.max_test, args.seed)
            print(f"{name}: train {len(splits.train)}  dev {len(splits.dev)}  test {len(test)}  "
                  f"labels {', '.join(full.label_names)}", flush=True)
            for method in methods:
                rows.append(run_one(name, method, splits, test, backbone, args, Path(tmp)))
    print()
    print(format_table(HEADERS, summary_rows(rows), title="train_methods: test scores, sizes and times "
                       f"({backbone.name}, {args.device}, seed {args.seed})"))
    write_json(args.out, {
        "benchmark": "train_methods",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(backbone.device, backbone.dtype),
        "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint, "params": backbone.num_params},
        "wall_s": time.perf_counter() - t0,
        "results": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
