"""How steady is this machine's speed? The same work timed in half-second windows, side by side.

    python bench/machine_drift.py              # 60 s on one core; output: bench/results/machine_drift.json

Three kinds of work take turns inside every 0.5 s window, on one thread, nothing else running:
- `forward`: one MiniLM forward of three chaos-harness rows (the serving path's work);
- `compute`: 200 small matmuls on operands that fit in L1/L2 (the core's arithmetic alone);
- `memory`: a sum over 128 MiB (streaming from DRAM).

Printed per kind: the median of the windows' medians, their min and max, and sigma of their logs
(the drift: the chaos harness's tail model, bench/tail_model.py, redraws the machine's speed every
0.5 s with this sigma), and the correlation of the forward's windows with the other two. If the
compute kernel drifts as much as the forward and in step with it, the forward's drift is the core
running slower (the hypervisor, a busy sibling thread, frequency), not this program's memory
traffic, and no serving change removes it.
"""
from __future__ import annotations

import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chaos import _texts as chaos_texts  # noqa: E402  (the texts the chaos load sends)
from bench.harness import RESULTS, environment, parser, setup_torch, write_json  # noqa: E402

import torch  # noqa: E402

from service.engine.backbone import load_backbone  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.types import ClassifyItem, TaskKey  # noqa: E402
from tests.factories import publish, random_head, random_lora  # noqa: E402

WINDOW_S = 0.5  # the tail model's slot


def main() -> None:
    ap = parser(__doc__.split("\n")[0])
    ap.set_defaults(threads=1)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    setup_torch(args)
    bb = load_backbone(None, device="cpu", dtype="float32")
    engine = Engine(bb)
    store = Path(tempfile.mkdtemp(prefix="adaptserve-drift-"))
    g = torch.Generator().manual_seed(0)
    version = publish(store, "t", {"lora": random_lora(bb.info, g, r=4), "head": random_head(bb.info, g)}, ["neg", "pos"],
                      max_length=64, fingerprint=bb.info.fingerprint)
    task = engine.load_task(store / "t" / version, TaskKey("t", version))
    batch = engine.tokenize([ClassifyItem(task, text) for text in chaos_texts(random.Random(0), 3)])
    a, w = torch.randn(36, 384), torch.randn(384, 384)  # 55 KB + 590 KB: in the core's caches
    big = torch.randn(32 * 2**20)  # 128 MiB: streamed from memory

    work = {
        "forward": lambda: engine.logits(batch),
        "compute": lambda: [torch.mm(a, w) for _ in range(200)],
        "memory": lambda: big.sum(),
    }
    windows: dict[str, list[float]] = {name: [] for name in work}
    with torch.inference_mode():
        for fn in work.values():  # warm up
            for _ in range(5):
                fn()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            times: dict[str, list[float]] = {name: [] for name in work}
            window_end = time.monotonic() + WINDOW_S
            while time.monotonic() < window_end:
                for name, fn in work.items():
                    started = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - started)
            for name in work:
                windows[name].append(1e3 * statistics.median(times[name]))

    results = {}
    for name, ms in windows.items():
        logs = [math.log(x) for x in ms]
        results[name] = {"windows": len(ms), "median_ms": round(statistics.median(ms), 3), "min_ms": round(min(ms), 3),
                         "max_ms": round(max(ms), 3), "sigma_log": round(statistics.pstdev(logs), 4),
                         "max_over_min": round(max(ms) / min(ms), 2)}
        if name != "forward":
            results[name]["corr_with_forward"] = round(_corr([math.log(x) for x in windows["forward"]], logs), 3)
    print(f"# machine_drift: {args.seconds:.0f} s in {WINDOW_S} s windows, one thread")
    print(f"{'work':8} {'median ms':>10} {'min':>8} {'max':>8} {'sigma(log)':>11} {'corr w/ forward':>16}")
    for name, r in results.items():
        print(f"{name:8} {r['median_ms']:10.2f} {r['min_ms']:8.2f} {r['max_ms']:8.2f} {r['sigma_log']:11.3f} "
              f"{r.get('corr_with_forward', 1.0):16.3f}")
    write_json(args.out or RESULTS / "machine_drift.json", {
        "benchmark": "machine_drift", "environment": environment(bb.device, bb.dtype),
        "config": {"seconds": args.seconds, "window_s": WINDOW_S}, "results": results,
        "series_ms": {name: [round(x, 2) for x in ms] for name, ms in windows.items()},
    })


def _corr(x: list[float], y: list[float]) -> float:
    mx, my = statistics.mean(x), statistics.mean(y)
    sx = math.sqrt(sum((v - mx) ** 2 for v in x))
    sy = math.sqrt(sum((v - my) ** 2 for v in y))
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy) if sx and sy else float("nan")


if __name__ == "__main__":
    main()
