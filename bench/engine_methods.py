"""Every method through one engine on the real MiniLM backbone: 32-row batches of one method each,
and one batch mixing all four, against the bare backbone.

    /work/venv/bin/python bench/engine_methods.py   # CPU fp32: ~1.5 min on 2 idle cores, 5-10 min on a busy shared box
    /work/venv/bin/python bench/engine_methods.py --quick
    /work/venv/bin/python bench/engine_methods.py --small-batch-tokens 0   # without the CPU small-batch weight copy
    python bench/engine_methods.py --device cuda --dtype bfloat16

Variants (batch 32, rows of 64 tokens after padding, Engine.logits on a pre-tokenised Batch,
timed side by side, round-robin, median of --repeats rounds):

  base              our encoder, no task methods, one head (all rows one head-only task)
  base_32heads      no task methods, 32 head-only tasks (the per-task head cost alone)
  lora              32 tasks, LoRA r=8 on query,value
  adapter_pfeiffer  32 tasks, bottleneck adapter after the FFN, reduction factor 16 (bottleneck 24)
  adapter_houlsby   32 tasks, adapters after attention and FFN, reduction factor 16
  prefix            32 tasks, prefix tuning, P = 10..20 virtual tokens varying per task
  prompt            32 tasks, soft prompt, P = 10..20 varying per task
  mixed             8 tasks of each method (adapters half Pfeiffer, half Houlsby), rows shuffled

Virtual tokens lengthen the work: a soft prompt makes every row 64 + Pmax positions long, a
prefix adds Pmax keys/values per layer. That is inherent to those methods, not overhead.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import RESULTS, TOLERANCE, check, count_ops, default_rounds, environment, interleaved, parser, setup_torch, table, texts, write_json  # noqa: E402

import torch  # noqa: E402

from service.engine.backbone import SMALL_BATCH_TOKENS, load_backbone  # noqa: E402
from service.engine.engine import Batch, Engine  # noqa: E402
from service.engine.types import ClassifyItem, TaskKey  # noqa: E402
from tests.factories import publish, random_adapter, random_head, random_lora, random_prefix, random_prompt  # noqa: E402

LABELS = ["neg", "pos"]
REDUCTION = 16  # Pfeiffer et al. (2021) / AdapterHub default reduction factor
P_RANGE = (10, 20)
# Targets from the issue.
TARGET_MIXED = 0.75
TARGET_LORA_ADAPTER = 0.85
METHOD_VARIANTS = ("lora", "adapter_pfeiffer", "adapter_houlsby", "prefix", "prompt")


def method_weights(variant: str, info, g: torch.Generator, i: int):
    """Task i's weights for one benchmark variant: (method name, TaskWeights)."""
    p = P_RANGE[0] + i % (P_RANGE[1] - P_RANGE[0] + 1)
    if variant == "lora":
        return "lora", random_lora(info, g, r=8, sites=("query", "value"))
    if variant.startswith("adapter_"):
        return "adapter", random_adapter(info, g, kind=variant.split("_")[1], bottleneck=info.hidden_size // REDUCTION)
    if variant == "prefix":
        return "prefix", random_prefix(info, g, p=p)
    if variant == "prompt":
        return "prompt", random_prompt(info, g, p=p)
    raise ValueError(variant)


def main() -> None:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--small-batch-tokens", type=int, default=SMALL_BATCH_TOKENS,
                    help="load_backbone's CPU small-batch layout threshold (0: none; docs/architecture.md)")
    args = ap.parse_args()
    setup_torch(args)
    B, T = args.batch, args.seq_len

    bb = load_backbone(None, device=args.device, dtype=args.dtype, small_batch_tokens=args.small_batch_tokens)
    dev, dt, info = bb.device, bb.dtype, bb.info
    rounds = default_rounds(args, dev, cpu=11)
    engine = Engine(bb)
    env = environment(dev, dt)
    print(f"# engine_methods: {env}")
    print(f"# batch {B} x {T} tokens, {rounds} interleaved rounds (median)")

    tmp = tempfile.TemporaryDirectory(prefix="adaptserve-bench-")
    store = Path(tmp.name)
    g = torch.Generator().manual_seed(0)

    def publish_load(name: str, weights: dict):
        v = publish(store, name, weights, LABELS, max_length=T, fingerprint=info.fingerprint)
        return engine.load_task(store / name / v, TaskKey(name, v)), store / name / v

    t0 = time.perf_counter()
    tasks: dict[str, list] = {}
    stats: dict[str, dict] = {}
    for variant in METHOD_VARIANTS:
        tasks[variant] = []
        per = []
        for i in range(B):
            m, w = method_weights(variant, info, g, i)
            task, d = publish_load(f"{variant}-{i:03d}", {m: w, "head": random_head(info, g, labels=2, pooling="pooler")})
            tw = task.weights[m]  # as parsed back from the bundle
            per.append((tw.trainable_params(), tw.nbytes(), task.bytes_on_disk, getattr(tw, "num_virtual_tokens", None)))
            tasks[variant].append(task)
        params = sorted(x[0] for x in per)
        stats[variant] = {
            "trainable_params_min": params[0], "trainable_params_max": params[-1],
            "pct_of_backbone_max": 100.0 * params[-1] / info.num_params,
            "nbytes_min": min(x[1] for x in per), "nbytes_max": max(x[1] for x in per),
            "bundle_bytes_on_disk_min": min(x[2] for x in per), "bundle_bytes_on_disk_max": max(x[2] for x in per),
            "virtual_tokens": sorted({x[3] for x in per}) if per[0][3] is not None else None,
        }
    head_only = [publish_load(f"head-{i:03d}", {"head": random_head(info, g, labels=2, pooling="pooler")})[0] for i in range(B)]
    hw = head_only[0].weights["head"]
    stats["head (each task)"] = {"trainable_params_min": hw.trainable_params(), "trainable_params_max": hw.trainable_params(),
                                 "pct_of_backbone_max": 100.0 * hw.trainable_params() / info.num_params,
                                 "nbytes_min": hw.nbytes(), "nbytes_max": hw.nbytes(),
                                 "bundle_bytes_on_disk_min": head_only[0].bytes_on_disk,
                                 "bundle_bytes_on_disk_max": head_only[0].bytes_on_disk, "virtual_tokens": None}
    # mixed: 8 tasks of each method (adapters: 4 Pfeiffer + 4 Houlsby), rows shuffled
    per_method = B // 4
    mixed = (tasks["lora"][:per_method] + tasks["adapter_pfeiffer"][: per_method // 2]
             + tasks["adapter_houlsby"][: per_method - per_method // 2] + tasks["prefix"][:per_method] + tasks["prompt"][:per_method])
    order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(1)).tolist()
    tasks["mixed"] = [mixed[k] for k in order]
    print(f"# published + loaded {len(METHOD_VARIANTS) * B + B} tasks in {time.perf_counter() - t0:.1f}s")

    rows = texts(B, T, seed=0)
    batches: dict[str, Batch] = {
        "base": engine.tokenize([ClassifyItem(head_only[0], r) for r in rows]),
        "base_32heads": engine.tokenize([ClassifyItem(head_only[i], rows[i]) for i in range(B)]),
    }
    items: dict[str, list[ClassifyItem]] = {}
    for v in (*METHOD_VARIANTS, "mixed"):
        items[v] = [ClassifyItem(tasks[v][i], rows[i]) for i in range(B)]
        batches[v] = engine.tokenize(items[v])
    for k, b in batches.items():
        if b.input_ids.shape[1] != T:
            raise AssertionError(f"{k}: expected rows padded to {T} tokens, got {b.input_ids.shape[1]}")

    # -- correctness: each row of a mixed batch == that row alone; methods change the output ----
    tol = TOLERANCE[dt]
    correctness: dict[str, float | bool] = {}
    with torch.inference_mode():
        base32 = torch.stack(engine.logits(batches["base_32heads"]))
        z_mixed = torch.stack(engine.logits(batches["mixed"]))
        mb = batches["mixed"]
        alone = torch.stack([
            engine.logits(Batch(mb.input_ids[i : i + 1], mb.attention_mask[i : i + 1],
                                None if mb.token_type_ids is None else mb.token_type_ids[i : i + 1],
                                [mb.tasks[int(mb.row_part[i])]], torch.zeros(1, dtype=torch.long, device=dev)))[0]
            for i in range(B)
        ])
        correctness["mixed_vs_alone_max_abs"] = float((z_mixed - alone).abs().max())
        # a same-head comparison needs the same head: re-run each method's batch with method weights stripped
        from service.engine.task import Task

        for v in METHOD_VARIANTS:
            b = batches[v]
            bare = [Task(key=TaskKey("bare", str(j)), spec=t.spec, weights={"head": t.weights["head"]}, backbone=t.backbone)
                    for j, t in enumerate(b.tasks)]
            z = torch.stack(engine.logits(b))
            z0 = torch.stack(engine.logits(Batch(b.input_ids, b.attention_mask, b.token_type_ids, bare, b.row_part)))
            # how far each row's logits move when its method's weights are removed (head kept)
            correctness[f"{v}_effect_mean_row_max_abs"] = float((z - z0).abs().max(dim=1).values.mean())
    correctness["tolerance"] = tol
    correctness["ok"] = bool(correctness["mixed_vs_alone_max_abs"] <= tol
                             and all(correctness[f"{v}_effect_mean_row_max_abs"] > tol for v in METHOD_VARIANTS))
    print(f"# correctness: {correctness}")
    del base32

    # -- throughput -------------------------------------------------------------------------
    names = ["base", "base_32heads", *METHOD_VARIANTS, "mixed"]
    variants = {k: (lambda b=batches[k]: engine.logits(b)) for k in names}
    t0 = time.perf_counter()
    with torch.inference_mode():  # warm-up call + op census (deterministic; see harness.count_ops)
        ops = {k: sum(count_ops(f).values()) for k, f in variants.items()}
    with torch.inference_mode():
        tm = interleaved(variants, rounds, dev, warmup=1 if args.quick else 2)
    print(f"# timed {len(variants)} variants x {rounds} rounds in {time.perf_counter() - t0:.1f}s\n")
    res = {k: tm.summary(k, B, base="base") for k in names}
    table(tm.rows(names, B, "base", ops), tm.HEADER)
    print(tm.LEGEND + "\n")

    prow = []
    for k, s in stats.items():
        rng = lambda a, b: f"{s[a]:,}" if s[a] == s[b] else f"{s[a]:,}-{s[b]:,}"  # noqa: E731
        prow.append((k, rng("trainable_params_min", "trainable_params_max"), f"{s['pct_of_backbone_max']:.3f}%",
                     rng("nbytes_min", "nbytes_max"), rng("bundle_bytes_on_disk_min", "bundle_bytes_on_disk_max"),
                     "-" if not s["virtual_tokens"] else f"{min(s['virtual_tokens'])}-{max(s['virtual_tokens'])}"))
    table(prow, ("method (per task)", "trainable params", "% backbone", "nbytes", "bundle bytes on disk*", "P"))
    print(f"(backbone: {info.num_params:,} params; *bundle = method + head + config JSON; nbytes in {str(dt).replace('torch.', '')})\n")

    checks = []
    for k, target in [("mixed", TARGET_MIXED)] + [(v, TARGET_LORA_ADAPTER) for v in ("lora", "adapter_pfeiffer", "adapter_houlsby")]:
        r = res[k]
        checks.append(check(f"{k} >= {target}x base", r["ratio_to_base"] >= target,
                            f"{r['ratio_to_base']:.3f}x (paired {r['ratio_to_base_paired']:.3f}x, best-of {r['ratio_to_base_best']:.3f}x, "
                            f"cpu {r['ratio_to_base_cpu']:.3f}x)"))
    checks.append(check("mixed rows == rows alone, every method changes logits", correctness["ok"],
                        f"worst {correctness['mixed_vs_alone_max_abs']:.2e}"))

    write_json(args.out or RESULTS / "engine_methods.json", {
        "benchmark": "engine_methods",
        "environment": env,
        "config": {"small_batch_tokens": args.small_batch_tokens, "batch": B, "seq_len": T, "rounds": rounds, "quick": args.quick, "reduction_factor": REDUCTION,
                   "virtual_tokens": list(P_RANGE), "lora": {"r": 8, "alpha": 16, "sites": ["query", "value"]},
                   "head": {"pooling": "pooler", "labels": len(LABELS)}, "backbone_params": info.num_params},
        "correctness": correctness,
        "throughput": res,
        "aten_ops_per_call": ops,
        "raw_seconds": tm.seconds,
        "raw_cpu_seconds": tm.cpu,
        "method_sizes": stats,
        "targets": checks,
    })
    tmp.cleanup()


if __name__ == "__main__":
    main()
