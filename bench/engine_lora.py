"""Mixed-task LoRA batches on the real MiniLM backbone: adaptserve vs the bare backbone vs HF PEFT.

    /work/venv/bin/python bench/engine_lora.py      # CPU fp32: ~1.5 min on 2 idle cores, 5-10 min on a busy shared box
    /work/venv/bin/python bench/engine_lora.py --quick              # smoke run
    python bench/engine_lora.py --device cuda --dtype bfloat16      # GPU run

Every throughput variant below processes the same 32 rows of 64 tokens (batch 32, right-padded),
timed side by side (round-robin, median of --repeats rounds):

  base          our encoder with an empty Plan + one head (all 32 rows one head-only task)
  base_32heads  our encoder, empty Plan, 32 head-only tasks (the head grouping cost alone)
  hf_bert       HF BertModel forward (sdpa attention) incl. pooler: the library's own base speed
  ours_qv       Engine.logits, 32 rows from 32 LoRA tasks (r=8 on query,value), pre-tokenised
  ours_qv_tok   Engine.classify on the same rows: tokenisation + softmax + Prediction objects
  ours_all6     Engine.logits, 32 tasks with LoRA on all six linears, ranks 4/8/16 mixed
  peft_mixed    HF PEFT, same 32 adapters, one forward with adapter_names=[one per row]
  peft_mixed_all6   the same for the all-six-sites tasks
  peft_serial   HF PEFT, per row: set_adapter(name) + batch-1 forward (64 tokens), 32 times
  peft_serial_trim  the same, each row at its own length (no padding): what a per-request server runs

plus cold task loads (Engine.load_task from the published store; p50/p95 over distinct tasks).
Before timing, the logits of ours, PEFT mixed and PEFT serial are checked against each other.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    RESULTS, TOLERANCE, check, count_ops, default_rounds, environment, interleaved, parser, percentile, setup_torch, sync, table, texts, write_json,
)

import torch  # noqa: E402

from service.engine.backbone import load_backbone  # noqa: E402
from service.engine.encoder import Plan  # noqa: E402
from service.engine.engine import Batch, Engine  # noqa: E402
from service.engine.families import SITES  # noqa: E402
from service.engine.types import ClassifyItem, TaskKey  # noqa: E402
from tests.factories import publish, random_head, random_lora  # noqa: E402

LABELS = ["neg", "pos"]
# Targets from the acceptance criteria.
TARGET_VS_BASE = 0.9
TARGET_VS_PEFT_MIXED = 1.05
TARGET_VS_PEFT_SERIAL = 2.4
TARGET_COLD_P50_MS = 20.0


def publish_lora_tasks(store: Path, engine: Engine, prefix: str, n: int, ranks, sites, seed: int):
    """Publish n LoRA + pooler-head tasks; returns [(name, bundle_dir, lora, head)]."""
    info = engine.backbone.info
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        lora = random_lora(info, g, r=r, sites=sites)
        head = random_head(info, g, labels=len(LABELS), pooling="pooler")
        name = f"{prefix}-{i:03d}"
        v = publish(store, name, {"lora": lora, "head": head}, LABELS, max_length=64, fingerprint=info.fingerprint)
        out.append((name, store / name / v, lora, head))
    return out


def load(engine: Engine, published):
    return [engine.load_task(d, TaskKey(name, d.name)) for name, d, _, _ in published]


def batch_of(engine: Engine, items: list[ClassifyItem], seq_len: int) -> Batch:
    b = engine.tokenize(items)
    if b.input_ids.shape[1] != seq_len:
        raise AssertionError(f"expected rows padded to {seq_len} tokens, got {b.input_ids.shape[1]}")
    return b


def main() -> None:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--cold-loads", type=int, default=50)
    args = ap.parse_args()
    setup_torch(args)
    B, T = args.batch, args.seq_len

    bb = load_backbone(None, device=args.device, dtype=args.dtype)
    dev, dt = bb.device, bb.dtype
    rounds = default_rounds(args, dev, cpu=11)
    engine = Engine(bb)
    env = environment(dev, dt)
    print(f"# engine_lora: {env}")
    print(f"# batch {B} x {T} tokens, {rounds} interleaved rounds (median)")

    tmp = tempfile.TemporaryDirectory(prefix="adaptserve-bench-")
    store = Path(tmp.name)
    t0 = time.perf_counter()
    n_qv = max(B, args.cold_loads)
    pub_qv = publish_lora_tasks(store, engine, "qv", n_qv, ranks=(8,), sites=("query", "value"), seed=1)
    pub_all6 = publish_lora_tasks(store, engine, "all6", B, ranks=(4, 8, 16), sites=SITES, seed=2)
    g = torch.Generator().manual_seed(3)
    head_only = []
    for i in range(B):
        name = f"head-{i:03d}"
        v = publish(store, name, {"head": random_head(bb.info, g, labels=2, pooling="pooler")}, LABELS, max_length=64,
                    fingerprint=bb.info.fingerprint)
        head_only.append(engine.load_task(store / name / v, TaskKey(name, v)))
    tasks_qv = load(engine, pub_qv[:B])
    tasks_all6 = load(engine, pub_all6)
    print(f"# published + loaded {n_qv + 2 * B} tasks in {time.perf_counter() - t0:.1f}s")

    rows = texts(B, T, seed=0)
    items_qv = [ClassifyItem(tasks_qv[i], rows[i]) for i in range(B)]
    items_all6 = [ClassifyItem(tasks_all6[i], rows[i]) for i in range(B)]
    batch_qv = batch_of(engine, items_qv, T)
    batch_all6 = batch_of(engine, items_all6, T)
    batch_base = batch_of(engine, [ClassifyItem(head_only[0], r) for r in rows], T)
    batch_32heads = batch_of(engine, [ClassifyItem(head_only[i], rows[i]) for i in range(B)], T)
    assert torch.equal(batch_qv.input_ids, batch_base.input_ids)
    ids, mask, tt = batch_qv.input_ids, batch_qv.attention_mask, batch_qv.token_type_ids
    real_tokens = int(mask.sum())

    # -- HF PEFT over the same weights -------------------------------------------------------
    from bench.peft_baseline import build_peft_lora

    t0 = time.perf_counter()
    pm_qv = build_peft_lora(bb, [(n, lw, hw) for (n, _, lw, hw) in pub_qv[:B]])
    names_qv = [n for n, *_ in pub_qv[:B]]
    with_all6 = not args.quick
    if with_all6:
        pm_all6 = build_peft_lora(bb, [(n, lw, hw) for (n, _, lw, hw) in pub_all6])
        names_all6 = [n for n, *_ in pub_all6]
    print(f"# built PEFT models in {time.perf_counter() - t0:.1f}s")

    def peft_mixed(pm, names):
        return pm(input_ids=ids, attention_mask=mask, token_type_ids=tt, adapter_names=names).logits

    def peft_serial(pm, names):
        out = []
        for i, name in enumerate(names):
            pm.set_adapter(name, inference_mode=True)
            out.append(pm(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], token_type_ids=tt[i : i + 1]).logits)
        return torch.cat(out)

    lengths = mask.sum(dim=1).tolist()

    def peft_serial_trim(pm, names):
        """What a per-request server really runs: each row at its own length, no padding."""
        out = []
        for i, name in enumerate(names):
            n = lengths[i]
            pm.set_adapter(name, inference_mode=True)
            out.append(pm(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n], token_type_ids=tt[i : i + 1, :n]).logits)
        return torch.cat(out)

    def ours(batch):
        return engine.logits(batch)

    def base_ours():
        return engine.logits(batch_base)

    def base_encoder_only():
        with torch.inference_mode():
            return bb.encoder.forward(ids, mask, tt, Plan()).hidden

    def hf_bert():
        return bb.model(input_ids=ids, attention_mask=mask, token_type_ids=tt)

    # -- correctness before speed --------------------------------------------------------------
    correctness = {}
    tol = TOLERANCE[dt]
    with torch.inference_mode():
        z_ours = torch.stack(ours(batch_qv))
        z_mixed = peft_mixed(pm_qv, names_qv).float().cpu()
        z_serial = peft_serial(pm_qv, names_qv).float().cpu()
        z_trim = peft_serial_trim(pm_qv, names_qv).float().cpu()
        z_base32 = torch.stack(engine.logits(batch_32heads))
        alone = torch.stack([engine.logits(batch_of_row(engine, items_qv[i], batch_qv, i))[0] for i in range(B)])
        # HF's hidden states vs our encoder's, no tasks
        h_hf = bb.model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state.float()
        h_ours = base_encoder_only().float()
        m = mask.bool()
        correctness["qv"] = {
            "ours_vs_peft_mixed_max_abs": float((z_ours - z_mixed).abs().max()),
            "ours_vs_peft_serial_max_abs": float((z_ours - z_serial).abs().max()),
            "peft_mixed_vs_peft_serial_max_abs": float((z_mixed - z_serial).abs().max()),
            "peft_serial_padded_vs_trimmed_max_abs": float((z_serial - z_trim).abs().max()),
            "ours_mixed_vs_ours_alone_max_abs": float((z_ours - alone).abs().max()),
            "lora_effect_vs_head_only_max_abs": float((z_ours - z_base32).abs().max()),
            "encoder_vs_hf_hidden_max_abs_real_tokens": float((h_hf[m] - h_ours[m]).abs().max()),
        }
        if with_all6:
            z6 = torch.stack(ours(batch_all6))
            z6_peft = peft_mixed(pm_all6, names_all6).float().cpu()
            correctness["all6"] = {"ours_vs_peft_mixed_max_abs": float((z6 - z6_peft).abs().max())}
    worst = max(v for d in correctness.values() for k, v in d.items() if k != "lora_effect_vs_head_only_max_abs")
    correctness["tolerance"] = tol
    correctness["ok"] = bool(worst <= tol and correctness["qv"]["lora_effect_vs_head_only_max_abs"] > tol)
    print(f"# correctness (max |logit diff|, tol {tol:g}): {correctness}")

    # -- throughput, interleaved ---------------------------------------------------------------
    variants = {
        "base": base_ours,
        "base_32heads": lambda: engine.logits(batch_32heads),
        "hf_bert": hf_bert,
        "ours_qv": lambda: ours(batch_qv),
        "ours_qv_tok": lambda: engine.classify(items_qv),
        "peft_mixed": lambda: peft_mixed(pm_qv, names_qv),
        "peft_serial": lambda: peft_serial(pm_qv, names_qv),
        "peft_serial_trim": lambda: peft_serial_trim(pm_qv, names_qv),
    }
    if with_all6:
        variants["ours_all6"] = lambda: ours(batch_all6)
        variants["peft_mixed_all6"] = lambda: peft_mixed(pm_all6, names_all6)
    t0 = time.perf_counter()
    with torch.inference_mode():  # warm-up call + op census (deterministic; see harness.count_ops)
        ops = {k: sum(count_ops(f).values()) for k, f in variants.items()}
    with torch.inference_mode():
        tm = interleaved(variants, rounds, dev, warmup=1 if args.quick else 2)
    print(f"# timed {len(variants)} variants x {rounds} rounds in {time.perf_counter() - t0:.1f}s")
    res = {k: tm.summary(k, B, base="base") for k in variants}
    print()
    table(tm.rows(list(variants), B, "base", ops), tm.HEADER)
    print(tm.LEGEND)

    # -- Engine.plan alone (slot-pool lookups and row maps) ---------------------------------------
    plan_ms = {}
    for label, batch in (("qv", batch_qv), ("all6", batch_all6)):
        samples = []
        for _ in range(max(3, rounds)):
            sync(dev)
            t0 = time.perf_counter()
            with torch.inference_mode():
                plan, _ = engine.plan(batch.tasks, batch.row_part)
                for mb in plan.batches:  # training-path tables are built lazily: force them (the serving pool has none)
                    if not hasattr(mb, "_table"):
                        continue
                    for layer in range(bb.info.num_layers):
                        for site in SITES:
                            mb._table((layer, site))
            sync(dev)
            samples.append(time.perf_counter() - t0)
        plan_ms[label] = 1e3 * sorted(samples)[len(samples) // 2]
    print(f"\n# Engine.plan per batch (slot-pool lookups and row maps; part of ours_*): qv {plan_ms['qv']:.2f} ms, all6 {plan_ms['all6']:.2f} ms")

    # -- cold task loads ------------------------------------------------------------------------
    engine.load_task(pub_all6[0][1], TaskKey("warm", "0"))  # first-call imports out of the way
    cold = {}
    for label, pub in (("qv_r8", pub_qv[: args.cold_loads]), ("all6_r4-16", pub_all6)):
        ms = []
        for name, d, _, _ in pub:
            sync(dev)
            t0 = time.perf_counter()
            engine.load_task(d, TaskKey(name, d.name))
            sync(dev)
            ms.append(1e3 * (time.perf_counter() - t0))
        cold[label] = {"n": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "max_ms": max(ms),
                       "bundle_bytes": sum(p.stat().st_size for p in pub[0][1].iterdir())}
        print(f"# cold load {label}: n={len(ms)} p50 {cold[label]['p50_ms']:.2f} ms, p95 {cold[label]['p95_ms']:.2f} ms"
              f" (bundle {cold[label]['bundle_bytes']} B; files just written, so the OS page cache is warm)")

    # -- targets ------------------------------------------------------------------------------
    print()
    sps = {k: r["seq_per_s"] for k, r in res.items()}

    def vs(a: str, b: str) -> tuple[float, str]:
        """Speed of a relative to b: ratio of medians (decides), with paired and best-of for context."""
        r = tm.median(b) / tm.median(a)
        best = min(tm.seconds[b]) / min(tm.seconds[a])
        cpu = statistics.median(tm.cpu[b]) / statistics.median(tm.cpu[a])
        return r, f"{r:.3f}x (paired {tm.paired_ratio(a, b):.3f}x, best-of {best:.3f}x, cpu {cpu:.3f}x)"

    checks = []
    for a, b, target in (("ours_qv", "base", TARGET_VS_BASE), ("ours_qv", "peft_mixed", TARGET_VS_PEFT_MIXED),
                         ("ours_qv", "peft_serial", TARGET_VS_PEFT_SERIAL)):
        r, detail = vs(a, b)
        checks.append(check(f"{a} >= {target}x {b}", r >= target, detail))
    checks += [
        check("cold load p50 <= 20 ms", cold["qv_r8"]["p50_ms"] <= TARGET_COLD_P50_MS, f"{cold['qv_r8']['p50_ms']:.2f} ms"),
        check("logits agree (ours / PEFT mixed / PEFT serial / alone)", correctness["ok"], f"worst {worst:.2e}"),
    ]
    info_ratios = {
        "ours_qv_vs_hf_bert": sps["ours_qv"] / sps["hf_bert"],
        "ours_qv_tok_vs_base": sps["ours_qv_tok"] / sps["base"],
        "base_32heads_vs_base": sps["base_32heads"] / sps["base"],
        "hf_bert_vs_base": sps["hf_bert"] / sps["base"],
        "peft_mixed_vs_base": sps["peft_mixed"] / sps["base"],
        "peft_serial_vs_base": sps["peft_serial"] / sps["base"],
        "ours_qv_vs_peft_serial_trim": sps["ours_qv"] / sps["peft_serial_trim"],
    }
    if with_all6:
        info_ratios["ours_all6_vs_base"] = sps["ours_all6"] / sps["base"]
        info_ratios["ours_all6_vs_peft_mixed_all6"] = sps["ours_all6"] / sps["peft_mixed_all6"]
    for k, v in info_ratios.items():
        print(f"info  {k}: {v:.3f}x")

    write_json(args.out or RESULTS / "engine_lora.json", {
        "benchmark": "engine_lora",
        "environment": env,
        "config": {"batch": B, "seq_len": T, "real_tokens": real_tokens, "rounds": rounds, "quick": args.quick,
                   "lora_qv": {"r": 8, "alpha": 16, "sites": ["query", "value"]},
                   "lora_all6": {"r": [4, 8, 16], "sites": list(SITES)},
                   "head": {"pooling": "pooler", "labels": len(LABELS)},
                   "peft": {"autocast_adapter_dtype": False, "lora_dropout": 0.0}},
        "correctness": correctness,
        "throughput": res,
        "aten_ops_per_call": ops,
        "raw_seconds": tm.seconds,
        "raw_cpu_seconds": tm.cpu,
        "slot_table_build_ms": plan_ms,
        "cold_load": cold,
        "ratios": info_ratios,
        "targets": checks,
    })
    tmp.cleanup()


def batch_of_row(engine: Engine, item: ClassifyItem, full: Batch, i: int) -> Batch:
    """Row i of a pre-tokenised batch as a batch of one (same 64 padded tokens)."""
    return Batch(full.input_ids[i : i + 1], full.attention_mask[i : i + 1],
                 None if full.token_type_ids is None else full.token_type_ids[i : i + 1], [item.task],
                 torch.zeros(1, dtype=torch.long, device=full.input_ids.device))


if __name__ == "__main__":
    main()
