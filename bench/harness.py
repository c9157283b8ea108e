"""Shared pieces of the engine benchmarks: arguments, inputs, and side-by-side timing.

The machines these run on are shared and noisy, so every variant is timed in the same run,
interleaved: each round calls every variant once (the starting variant rotates so no variant
always runs first after a cache-cold step), and a variant's figure is the median over rounds.
Ratios between variants are what the benchmarks report; absolute seq/s are for context.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Plain English words: WordPiece keeps nearly all of them as one token, so a text of n words
# is about n + 2 tokens and we can make rows of a chosen length.
WORDS = (
    "the a movie film great good bad terrible boring fun plot acting is was it and or but not very really day "
    "park walk news sports world business science game team market price stock win lose love hate happy sad "
    "fine story long short city river house water music song book paper school money time year people way "
    "thing man woman child government company group problem fact hand part place case week point number night"
).split()


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (median reported)")
    p.add_argument("--quick", action="store_true", help="few rounds, fewer variants: a smoke run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row after padding")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="JSON results path")
    return p


def setup_torch(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def texts(n: int, seq_len: int, seed: int) -> list[str]:
    """n texts of varied length; row 0 is long enough to reach seq_len tokens after truncation,
    so right-padding brings every row of a batch to exactly seq_len tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = seq_len + 8 if i == 0 else int(torch.randint(seq_len // 4, seq_len + 8, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        out.append(" ".join(WORDS[j] for j in idx))
    return out


# Max |logit difference| accepted between two computations of the same rows: fp32 sums in a
# different order differ by ~1e-6; bf16 keeps 8 mantissa bits, so kernels that differ by batch
# shape (mixed vs alone, ours vs HF) drift by a few 1e-2 over 6 layers.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1.5e-1}


def default_rounds(args: argparse.Namespace, device: torch.device, cpu: int) -> int:
    """CPU forwards take ~0.25 s each here; GPU ones a few ms, so many more rounds are cheap."""
    if args.repeats:
        return args.repeats
    if device.type == "cuda":
        return 10 if args.quick else 50
    return 3 if args.quick else cpu


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    seconds: dict[str, list[float]] = field(default_factory=dict)  # wall clock per call
    cpu: dict[str, list[float]] = field(default_factory=dict)  # this process's CPU time per call

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def paired_ratio(self, name: str, base: str) -> float:
        """Median over rounds of base_time / name_time within the same round (speed relative to
        base; > 1 is faster). Pairing cancels slow drift in machine load between rounds."""
        return statistics.median(b / t for b, t in zip(self.seconds[base], self.seconds[name]))

    def summary(self, name: str, rows: int, base: str | None = None) -> dict[str, float]:
        s = sorted(self.seconds[name])
        med = statistics.median(s)
        out = {
            "median_s": med,
            "min_s": s[0],
            "max_s": s[-1],
            "rounds": len(s),
            "seq_per_s": rows / med,
        }
        if base is not None:
            out["ratio_to_base"] = self.median(base) / med  # the headline: ratio of medians
            out["ratio_to_base_paired"] = self.paired_ratio(name, base)
            out["ratio_to_base_best"] = min(self.seconds[base]) / s[0]  # best-of-N: the least-disturbed runs
            if self.cpu.get(name):
                # CPU seconds the process spent: time spent descheduled by other tenants does not
                # count (OpenMP spin-waits still do), so this is the most load-robust ratio here.
                out["cpu_median_s"] = statistics.median(self.cpu[name])
                out["ratio_to_base_cpu"] = statistics.median(self.cpu[base]) / out["cpu_median_s"]
        return out

    def rows(self, names: list[str], rows: int, base: str, ops: Mapping[str, int] | None = None) -> list[tuple[str, ...]]:
        """Table rows: variant, seq/s, median ms, min-max ms, x base (median, paired, best, cpu), ops."""
        out = []
        for n in names:
            r = self.summary(n, rows, base)
            out.append((n, f"{r['seq_per_s']:.1f}", f"{1e3 * r['median_s']:.1f}", f"{1e3 * r['min_s']:.0f}-{1e3 * r['max_s']:.0f}",
                        f"{r['ratio_to_base']:.3f}", f"{r['ratio_to_base_paired']:.3f}", f"{r['ratio_to_base_best']:.3f}",
                        f"{r.get('ratio_to_base_cpu', float('nan')):.3f}", str(ops.get(n, "")) if ops else ""))
        return out

    HEADER = ("variant", "seq/s", "median ms", "range ms", "x base", "paired", "best", "cpu", "aten ops")
    LEGEND = ("(x base: ratio of median wall times, the headline; paired: median of same-round ratios; "
              "best: ratio of fastest runs; cpu: ratio of median process CPU times; aten ops: ops dispatched per call)")


def interleaved(variants: Mapping[str, Callable[[], object]], rounds: int, device: torch.device, warmup: int = 2) -> Timings:
    """Time every variant once per round, round-robin with a rotating start; returns all samples."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    sync(device)
    t = Timings({n: [] for n in names}, {n: [] for n in names})
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            variants[n]()
            sync(device)
            t.seconds[n].append(time.perf_counter() - t0)
            t.cpu[n].append(time.process_time() - c0)
    return t


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> dict[str, int]:
    """aten ops one call dispatches, by name. Deterministic, unlike time on a shared machine: each
    op is a kernel launch on a GPU (~5-10 us of launch/dispatch overhead) and a parallel region on
    a multi-threaded CPU, so the count says what small-op overhead a variant carries."""
    with _OpCounter() as c:
        fn()
    return c.ops


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    env: dict[str, object] = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import peft
        import transformers

        env["transformers"] = transformers.__version__
        env["peft"] = peft.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = _cpu_name()
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def check(label: str, ok: bool, detail: str) -> dict[str, object]:
    print(f"{'PASS' if ok else 'FAIL'}  {label}: {detail}")
    return {"target": label, "pass": bool(ok), "detail": detail}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a run killed mid-write leaves the previous file whole
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    for r in rows:
        print(fmt.format(*r))
