"""How much a replica's event loop slows its forward thread through the GIL, side by side.

    python bench/gil_coupling.py              # ~2 min on 2 idle cores; output: bench/results/gil_coupling.json
    python bench/gil_coupling.py --quick

The same MiniLM forwards (chaos-harness rows: random LoRA r=4 + head tasks, 1, 3 and 8 rows, one
torch thread) timed in turn under three conditions, interleaved round by round so the machine's
drift hits all three alike:
- `alone`: nothing else runs;
- `python thread`: a thread of this process runs pure Python for `--duty` of every millisecond
  (a stand-in for a replica's event loop: uvicorn, FastAPI, the scheduler), sleeping the rest;
- `process`: the same busy loop in a separate process, which shares the cores but not the GIL.

Printed: median ms per forward and the ratio to `alone`. A ratio well above 1 beside the thread
and near 1 beside the process says the cost is the GIL: each of the forward's calls into torch
gives it up and has to take it back (docs/reliability.md, "The collectors").
"""
from __future__ import annotations

import multiprocessing
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chaos import _texts as chaos_texts  # noqa: E402  (the texts the chaos load sends)
from bench.harness import RESULTS, environment, parser, setup_torch, table, write_json  # noqa: E402

import torch  # noqa: E402

from service.engine.backbone import load_backbone  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.types import ClassifyItem, TaskKey  # noqa: E402
from tests.factories import publish, random_head, random_lora  # noqa: E402

ROWS = (1, 3, 8)
CONDITIONS = ("alone", "python thread", "process")


def busy(duty: float, stop: threading.Event | None = None, run_s: float = 0.0) -> None:
    """Pure Python for `duty` of every millisecond, asleep for the rest."""
    end = time.monotonic() + run_s if run_s else float("inf")
    while (stop is None or not stop.is_set()) and time.monotonic() < end:
        started = time.perf_counter()
        while time.perf_counter() - started < 1e-3 * duty:
            sum(range(50))
        time.sleep(1e-3 * (1 - duty))


def main() -> None:
    ap = parser(__doc__.split("\n")[0])
    ap.set_defaults(threads=1)
    ap.add_argument("--duty", type=float, default=0.25, help="share of each millisecond the busy loop runs")
    args = ap.parse_args()
    setup_torch(args)
    rounds = args.repeats or (3 if args.quick else 9)
    per_call = 5 if args.quick else 15  # forwards per timed call (the median of them is kept)

    bb = load_backbone(None, device="cpu", dtype="float32")
    engine = Engine(bb)
    store = Path(tempfile.mkdtemp(prefix="adaptserve-gil-"))
    g = torch.Generator().manual_seed(0)
    tasks = []
    for i in range(16):
        version = publish(store, f"t{i}", {"lora": random_lora(bb.info, g, r=4), "head": random_head(bb.info, g)},
                          ["neg", "pos"], max_length=64, fingerprint=bb.info.fingerprint)
        tasks.append(engine.load_task(store / f"t{i}" / version, TaskKey(f"t{i}", version)))
    rng = random.Random(0)
    texts = chaos_texts(rng, 400)
    batches = {n: [[ClassifyItem(rng.choice(tasks), rng.choice(texts)) for _ in range(n)] for _ in range(per_call)]
               for n in ROWS}
    for n in ROWS:  # warm up
        engine.classify(batches[n][0])

    def timed(n: int) -> float:
        ms = []
        for items in batches[n]:
            started = time.perf_counter()
            engine.classify(items)
            ms.append(1e3 * (time.perf_counter() - started))
        return statistics.median(ms)

    results: dict[str, dict[int, list[float]]] = {c: {n: [] for n in ROWS} for c in CONDITIONS}
    context = multiprocessing.get_context("spawn")
    for _ in range(rounds):
        for condition in CONDITIONS:
            stop = threading.Event()
            helper: threading.Thread | multiprocessing.process.BaseProcess | None = None
            if condition == "python thread":
                helper = threading.Thread(target=busy, args=(args.duty, stop), daemon=True)
            elif condition == "process":
                helper = context.Process(target=busy, args=(args.duty, None, 600.0), daemon=True)
            if helper is not None:
                helper.start()
                time.sleep(0.2 if condition == "python thread" else 1.0)  # a spawned process imports first
            for n in ROWS:
                results[condition][n].append(timed(n))
            stop.set()
            if isinstance(helper, threading.Thread):
                helper.join()
            elif helper is not None:
                helper.terminate()
                helper.join()

    summary = {c: {n: round(statistics.median(results[c][n]), 2) for n in ROWS} for c in CONDITIONS}
    print(f"# gil_coupling: {environment(bb.device, bb.dtype)}; busy loop {args.duty:.0%} of each ms, "
          f"{rounds} interleaved rounds")
    table([(f"{n} row{'s' if n > 1 else ''}", *(f"{summary[c][n]:.1f}" for c in CONDITIONS),
            f"{summary['python thread'][n] / summary['alone'][n]:.2f}x", f"{summary['process'][n] / summary['alone'][n]:.2f}x")
           for n in ROWS],
          ("forward", *(f"{c} ms" for c in CONDITIONS), "thread/alone", "process/alone"))
    write_json(args.out or RESULTS / "gil_coupling.json", {
        "benchmark": "gil_coupling", "environment": environment(bb.device, bb.dtype),
        "config": {"duty": args.duty, "rounds": rounds, "forwards_per_call": per_call, "rows": list(ROWS)},
        "median_ms": {c: {str(n): v for n, v in summary[c].items()} for c in CONDITIONS},
        "ratio_to_alone": {c: {str(n): round(summary[c][n] / summary["alone"][n], 3) for n in ROWS} for c in CONDITIONS},
        "rounds_ms": {c: {str(n): [round(x, 2) for x in results[c][n]] for n in ROWS} for c in CONDITIONS},
    })


if __name__ == "__main__":
    main()
