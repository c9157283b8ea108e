"""Early exit on the real MiniLM: accuracy, depth and speed, exits off vs each policy, one run.

    /work/venv/bin/python bench/early_exit.py --threads 1                   # the budgeted CPU run (~15 min)
    /work/venv/bin/python bench/early_exit.py --max-train 128 --max-dev 128 --max-test 128 --epochs 1 \\
        --latency-rows 8 --out /tmp/ee.json --png /tmp/ee.png              # smoke: a few minutes

Per data set (sst2, agnews from ../shared/data): trains a LoRA task with `--early-exit` (the
trainer's defaults: exit classifiers, confidence predictors, thresholds calibrated on dev so
that the accuracy loss is within 1 point at 90% one-sided confidence), publishes it to a temporary store and loads it back with `Engine.load_task`, so
everything below runs the bundle as the service would. Then, side by side:

* batched serving: the test set in batches of --batch (32) pre-built `ClassifyItem`s through
  `Engine.classify`, each batch run once per variant (off, then each policy at its calibrated
  threshold), the order rotating per batch so that load drift on a shared machine hits every
  variant alike. Accuracy, mean exit layer and the exit-layer histogram come from these answers;
  throughput is rows / summed wall time (with the process-CPU-time ratio beside it);
* batch-1 latency: the first --latency-rows test rows one at a time, interleaved the same way;
* the accuracy / speed-up curve: every policy swept over thresholds by replaying the test set's
  per-layer tables (`training.exits.simulate`, which the served answers are checked against at the
  calibrated thresholds), speed-up = layers / mean exit layer; the measured wall-clock speed-ups
  at the calibrated thresholds are drawn on top.

Targets, for each policy at its calibrated threshold (PASS/FAIL): test accuracy within 1.0 point
of the full-depth task, mean exit layer <= 3.5 of 6, batched throughput >= 1.4x and batch-1
latency >= 1.5x better than early exit off. A policy for which no threshold meets the bound
on dev has no calibrated threshold (the task would run it at full depth); it is listed as such
and not timed. Results: bench/results/early_exit.json and .png.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import RESULTS, environment, write_json  # noqa: E402  (sets HF_HUB_OFFLINE)

import torch  # noqa: E402

from bench.train_methods import DATA_ROOT, subsample  # noqa: E402
from service.engine.backbone import load_backbone  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.types import ClassifyItem  # noqa: E402
from service.methods.exits import ExitPolicy  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import LabelledData, Splits, load_splits  # noqa: E402
from training.evaluate import load_published  # noqa: E402
from training.exits import collect, simulate, sweep, tables  # noqa: E402
from training.publish import save_to_store  # noqa: E402
from training.report import format_table  # noqa: E402
from training.trainer import train  # noqa: E402

DATASETS = ("sst2", "agnews")
POLICIES = ("confidence", "entropy", "patience")
# The targets.
MAX_ACC_DROP = 1.0  # accuracy points vs full depth, on test
MAX_MEAN_LAYER = 3.5  # of 6
MIN_BATCHED = 1.4  # throughput ratio vs exits off, batch 32
MIN_LATENCY = 1.5  # batch-1 latency ratio vs exits off


def timed(fn) -> tuple[object, float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def serve_batched(engine: Engine, variants: dict[str, list[ClassifyItem]], batch: int) -> dict[str, dict]:
    """Each test batch once per variant, rotating the order; answers and times per variant."""
    names = list(variants)
    n = len(next(iter(variants.values())))
    for name in names:  # warm-up: first calls pay allocator and tokenizer start-up
        engine.classify(variants[name][:batch])
    out = {v: {"preds": [], "layers": [], "wall": [], "cpu": []} for v in names}
    for b, i in enumerate(range(0, n, batch)):
        k = b % len(names)
        for v in names[k:] + names[:k]:
            preds, wall, cpu = timed(lambda: engine.classify(variants[v][i : i + batch]))
            out[v]["preds"] += [p.label for p in preds]
            out[v]["layers"] += [p.exit_layer for p in preds]
            out[v]["wall"].append(wall)
            out[v]["cpu"].append(cpu)
    return out


def serve_single(engine: Engine, variants: dict[str, list[ClassifyItem]], rows: int) -> dict[str, dict]:
    names = list(variants)
    for name in names:
        engine.classify(variants[name][:1])
    out = {v: {"wall": [], "cpu": []} for v in names}
    for r in range(rows):
        k = r % len(names)
        for v in names[k:] + names[:k]:
            _, wall, cpu = timed(lambda: engine.classify([variants[v][r]]))
            out[v]["wall"].append(wall)
            out[v]["cpu"].append(cpu)
    return out


def run_dataset(name: str, splits: Splits, test: LabelledData, backbone, args, store: Path) -> dict:
    cfg = TrainConfig(method="lora", epochs=args.epochs, seed=args.seed, early_exit=True, exit_max_drop=args.max_drop,
                      exit_confidence=args.confidence, **({"exit_loss": args.exit_loss} if args.exit_loss else {}),
                      **({"exit_target": args.exit_target} if args.exit_target else {}))
    t0 = time.perf_counter()
    result = train(splits, cfg, name=f"{name}-ee", backbone=backbone, progress=not args.no_progress)
    train_s = time.perf_counter() - t0
    version = save_to_store(result, store)
    engine = Engine(backbone)
    task = load_published(engine, store, result.name, version)  # the bundle, as the service loads it
    exits = task.weights["exits"]
    cal = exits.calibration
    layers = cal["layers"]
    policies = {"off": ExitPolicy("off")}
    for p in POLICIES:
        if cal["policies"][p]["met"]:
            policies[p] = ExitPolicy(p, cal["policies"][p]["threshold"])
    not_met = [p for p in POLICIES if p not in policies]
    pairs = test.text_pairs or [None] * len(test)
    variants = {v: [ClassifyItem(task, t, q, exit_policy=pol) for t, q in zip(test.texts, pairs)] for v, pol in policies.items()}

    t1 = time.perf_counter()
    batched = serve_batched(engine, variants, args.batch)
    single = serve_single(engine, variants, min(args.latency_rows, len(test)))
    serve_s = time.perf_counter() - t1

    # the curve, and the replay the served answers are checked against
    t2 = time.perf_counter()
    tab = tables(exits, collect(engine, task, test, exits.pooling, cfg.eval_batch_size))
    curve = {p: [[pt.threshold, pt.accuracy, layers / pt.mean_exit_layer] for pt in sweep(tab, p)] for p in POLICIES}
    curve_s = time.perf_counter() - t2

    gold = list(test.labels)
    off = batched["off"]
    off_wall, off_cpu = sum(off["wall"]), sum(off["cpu"])
    off_lat = statistics.mean(single["off"]["wall"])
    full_acc = sum(p == g for p, g in zip(off["preds"], gold)) / len(gold)
    rows = {}
    for v, pol in policies.items():
        r = batched[v]
        acc = sum(p == g for p, g in zip(r["preds"], gold)) / len(gold)
        mean_layer = statistics.mean(r["layers"])
        lat = statistics.mean(single[v]["wall"])
        row = {
            "threshold": None if v == "off" else pol.threshold,
            "accuracy": acc,
            "accuracy_drop_points": 100 * (full_acc - acc),
            "mean_exit_layer": mean_layer,
            "exit_histogram": {str(k): c for k, c in sorted(Counter(r["layers"]).items())},
            "batched_rows_per_s": len(gold) / sum(r["wall"]),
            "batched_speedup": off_wall / sum(r["wall"]),
            "batched_speedup_paired": statistics.median(a / b for a, b in zip(off["wall"], r["wall"])),
            "batched_speedup_cpu": off_cpu / sum(r["cpu"]),
            "latency_ms_mean": 1e3 * lat,
            "latency_ms_p50": 1e3 * statistics.median(single[v]["wall"]),
            "latency_speedup": off_lat / lat,
            "latency_speedup_cpu": statistics.mean(single["off"]["cpu"]) / statistics.mean(single[v]["cpu"]),
        }
        if v != "off":
            sim_pred, sim_layer = simulate(tab, pol)
            row["replay_layer_agreement"] = sum(a == b for a, b in zip(r["layers"], sim_layer.tolist())) / len(gold)
            row["targets"] = {
                f"accuracy within {MAX_ACC_DROP:g} point": row["accuracy_drop_points"] <= MAX_ACC_DROP + 1e-9,
                f"mean exit layer <= {MAX_MEAN_LAYER:g}": mean_layer <= MAX_MEAN_LAYER,
                f"batched throughput >= {MIN_BATCHED:g}x": row["batched_speedup"] >= MIN_BATCHED,
                f"batch-1 latency >= {MIN_LATENCY:g}x": row["latency_speedup"] >= MIN_LATENCY,
            }
        rows[v] = row
    print(f"{name}: trained in {train_s:.0f}s, served in {serve_s:.0f}s, curve in {curve_s:.0f}s", flush=True)
    return {
        "dataset": name,
        "data": {"train": len(splits.train), "dev": len(splits.dev), "test": len(test)},
        "layers": layers,
        "train": {"seconds": train_s, "steps": result.steps, "epochs_run": len(result.history),
                  "exit_loss": cfg.exit_loss, "dev_full_depth": cal["full_depth_accuracy"], "calibration": cal},
        "full_depth_test_accuracy": full_acc,
        "variants": rows,
        "not_calibrated": not_met,  # no threshold within the bound on dev: not timed
        "curve": curve,
        "seconds": {"train": train_s, "serve": serve_s, "curve": curve_s},
    }


def print_tables(results: list[dict]) -> None:
    for res in results:
        out = []
        for v, r in res["variants"].items():
            out.append([v, r["threshold"], r["accuracy"], r["mean_exit_layer"], r["batched_rows_per_s"], r["batched_speedup"],
                        r["batched_speedup_cpu"], r["latency_ms_mean"], r["latency_speedup"]])
        d = res["data"]
        print(format_table(["variant", "threshold", "test acc", "mean layer", "rows/s b32", "x off b32", "x off cpu",
                            "ms b1", "x off b1"], out,
                           title=f"{res['dataset']}: train {d['train']}, dev {d['dev']}, test {d['test']} "
                           f"({res['layers']} layers, exits {res['train']['exit_loss']})"))
        for v, r in res["variants"].items():
            if v == "off":
                continue
            marks = "  ".join(f"{'PASS' if ok else 'FAIL'} {what}" for what, ok in r["targets"].items())
            print(f"  {v:<10} {marks}   (served exit layer == replay on {100 * r['replay_layer_agreement']:.1f}% of rows)")
        for v in res.get("not_calibrated", []):
            print(f"  {v:<10} no threshold within the bound on dev: no calibrated threshold (full depth)")
        print()


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    colours = {"confidence": "tab:blue", "entropy": "tab:orange", "patience": "tab:green"}
    for ax, res in zip(axes[0], results):
        full = 100 * res["full_depth_test_accuracy"]
        for p, pts in res["curve"].items():
            pts = sorted(pts, key=lambda x: x[2])
            ax.plot([x[2] for x in pts], [100 * x[1] for x in pts], "-", color=colours[p], lw=1.2,
                    marker="." if p == "patience" else None, label=f"{p} (layers saved, replay)")
        for v, r in res["variants"].items():
            if v == "off":
                continue
            ax.plot([r["batched_speedup"]], [100 * r["accuracy"]], "o", color=colours[v], ms=8, mec="black",
                    label=f"{v} @ calibrated, wall clock b32")
            ax.plot([r["latency_speedup"]], [100 * r["accuracy"]], "s", color=colours[v], ms=7, mew=2, mfc="none",
                    label=f"{v} @ calibrated, wall clock b1")
        ax.axhline(full, color="grey", ls="--", lw=1, label="full depth")
        ax.axhline(full - MAX_ACC_DROP, color="red", ls=":", lw=1, label=f"-{MAX_ACC_DROP:g} point")
        ax.axvline(6 / MAX_MEAN_LAYER, color="grey", ls=":", lw=1)
        d = res["data"]
        ax.set_title(f"{res['dataset']} (test {d['test']}, trained on {d['train']})")
        ax.set_xlabel("speed-up vs exits off (x)")
        ax.set_ylabel("test accuracy (%)")
        accs = [100 * x[1] for pts in res["curve"].values() for x in pts] + [100 * r["accuracy"] for r in res["variants"].values()]
        ax.set_ylim(max(min(accs), full - 10) - 0.5, max(max(accs), full) + 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--datasets", default=",".join(DATASETS), help="[%(default)s]")
    p.add_argument("--max-train", default="2000,1000",
                   help="training rows, one number for every data set or one per --datasets entry [%(default)s]")
    p.add_argument("--max-dev", type=int, help="dev rows (checkpoint + calibration) [all: sst2 872, agnews 1000]")
    p.add_argument("--max-test", type=int, default=1000, help="test rows [%(default)s; sst2 has 872]")
    p.add_argument("--epochs", type=int, default=2, help="[%(default)s]")
    p.add_argument("--exit-loss", help=f"[the trainer's: {TrainConfig(method='lora').exit_loss}]")
    p.add_argument("--exit-target", help=f"what the confidence predictors learn [the trainer's: {TrainConfig(method='lora').exit_target}]")
    p.add_argument("--max-drop", type=float, default=TrainConfig(method="lora").exit_max_drop,
                   help="accuracy points calibration may give up, bounded at --confidence on dev [%(default)s]")
    p.add_argument("--confidence", type=float, default=TrainConfig(method="lora").exit_confidence,
                   help="one-sided confidence of that bound (0.5: the dev point estimate) [%(default)s]")
    p.add_argument("--batch", type=int, default=32, help="[%(default)s]")
    p.add_argument("--latency-rows", type=int, default=64, help="rows timed at batch 1 [%(default)s]")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--backbone", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads [torch's default]")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "early_exit.json")
    p.add_argument("--png", type=Path, default=RESULTS / "early_exit.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone, device=args.device, dtype="float32")
    t0 = time.perf_counter()
    results = []
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    sizes = [int(x) for x in args.max_train.split(",")]
    if len(sizes) not in (1, len(names)):
        p.error("--max-train takes one number or one per data set")
    sizes = sizes * len(names) if len(sizes) == 1 else sizes
    with tempfile.TemporaryDirectory(prefix="early-exit-bench-") as tmp:
        for name, max_train in zip(names, sizes):
            root = args.data_root / name
            full = load_splits(root / "train.csv", root / "dev.csv", root / "test.csv")
            splits = Splits(subsample(full.train, max_train, args.seed), subsample(full.dev, args.max_dev, args.seed))
            test = subsample(full.test, args.max_test, args.seed)
            print(f"{name}: train {len(splits.train)}  dev {len(splits.dev)}  test {len(test)}", flush=True)
            results.append(run_dataset(name, splits, test, backbone, args, Path(tmp)))
    print()
    print_tables(results)
    wall = time.perf_counter() - t0
    print(f"total {wall:.0f}s")
    write_json(args.out, {
        "benchmark": "early_exit",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(backbone.device, backbone.dtype),
        "wall_s": wall,
        "results": results,
    })
    plot(results, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
