"""Where a mixed batch's time goes beyond the bare backbone: component timings, best of many.

    /work/venv/bin/python bench/breakdown.py [--repeats N] [--threads N]

Whole-forward medians on a shared 2-core machine swing by 2-4x with other tenants' load, so
this times the *pieces* instead, each many times, interleaved, and reports the fastest run of
each (the least-disturbed one), as a fraction of the bare encoder forward:

  encoder            our encoder, empty Plan (the base forward without the head)
  lora_deltas_qv     encoder with 32 tasks' LoRA on query,value (tables prebuilt) minus encoder
  slot_build_qv      building those tables for one batch (`slots.build`: stack + pad + scale)
  head_32_vs_1       HeadBatch.logits for 32 tasks vs 1 task (pooler pooling)
  head_32_prefix     HeadBatch.logits for 32 prefix tasks: per task, `select` on every method batch
  ...                and the same pieces for the prototype in bench/proto_engine.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import RESULTS, default_rounds, environment, interleaved, parser, setup_torch, table, texts, write_json  # noqa: E402
from bench.proto_engine import FastHeadBatch, FusedEncoder, FusedLoraBatch, LoraPool, PooledLoraBatch  # noqa: E402

import torch  # noqa: E402

from service.engine.backbone import load_backbone  # noqa: E402
from service.engine.encoder import Plan  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.families import SITES  # noqa: E402
from service.engine.types import ClassifyItem, TaskKey  # noqa: E402
from service.methods.base import REGISTRY  # noqa: E402
from service.methods.head import HeadBatch  # noqa: E402
from tests.factories import publish, random_head, random_lora, random_prefix, random_prompt  # noqa: E402


def main() -> None:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="regex: time only the pieces whose name matches (encoder always)")
    args = ap.parse_args()
    setup_torch(args)
    B, T = args.batch, args.seq_len
    bb = load_backbone(None, device=args.device, dtype=args.dtype)
    rounds = default_rounds(args, bb.device, cpu=15)
    info, dev = bb.info, bb.device
    engine = Engine(bb)
    env = environment(dev, bb.dtype)
    print(f"# breakdown: {env}\n# batch {B} x {T}, best of {rounds} interleaved rounds")
    store = Path(tempfile.mkdtemp(prefix="adaptserve-breakdown-"))
    g = torch.Generator().manual_seed(0)

    def mk(name, w):
        v = publish(store, name, w, ["neg", "pos"], max_length=T, fingerprint=info.fingerprint)
        return engine.load_task(store / name / v, TaskKey(name, v))

    head = lambda: random_head(info, g, labels=2, pooling="pooler")  # noqa: E731
    t_head = mk("head", {"head": head()})
    t_qv = [mk(f"qv-{i}", {"lora": random_lora(info, g, r=8), "head": head()}) for i in range(B)]
    t_all6 = [mk(f"all6-{i}", {"lora": random_lora(info, g, r=(4, 8, 16)[i % 3], sites=SITES), "head": head()}) for i in range(B)]
    t_prefix = [mk(f"prefix-{i}", {"prefix": random_prefix(info, g, p=10 + i % 11), "head": head()}) for i in range(B)]
    t_prompt = [mk(f"prompt-{i}", {"prompt": random_prompt(info, g, p=10 + i % 11), "head": head()}) for i in range(B)]
    rows = texts(B, T, seed=0)
    b_qv = engine.tokenize([ClassifyItem(t_qv[i], rows[i]) for i in range(B)])
    ids, mask, tt = b_qv.input_ids, b_qv.attention_mask, b_qv.token_type_ids
    rp = b_qv.row_part

    def method_batch(name, tasks):
        return REGISTRY[name].batch([t.weights.get(name) for t in tasks], rp)

    def built(mb):
        for layer in range(info.num_layers):
            for site in SITES:
                mb._table((layer, site))
        return mb

    pool_ = LoraPool(bb, capacity=2 * B, r_max=16)
    for t in t_qv + t_all6:
        pool_.add(t.weights["lora"])
    fused_enc = FusedEncoder(bb.family)
    plans = {
        "qv": Plan((built(method_batch("lora", t_qv)),)),
        "all6": Plan((built(method_batch("lora", t_all6)),)),
        "qv_fused": Plan((built(FusedLoraBatch([t.weights["lora"] for t in t_qv], rp)),)),
        "all6_fused": Plan((built(FusedLoraBatch([t.weights["lora"] for t in t_all6], rp)),)),
        "qv_pool": Plan((PooledLoraBatch(pool_, [t.weights["lora"] for t in t_qv], rp),)),
        "all6_pool": Plan((PooledLoraBatch(pool_, [t.weights["lora"] for t in t_all6], rp),)),
        "prefix": Plan((method_batch("prefix", t_prefix),)),
        "prompt": Plan((method_batch("prompt", t_prompt),)),
    }
    with torch.inference_mode():
        st = bb.encoder.forward(ids, mask, tt, Plan())
        st_pre = bb.encoder.forward(ids, mask, tt, plans["prefix"])
        st_pro = bb.encoder.forward(ids, mask, tt, plans["prompt"])
    pooler = bb.family.pooler

    def heads(tasks):
        return [t.weights["head"] for t in tasks]

    def head_call(cls, tasks, state, row_part):
        hb = cls(heads(tasks), row_part)
        return lambda: hb.logits(state.hidden, state.keep, state.text_start, state.text_len, pooler, state.plan)

    one = torch.zeros(B, dtype=torch.long, device=dev)
    V = {
        "encoder": lambda: bb.encoder.forward(ids, mask, tt, Plan()),
        "enc+lora_qv": lambda: bb.encoder.forward(ids, mask, tt, plans["qv"]),
        "enc+lora_qv fused": lambda: fused_enc.forward(ids, mask, tt, plans["qv_fused"]),
        "enc+lora_qv pool": lambda: fused_enc.forward(ids, mask, tt, plans["qv_pool"]),
        "enc+lora_all6": lambda: bb.encoder.forward(ids, mask, tt, plans["all6"]),
        "enc+lora_all6 fused": lambda: fused_enc.forward(ids, mask, tt, plans["all6_fused"]),
        "enc+lora_all6 pool": lambda: fused_enc.forward(ids, mask, tt, plans["all6_pool"]),
        "enc+prefix": lambda: bb.encoder.forward(ids, mask, tt, plans["prefix"]),
        "enc+prompt": lambda: bb.encoder.forward(ids, mask, tt, plans["prompt"]),
        "slot_build qv": lambda: built(method_batch("lora", t_qv)),
        "slot_build all6": lambda: built(method_batch("lora", t_all6)),
        "pool rows qv": lambda: PooledLoraBatch(pool_, [t.weights["lora"] for t in t_qv], rp),
        "head 1 task": head_call(HeadBatch, [t_head], st, one),
        "head 32 tasks": head_call(HeadBatch, t_qv, st, rp),
        "head 32 prefix tasks": head_call(HeadBatch, t_prefix, st_pre, rp),
        "head 32 prompt tasks": head_call(HeadBatch, t_prompt, st_pro, rp),
        "fast head 32 tasks": head_call(FastHeadBatch, t_qv, st, rp),
        "fast head 32 prefix": head_call(FastHeadBatch, t_prefix, st_pre, rp),
        "fast head 32 prompt": head_call(FastHeadBatch, t_prompt, st_pro, rp),
    }
    if args.only:
        import re

        V = {k: f for k, f in V.items() if k == "encoder" or re.search(args.only, k)}
    t0 = time.perf_counter()
    with torch.inference_mode():
        tm = interleaved(V, rounds, dev, warmup=1)
    print(f"# timed {len(V)} pieces x {rounds} rounds in {time.perf_counter() - t0:.0f}s\n")
    best = {k: min(v) for k, v in tm.seconds.items()}
    enc = best["encoder"]
    out = []
    for k in V:
        extra = best[k] - enc if k.startswith("enc+") else best[k]
        out.append((k, f"{1e3 * best[k]:.2f}", f"{1e3 * tm.median(k):.2f}", f"{1e3 * extra:+.2f}" if k.startswith("enc+") else "",
                    f"{100 * extra / enc:.1f}%"))
    table(out, ("piece", "best ms", "median ms", "vs encoder ms", "% of encoder"))
    write_json(args.out or RESULTS / "breakdown.json", {
        "benchmark": "breakdown", "environment": env, "config": {"batch": B, "seq_len": T, "rounds": rounds},
        "best_s": best, "median_s": {k: tm.median(k) for k in V}, "raw_seconds": tm.seconds,
    })


if __name__ == "__main__":
    main()
