"""The frozen linears' memory order on the CPU: PyTorch's [out, in] vs input-major [in, out].

    /work/venv/bin/python bench/linear_layout.py --threads 1     # as the chaos harness's replicas run
    /work/venv/bin/python bench/linear_layout.py --quick         # smoke run

`load_backbone` stores every layer linear of a CPU backbone input-major
(`service.engine.families.set_linear_layout`). This times the two layouts side by side in one
process: two copies of the bundled MiniLM, one switched back to PyTorch's order, each serving the
same pre-tokenised batches through `Engine.logits` (rows from 8 LoRA r=4 q/v + head tasks, as in
the chaos harness). Shapes: 1-32 rows of short texts (3-16 words, the harness's requests) and 8 or
32 rows of 64 tokens. Reported per shape: each layout's median ms and the paired speed ratio
(> 1: input-major is faster), plus the largest |logit| difference between the layouts.
"""
from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    RESULTS, TOLERANCE, WORDS, check, default_rounds, environment, interleaved, parser, setup_torch, table, texts, write_json,
)

import torch  # noqa: E402

from service.engine.backbone import load_backbone  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.families import set_linear_layout  # noqa: E402
from service.engine.types import ClassifyItem, TaskKey  # noqa: E402
from tests.factories import publish, random_head, random_lora  # noqa: E402


def short_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) for _ in range(n)]


def main() -> None:
    ap = parser(__doc__.split("\n")[0])
    args = ap.parse_args()
    setup_torch(args)
    if args.device != "cpu":
        raise SystemExit("bench/linear_layout.py compares CPU layouts; load_backbone keeps PyTorch's order on GPUs")
    input_major = load_backbone(None, device="cpu", dtype=args.dtype)
    torch_order = load_backbone(None, device="cpu", dtype=args.dtype)
    moved = set_linear_layout(torch_order.family, input_major=False)
    assert moved and torch_order.family.layers[0].query.weight.is_contiguous()
    engines = {"pytorch_order": Engine(torch_order), "input_major": Engine(input_major)}
    rounds = default_rounds(args, torch.device("cpu"), cpu=41)
    env = environment(torch.device("cpu"), input_major.dtype)
    print(f"# linear_layout: {env}")
    print(f"# {moved} linears per backbone; {rounds} interleaved rounds (median)")

    store = Path(tempfile.mkdtemp(prefix="adaptserve-bench-"))
    g = torch.Generator().manual_seed(1)
    published = []
    for i in range(8):
        weights = {"lora": random_lora(input_major.info, g, r=4, sites=("query", "value")),
                   "head": random_head(input_major.info, g, labels=2, pooling="mean")}
        v = publish(store, f"t{i}", weights, ["neg", "pos"], max_length=128, fingerprint=input_major.info.fingerprint)
        published.append((f"t{i}", v))
    tasks = {k: [e.load_task(store / n / v, TaskKey(n, v)) for n, v in published] for k, e in engines.items()}

    shapes = [(f"{n} short", short_texts(n, seed=n)) for n in ((1, 2, 4) if args.quick else (1, 2, 4, 8, 16, 32))]
    shapes += [(f"{n} x 64 tok", texts(n, 64, seed=n)) for n in ((8,) if args.quick else (8, 32))]
    rows, results, checks = [], [], []
    for label, rows_text in shapes:
        batches = {k: e.tokenize([ClassifyItem(tasks[k][j % 8], t) for j, t in enumerate(rows_text)]) for k, e in engines.items()}
        tokens = int(batches["input_major"].attention_mask.sum())
        with torch.inference_mode():
            out = {k: torch.stack([x.float() for x in engines[k].logits(batches[k])]) for k in engines}
            t = interleaved({k: (lambda k=k: engines[k].logits(batches[k])) for k in engines}, rounds, torch.device("cpu"))
        diff = float((out["input_major"] - out["pytorch_order"]).abs().max())
        r = {"shape": label, "rows": len(rows_text), "real_tokens": tokens,
             "pytorch_order_ms": 1e3 * t.median("pytorch_order"), "input_major_ms": 1e3 * t.median("input_major"),
             "speed_ratio_paired": t.paired_ratio("input_major", "pytorch_order"),
             "speed_ratio_cpu": t.summary("input_major", len(rows_text), "pytorch_order").get("ratio_to_base_cpu"),
             "max_abs_logit_diff": diff}
        results.append(r)
        rows.append((label, str(tokens), f"{r['pytorch_order_ms']:.1f}", f"{r['input_major_ms']:.1f}",
                     f"{r['speed_ratio_paired']:.2f}", f"{r['speed_ratio_cpu']:.2f}", f"{diff:.1e}"))
        checks.append(check(f"{label}: layouts agree", diff <= TOLERANCE[input_major.dtype], f"max |diff| {diff:.1e}"))
    table(rows, ("batch", "tokens", "pytorch order ms", "input-major ms", "x (paired)", "x (cpu)", "max |diff|"))
    print("(x: median over rounds of pytorch-order time / input-major time in the same round; > 1: input-major faster)")
    out_path = args.out or RESULTS / ("linear_layout_quick.json" if args.quick else "linear_layout.json")
    write_json(out_path, {"benchmark": "linear_layout", "args": {k: str(v) for k, v in vars(args).items()},
                          "environment": env, "rounds": rounds, "results": results, "checks": checks})
    print(f"# wrote {out_path}")
    if not all(c["pass"] for c in checks):
        raise SystemExit("layouts disagree beyond tolerance")


if __name__ == "__main__":
    main()
