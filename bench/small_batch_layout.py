"""The CPU small-batch weight layout (`SmallBatchLinear`) against PyTorch's own, side by side.

    /work/venv/bin/python bench/small_batch_layout.py              # ~3 min on 1 idle core
    /work/venv/bin/python bench/small_batch_layout.py --quick

Two engines over one loaded MiniLM (the same Parameters): `pytorch` runs every layer linear as
`F.linear` on the [out, in] weight; `small-batch` is what `load_backbone` builds on a CPU, where
inputs of at most `SMALL_BATCH_TOKENS` tokens use an input-major copy of the weight. Workloads:
the chaos harness's tasks (random LoRA r=4 on query/value + head, 3-16 word texts) at 1-32 rows
per batch, each call a fixed set of different batches; and 32 x 64-token batches of LoRA r=8, of
Houlsby adapters and of every method mixed (`bench/engine_methods.py`'s tasks), which are over the
threshold: both layouts run the same `F.linear` there, so their ratio is the machine's spread. One torch thread by
default (a serving replica's forward thread on a CPU). Printed: per workload the median ms per
forward of each layout and their paired ratio (pytorch time / small-batch time per round: > 1
means the small-batch layout is faster), and the largest logit difference between the layouts.
"""
from __future__ import annotations

import dataclasses
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chaos import _texts as chaos_texts  # noqa: E402  (the texts the chaos load sends)
from bench.engine_methods import METHOD_VARIANTS, method_weights  # noqa: E402
from bench.harness import RESULTS, TOLERANCE, check, default_rounds, environment, interleaved, parser, setup_torch, table, texts, write_json  # noqa: E402

import torch  # noqa: E402

from service.engine.backbone import SMALL_BATCH_TOKENS, load_backbone  # noqa: E402
from service.engine.encoder import Encoder  # noqa: E402
from service.engine.engine import Batch, Engine  # noqa: E402
from service.engine.families import SmallBatchLinear, family_of  # noqa: E402
from service.engine.types import ClassifyItem, TaskKey  # noqa: E402
from tests.factories import publish, random_adapter, random_head, random_lora  # noqa: E402

SHORT_ROWS = (1, 2, 3, 4, 8, 16, 32)
BATCHES_PER_CALL = 12  # different batches per timed call, so one call is not one lucky shape


