"""The training targets judged on a mean over seeds instead of one draw.

    python bench/seed_spread.py            # reads bench/results/train_methods.json + train_defaults_cpu_sst2_*seed*.json

One seed on sst2's 872 test rows carries about +-1.1 points of standard error per accuracy, so a
gap to full fine-tuning measured once can pass or fail by a single row. This collects every run of
each method's default (`bench/train_methods.py`'s rows at seed 42, `bench/train_defaults.py
--seed S` re-runs) and reports, per method: test accuracy per seed, mean +- sample standard
deviation, the gap to full fine-tuning at the same seeds, and the issue's target on that gap (the
rule is in `bench/train_defaults.py`'s docstring, fixed before the re-runs). Writes
bench/results/seed_spread.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import RESULTS, write_json  # noqa: E402
from training.report import format_table  # noqa: E402

# Points below full fine-tuning each method may be on sst2 test (the training issue's targets).
TARGETS = {"lora": 1.0, "adapter": 2.0, "prefix": 2.0}


def collect(base: Path, reruns: list[Path], dataset: str) -> tuple[dict[str, str], dict[str, dict[int, float]]]:
    """The defaults (method -> candidate label, as `base` ran them) and their test accuracy per seed."""
    def rows(f: Path) -> list[dict]:
        return [r for r in json.loads(f.read_text())["results"] if "error" not in r and r["dataset"] == dataset]

    base_rows = rows(base)
    defaults = {r["method"]: r["candidate"] for r in base_rows}
    acc: dict[str, dict[int, float]] = {}
    for r in base_rows + [r for f in reruns for r in rows(f)]:
        if defaults.get(r["method"]) != r["candidate"]:
            continue  # another candidate of the method, not its default
        seed, test = r["hyperparameters"]["seed"], r["test"]["accuracy"]
        seen = acc.setdefault(r["method"], {})
        if seed in seen and seen[seed] != test:
            raise SystemExit(f"{r['method']} seed {seed}: two different runs ({seen[seed]} vs {test})")
        seen[seed] = test
    return defaults, acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=RESULTS / "train_methods.json", help="the seed-42 table's rows")
    p.add_argument("--reruns", type=Path, nargs="*", help="[bench/results/train_defaults_cpu_sst2_*seed*.json]")
    p.add_argument("--dataset", default="sst2")
    p.add_argument("--out", type=Path, default=RESULTS / "seed_spread.json")
    args = p.parse_args(argv)
    reruns = args.reruns if args.reruns is not None else sorted(RESULTS.glob(f"train_defaults_cpu_{args.dataset}_*seed*.json"))
    defaults, acc = collect(args.base, reruns, args.dataset)
    if "full" not in acc:
        raise SystemExit("no full fine-tuning rows: nothing to measure the gaps against")
    seeds = sorted({s for per in acc.values() for s in per})
    full = acc["full"]
    out, table = {}, []
    for method, per in acc.items():
        paired = [s for s in per if s in full]  # the gap compares like with like: full at the same seeds
        if not paired:
            raise SystemExit(f"{method}: no run at a seed full fine-tuning also ran")
        vals = list(per.values())
        mean = statistics.mean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        gap = 100 * (statistics.mean(per[s] for s in paired) - statistics.mean(full[s] for s in paired))
        target = TARGETS.get(method)
        verdict = "" if target is None or method == "full" else ("PASS" if gap >= -target else "FAIL")
        out[method] = {"candidate": defaults[method], "test_accuracy": per, "mean": mean, "std": std,
                       "mean_minus_full_points": gap, "target_points": target, "verdict": verdict or None}
        table.append([method, defaults[method], *(f"{per[s]:.4f}" if s in per else "-" for s in seeds),
                      f"{mean:.4f} +- {std:.4f}", "-" if method == "full" else f"{gap:+.2f}",
                      "" if target is None or method == "full" else f">= -{target:g}", verdict])
    print(format_table(["method", "default", *(f"seed {s}" for s in seeds), "mean +- std", "vs full", "target", ""],
                       table, title=f"{args.dataset} test accuracy per seed"))
    write_json(args.out, {"benchmark": "seed_spread", "dataset": args.dataset, "seeds": seeds,
                          "files": [str(args.base), *map(str, reruns)], "methods": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
