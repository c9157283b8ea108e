"""Short requests beside long text-pair requests: tokenising on the forward thread against before
the queue (`Engine.pretokenize`, what the classify route does), side by side in one run.

    python bench/tokenize_off_forward.py             # bundled MiniLM, CPU, ~2 min
    python bench/tokenize_off_forward.py --quick     # ~40 s

One scheduler over the real engine (one torch thread, as a CPU replica runs it). Foreground: one
short text of a LoRA task, open loop at --rate per second. Background: every --every seconds, one
request of --pairs text pairs of --chars characters a side (CJK or English) for a pair task at
max_length 32. Rounds alternate the two paths: `forward thread` queues the raw rows, so the forward
that takes the long request tokenises it and every other task's rows wait behind it; `pretokenized`
tokenises each request before it is queued, the short ones on the event loop and the long ones in a
worker thread, as `service.api.classify` does. Printed: the short requests' p50 / p99 / max latency
per path (pooled over its rounds) and the ratios; JSON to bench/results/tokenize_off_forward.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.chaos import _texts  # noqa: E402  (the chaos harness's short texts)
from bench.harness import percentile  # noqa: E402
from service.api.classify import _pretokenize  # noqa: E402
from service.engine.backbone import load_backbone  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.types import ClassifyItem, TaskKey  # noqa: E402
from service.scheduler import Scheduler  # noqa: E402
from tests.factories import publish, random_head, random_lora  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = {"CJK": "漢字の文章" * 800, "English": "the film was surprisingly good and the plot held up " * 80}


async def one_round(engine: Engine, short, pair, args, pretokenized: bool, seed: int) -> dict:
    scheduler = Scheduler(engine.classify, max_batch_size=32, max_wait_s=0.005, max_queue=100_000)
    await scheduler.start()
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    side = SIDES[args.script][:args.chars]
    latencies: list[float] = []

    async def request(items: list[ClassifyItem], record: bool) -> None:
        started = time.perf_counter()
        deadline = loop.time() + 60
        if pretokenized:
            items = await _pretokenize(engine, items, deadline)
        await scheduler.submit(items, deadline)
        if record:
            latencies.append(1e3 * (time.perf_counter() - started))

    jobs = []
    start = time.perf_counter()
    n_short = int(args.rate * args.seconds)
    long_at = [k * args.every for k in range(int(args.seconds / args.every))]
    events = sorted([(k / args.rate, "short") for k in range(n_short)] + [(t + 0.25, "long") for t in long_at])
    for at, kind in events:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if kind == "short":
            items = [ClassifyItem(short, _texts(rng, 1)[0])]
        else:
            items = [ClassifyItem(pair, side, side) for _ in range(args.pairs)]
        jobs.append(asyncio.ensure_future(request(items, kind == "short")))
    await asyncio.gather(*jobs)
    await scheduler.stop()
    return {"latencies_ms": latencies}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--script", choices=sorted(SIDES), default="CJK")
    ap.add_argument("--chars", type=int, default=4000, help="characters a side of each long pair")
    ap.add_argument("--pairs", type=int, default=16, help="pairs per long request")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between long requests")
    ap.add_argument("--rate", type=float, default=20.0, help="short requests per second")
    ap.add_argument("--seconds", type=float, default=10.0, help="per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds in all, alternating the two paths")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 8 s")
    ap.add_argument("--out", type=Path, default=RESULTS / "tokenize_off_forward.json")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds = 2, 8.0
    torch.set_num_threads(1)
    engine = Engine(load_backbone(None, device="cpu", dtype="float32"))
    info = engine.backbone.info
    store = Path(tempfile.mkdtemp(prefix="adaptserve-bench-"))
    g = torch.Generator().manual_seed(0)
    tasks = {}
    for name, kind in (("short", "single"), ("pair", "pair")):
        v = publish(store, name, {"lora": random_lora(info, g), "head": random_head(info, g)}, ["a", "b"],
                    input_kind=kind, max_length=32, fingerprint=info.fingerprint)
        tasks[name] = engine.load_task(store / name / v, TaskKey(name, v))
    engine.warmup()
    side = SIDES[args.script][:args.chars]
    t = time.perf_counter()
    engine.pretokenize([ClassifyItem(tasks["pair"], side, side) for _ in range(args.pairs)])
    tok_s = time.perf_counter() - t
    print(f"# {args.pairs} pairs x {args.chars} {args.script} characters a side take {tok_s:.3f} s to tokenise; "
          f"{args.rate:g} short req/s, one long request every {args.every:g} s, {args.rounds} rounds of {args.seconds:g} s", flush=True)

    pooled: dict[str, list[float]] = {"forward thread": [], "pretokenized": []}
    for r in range(args.rounds):
        path = "forward thread" if r % 2 == 0 else "pretokenized"
        got = asyncio.run(one_round(engine, tasks["short"], tasks["pair"], args, path == "pretokenized", seed=r // 2))
        lat = got["latencies_ms"]
        pooled[path].extend(lat)
        print(f"round {r + 1} {path:15}: p50 {percentile(lat, 50):7.1f} ms  p99 {percentile(lat, 99):7.1f} ms", flush=True)
    summary = {path: {q: round(percentile(v, p), 1) for q, p in (("p50", 50), ("p99", 99), ("max", 100))} | {"n": len(v)}
               for path, v in pooled.items()}
    ratios = {q: round(summary["forward thread"][q] / summary["pretokenized"][q], 2) for q in ("p50", "p99", "max")}
    print()
    for path, s in summary.items():
        print(f"{path:15}: short requests p50 {s['p50']:7.1f} ms  p99 {s['p99']:7.1f} ms  max {s['max']:7.1f} ms  (n={s['n']})")
    print(f"forward thread / pretokenized: p50 {ratios['p50']}x  p99 {ratios['p99']}x  max {ratios['max']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "tokenise_long_request_s": round(tok_s, 3),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "short_request_latency_ms": summary, "ratio_forward_thread_to_pretokenized": ratios,
    }, indent=1) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