def main() -> None:
    ap = parser(__doc__.split("\n")[0])
    ap.set_defaults(threads=1)
    args = ap.parse_args()
    setup_torch(args)
    if torch.device(args.device).type != "cpu" or args.dtype != "float32":
        ap.error("the small-batch layout is a CPU float32 path: run with --device cpu --dtype float32")

    bb = load_backbone(None, device="cpu", dtype="float32")
    if not isinstance(bb.family.layers[0].query, SmallBatchLinear):
        raise SystemExit("load_backbone did not build the small-batch layout on this CPU")
    plain_family = family_of(bb.model)  # the Hugging Face modules themselves: F.linear on [out, in]
    plain = dataclasses.replace(bb, family=plain_family, encoder=Encoder(plain_family))
    engines = {"pytorch": Engine(plain), "small-batch": Engine(bb)}
    info = bb.info
    rounds = default_rounds(args, bb.device, cpu=9)
    env = environment(bb.device, bb.dtype)
    print(f"# small_batch_layout: {env}; threshold {SMALL_BATCH_TOKENS} tokens, {rounds} rounds")

    tmp = tempfile.TemporaryDirectory(prefix="adaptserve-bench-")
    store = Path(tmp.name)
    g = torch.Generator().manual_seed(0)

    def task(name: str, weights: dict, max_length: int):
        v = publish(store, name, weights, ["neg", "pos"], max_length=max_length, fingerprint=info.fingerprint)
        return engines["pytorch"].load_task(store / name / v, TaskKey(name, v))

    chaos = [task(f"chaos-{i}", {"lora": random_lora(info, g, r=4), "head": random_head(info, g)}, 64) for i in range(16)]
    lora = [task(f"lora-{i}", {"lora": random_lora(info, g, r=8), "head": random_head(info, g, pooling="pooler")}, 64)
            for i in range(8)]
    houlsby = [task(f"houlsby-{i}", {"adapter": random_adapter(info, g, kind="houlsby", bottleneck=info.hidden_size // 16),
                                     "head": random_head(info, g, pooling="pooler")}, 64) for i in range(8)]

    mixed = [task(f"mixed-{v}-{i}", dict([method_weights(v, info, g, i), ("head", random_head(info, g, pooling="pooler"))]), 64)
             for v in METHOD_VARIANTS for i in range(32 // len(METHOD_VARIANTS) + 1)]
    rng = random.Random(0)
    tok = engines["pytorch"]
    workloads: dict[str, list[Batch]] = {}
    for n in SHORT_ROWS:
        workloads[f"chaos x{n}"] = [tok.tokenize([ClassifyItem(rng.choice(chaos), t) for t in chaos_texts(rng, n)])
                                    for _ in range(BATCHES_PER_CALL if n <= 8 else 3)]
    rows64 = texts(32, 64, seed=0)
    workloads["lora 32x64"] = [tok.tokenize([ClassifyItem(lora[i % 8], rows64[i]) for i in range(32)])]
    workloads["houlsby 32x64"] = [tok.tokenize([ClassifyItem(houlsby[i % 8], rows64[i]) for i in range(32)])]
    order = random.Random(1).sample(range(len(mixed)), 32)
    workloads["mixed 32x64"] = [tok.tokenize([ClassifyItem(mixed[k], rows64[i]) for i, k in enumerate(order)])]

    results, out_rows, worst = {}, [], 0.0
    with torch.inference_mode():
        for name, batches in workloads.items():
            ref = [engines["pytorch"].logits(b) for b in batches]
            got = [engines["small-batch"].logits(b) for b in batches]
            diff = max(float((a - c).abs().max()) for r, s in zip(ref, got) for a, c in zip(r, s))
            worst = max(worst, diff)
            tokens = sum(int(b.attention_mask.sum()) for b in batches) / len(batches)
            variants = {k: (lambda e=e: [e.logits(b) for b in batches]) for k, e in engines.items()}
            tm = interleaved(variants, rounds, bb.device, warmup=1)
            per = {k: 1e3 * tm.median(k) / len(batches) for k in engines}
            ratio = tm.paired_ratio("small-batch", "pytorch")
            results[name] = {"batches_per_call": len(batches), "mean_tokens": tokens, "ms_pytorch": per["pytorch"],
                             "ms_small_batch": per["small-batch"], "paired_speedup": ratio,
                             "cpu_speedup": tm.summary("small-batch", 1, base="pytorch")["ratio_to_base_cpu"],
                             "max_abs_logit_diff": diff}
            out_rows.append((name, f"{tokens:.0f}", f"{per['pytorch']:.2f}", f"{per['small-batch']:.2f}", f"{ratio:.3f}",
                             f"{results[name]['cpu_speedup']:.3f}", f"{diff:.1e}"))
            print(f"# {name}: {ratio:.3f}x", flush=True)
    print()
    table(out_rows, ("workload", "tokens", "pytorch ms", "small-batch ms", "speedup (paired)", "speedup (cpu)", "max |dlogit|"))
    checks = [check("logits equal across layouts", worst <= TOLERANCE[torch.float32], f"worst {worst:.1e}")]
    write_json(args.out or RESULTS / "small_batch_layout.json", {
        "benchmark": "small_batch_layout", "environment": env,
        "config": {"threshold_tokens": SMALL_BATCH_TOKENS, "rounds": rounds, "threads": args.threads,
                   "batches_per_call": BATCHES_PER_CALL},
        "results": results, "checks": checks,
    })


if __name__ == "__main__":
    main()
