"""How to calibrate the early-exit threshold: point estimate vs a paired upper bound, measured on
training rows the task never saw (no test set involved in the choice).

    /work/venv/bin/python bench/exit_calibration.py --threads 1          # CPU, ~30 min on a shared core

Per data set (sst2, agnews): trains the task `bench/early_exit.py` trains (LoRA with `--early-exit`,
same rows, epochs and seed), then reads every exit's tables (`training.exits.tables`) on the rows of
the training split it did not train on ("pool"). For each calibration rule (`--exit-max-drop` @
`--exit-confidence`), over --draws random draws: `training.exits.calibrate` on a dev-sized sample
of the pool, then the chosen thresholds replayed (`simulate`) on a disjoint test-sized sample.
Reported per rule and policy: mean loss vs full depth on the fresh sample, P(loss <= 1 point),
mean exit layer, P(mean exit layer <= 3.5) and P(both): the issue's targets, as often as a
fresh test set of that size would show them. The rule calibrated on the real dev split, replayed
on the pool and on test, is recorded too (a diagnostic: it plays no part in the choice).
Results: bench/results/exit_calibration.json.
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

from bench.train_methods import DATA_ROOT  # noqa: E402
from service.engine.backbone import load_backbone  # noqa: E402
from service.methods.exits import ExitPolicy  # noqa: E402
from training.config import LoraConfig, TrainConfig  # noqa: E402
from training.data import LabelledData, Splits, load_splits  # noqa: E402
from training.exits import ExitTables, calibrate, collect, simulate, tables  # noqa: E402
from training.report import format_table  # noqa: E402
from training.trainer import train  # noqa: E402

POLICIES = ("confidence", "entropy", "patience")
MAX_LOSS, MAX_LAYER = 1.0, 3.5  # the targets (points; of 6 layers)
# loss bound (points) @ one-sided confidence; 0.5 = the point estimate (the rule before the bound)
RULES = "0.5@0.5,1.0@0.5,0.5@0.8413,0.5@0.95,1.0@0.8413,1.0@0.9,1.0@0.95"


def rows(d: LabelledData, idx: list[int]) -> LabelledData:
    pairs = None if d.text_pairs is None else [d.text_pairs[i] for i in idx]
    return LabelledData([d.texts[i] for i in idx], pairs, [d.labels[i] for i in idx], d.label_names, d.source)


def sub(t: ExitTables, idx: torch.Tensor) -> ExitTables:
    return ExitTables(t.confidence[idx], t.entropy[idx], t.top[idx], t.final_pred[idx], t.labels[idx])


def replay(t: ExitTables, policy: dict) -> tuple[float, float]:
    """(loss in points vs full depth, mean exit layer) of a calibrated policy entry on `t`."""
    if not policy["met"]:
        return 0.0, float(t.layers)
    pred, layer = simulate(t, ExitPolicy(policy["name"], policy["threshold"]))
    full = float((t.final_pred == t.labels).double().mean())
    return 100 * (full - float((pred == t.labels).double().mean())), float(layer.double().mean())


def chosen(t: ExitTables, max_drop: float, confidence: float) -> dict[str, dict]:
    _, record = calibrate(t, max_drop, confidence)
    return {p: {"name": p, **record["policies"][p]} for p in POLICIES}


def run_dataset(name: str, args, backbone, max_train: int, max_pool: int) -> dict:
    root = args.data_root / name
    full = load_splits(root / "train.csv", root / "dev.csv", root / "test.csv")
    # the same training rows as bench/early_exit.py (bench.train_methods.subsample, seed)
    perm = torch.randperm(len(full.train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    used = sorted(perm[:max_train])
    unused = sorted(set(range(len(full.train))) - set(used))
    g = torch.Generator().manual_seed(args.seed + 1)
    pool_idx = [unused[i] for i in torch.randperm(len(unused), generator=g)[:max_pool].tolist()]
    train_rows, pool = rows(full.train, used), rows(full.train, pool_idx)
    test = full.test if len(full.test) <= 1000 else rows(full.test, sorted(
        torch.randperm(len(full.test), generator=torch.Generator().manual_seed(args.seed))[:1000].tolist()))
    lora = LoraConfig(targets=tuple(args.lora_targets.split(","))) if args.lora_targets else LoraConfig()
    cfg = TrainConfig(method="lora", epochs=args.epochs, seed=args.seed, early_exit=True, lora=lora)
    t0 = time.perf_counter()
    result = train(Splits(train_rows, full.dev), cfg, name=f"{name}-cal", backbone=backbone, progress=False)
    exits = result.weights["exits"]
    tab = {k: tables(exits, collect(result.engine, result.task, d, exits.pooling, cfg.eval_batch_size))
           for k, d in (("dev", full.dev), ("pool", pool), ("test", test))}
    print(f"{name}: trained and read in {time.perf_counter() - t0:.0f}s; pool {len(pool)}", flush=True)

    n_cal, n_eval, P = len(full.dev), len(test), tab["pool"]
    if n_cal + n_eval > len(pool):
        raise SystemExit(f"{name}: pool of {len(pool)} rows < dev {n_cal} + test {n_eval}")
    g = torch.Generator().manual_seed(args.seed + 2)
    draws = [torch.randperm(len(pool), generator=g) for _ in range(args.draws)]
    rules = {}
    for rule in args.rules.split(","):
        max_drop, confidence = (float(x) for x in rule.split("@"))
        per = {p: {"loss": [], "layer": []} for p in POLICIES}
        for perm in draws:
            picked = chosen(sub(P, perm[:n_cal]), max_drop, confidence)
            fresh = sub(P, perm[n_cal : n_cal + n_eval])
            for p in POLICIES:
                loss, layer = replay(fresh, picked[p])
                per[p]["loss"].append(loss)
                per[p]["layer"].append(layer)
        out = {}
        for p, r in per.items():
            ok_loss = [x <= MAX_LOSS + 1e-9 for x in r["loss"]]
            ok_layer = [x <= MAX_LAYER for x in r["layer"]]
            out[p] = {"mean_loss": statistics.mean(r["loss"]), "p_loss_ok": statistics.mean(ok_loss),
                      "mean_layer": statistics.mean(r["layer"]), "p_layer_ok": statistics.mean(ok_layer),
                      "p_both": statistics.mean(a and b for a, b in zip(ok_loss, ok_layer))}
        real = chosen(tab["dev"], max_drop, confidence)  # diagnostic only
        out["calibrated_on_dev"] = {p: {"threshold": real[p].get("threshold"),
                                        **{f"{k}_{what}": v for k in ("pool", "test")
                                           for what, v in zip(("loss", "layer"), replay(tab[k], real[p]))}}
                                    for p in POLICIES}
        rules[rule] = out
        print(f"  {rule}: " + "  ".join(f"{p} {out[p]['p_both']:.2f}" for p in POLICIES), flush=True)
    accuracy = {k: {"full_depth": float((t.final_pred == t.labels).double().mean()),
                    "exits": [float(a) for a in (t.top == t.labels[:, None]).double().mean(0)]} for k, t in tab.items()}
    return {"dataset": name, "rows": {"train": len(train_rows), "dev": n_cal, "pool": len(pool), "test": len(test)},
            "lora_targets": list(lora.targets), "accuracy": accuracy, "rules": rules}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--datasets", default="sst2,agnews")
    p.add_argument("--max-train", default="2000,1000", help="as bench/early_exit.py [%(default)s]")
    p.add_argument("--max-pool", default="4227,3000", help="unused training rows read per data set [%(default)s]")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora-targets", help="comma-separated [the trainer's default]")
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--rules", default=RULES, help="MAX_DROP@CONFIDENCE,... [%(default)s]")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=RESULTS / "exit_calibration.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(None, device="cpu", dtype="float32")
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    sizes = [int(x) for x in args.max_train.split(",")]
    pools = [int(x) for x in args.max_pool.split(",")]
    t0 = time.perf_counter()
    results = [run_dataset(n, args, backbone, sizes[i % len(sizes)], pools[i % len(pools)]) for i, n in enumerate(names)]
    table = []
    for rule in args.rules.split(","):
        both = [res["rules"][rule][p]["p_both"] for res in results for p in POLICIES]
        table.append([rule, *both, statistics.mean(both),
                      *(res["rules"][rule]["confidence"]["p_loss_ok"] for res in results)])
    print(format_table(["bound@conf", *(f"{r['dataset'][:6]} {p[:4]}" for r in results for p in POLICIES), "mean",
                        *(f"{r['dataset'][:6]} conf loss ok" for r in results)], table,
                       title="P(loss <= 1 point and mean exit layer <= 3.5) on a fresh test-sized sample"))
    write_json(args.out, {
        "benchmark": "exit_calibration",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(backbone.device, backbone.dtype),
        "wall_s": time.perf_counter() - t0,
        "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
