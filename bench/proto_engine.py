"""A prototype of three engine optimisations, kept out of service/ and measured side by side.

    /work/venv/bin/python bench/proto_engine.py [--quick] [--repeats N] [--threads N]

What the profile of bench/engine_lora.py and bench/engine_methods.py showed, and what each
prototype piece changes (service/ is untouched; these subclass it):

1. `HeadBatch.logits` with pooling="pooler" (the BERT pooler, what BertForSequenceClassification
   and imported PEFT bundles use) loops over the tasks in the batch and, per task, calls
   `b.select(rows)` on *every* method batch just to ask for a LoRA delta on the pooler.
   `PrefixBatch.select` / `PromptBatch.select` rebuild their slot tables from scratch (pad +
   stack every task's prefix), so a batch of n prefix tasks does n full table builds: O(n^2)
   copies. `FastHeadBatch` pools every row once, runs the pooler (+ any LoRA pooler delta via
   the *unselected* batch) once over all rows, then does the per-task output projections.

2. LoRA adds its delta out of place: `y = y + bmm(bmm(x, A^T), B^T)` costs a full extra
   read + write of the [B, T, out] output per site. `FusedEncoder._linear` lets a method add
   into the fresh linear output in place (`baddbmm_`), saving that pass.

3. `slots.build` stacks (and pads, and scales) every task's A and B for every (layer, site) on
   every batch. `LoraPool` keeps persistent device tables (pre-scaled, pre-transposed, padded
   to the pool's max rank) written once when a task is loaded, as vLLM's LoRA slots do; a batch
   then only maps rows to slots.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import RESULTS, count_ops, default_rounds, environment, interleaved, parser, setup_torch, table, texts, write_json  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from service.engine.backbone import Backbone, load_backbone  # noqa: E402
from service.engine.encoder import Encoder, Plan  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.families import SITES  # noqa: E402
from service.engine.types import ClassifyItem, TaskKey  # noqa: E402
from service.methods.base import MethodBatch  # noqa: E402
from service.methods.head import HeadBatch, pool  # noqa: E402
from service.methods.lora import POOLER, LoraBatch, LoraWeights  # noqa: E402
from tests.factories import publish, random_head, random_lora, random_prefix, random_prompt  # noqa: E402


# -- 1. head: pool once, pooler once ---------------------------------------------------------------
class FastHeadBatch(HeadBatch):
    def logits(self, hidden: Tensor, keep: Tensor, text_start: Tensor, text_len: Tensor, pooler, plan) -> list[Tensor | None]:
        if any(getattr(p, "normalize", False) for p in self.parts if p is not None):
            # normalised heads (zero-shot scoring) normalise before the pooler: not prototyped
            return super().logits(hidden, keep, text_start, text_len, pooler, plan)
        pooled: dict[str, Tensor] = {}
        for how in {p.pooling for p in self.parts if p is not None}:
            if how == "pooler":
                x = hidden[:, 0]  # [B, H]
                y = pooler(x)
                for b in plan.batches:  # the whole batch's tables: no per-task select
                    d = b.linear_delta(*POOLER, x)
                    if d is not None:
                        y = y + d
                pooled[how] = torch.tanh(y)
            else:
                pooled[how] = pool(hidden, keep, text_start, text_len, how)  # [B, H]
        groups: dict[int, list[int]] = defaultdict(list)
        for r, j in enumerate(self.row_part.tolist()):
            groups[j].append(r)
        out: list[Tensor | None] = [None] * hidden.shape[0]
        for j, rows in groups.items():
            p = self.parts[j]
            if p is None:
                continue
            x = pooled[p.pooling].index_select(0, torch.tensor(rows, device=hidden.device))  # [n, H]
            if p.dense_w is not None:
                x = ACT2FN[p.dense_activation](x @ p.dense_w.T + p.dense_b)
            z = x @ p.out_w.T + p.out_b  # [n, labels]
            for r, zr in zip(rows, z):
                out[r] = zr
        return out


# -- 2. in-place deltas ----------------------------------------------------------------------------
class FusedEncoder(Encoder):
    def _linear(self, i: int, site: str, x: Tensor, plan: Plan) -> Tensor:
        y = self.f.layers[i].site(site)(x)  # a fresh tensor: safe to add into
        for b in plan.batches:
            add_ = getattr(b, "add_delta_", None)
            if add_ is not None:
                add_(i, site, x, y)
                continue
            d = b.linear_delta(i, site, x)
            if d is not None:
                y = y + d
        return y


class FusedLoraBatch(LoraBatch):
    """Today's per-batch tables, but the delta goes into y in place (one pass fewer over y)."""

    def add_delta_(self, layer: int, site: str, x: Tensor, y: Tensor) -> None:
        t = self._table((layer, site))
        if t is None:
            return
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        y3 = y.view(y.shape[0], -1, y.shape[-1])  # [B, T, out]
        if t.single:
            y3.add_((x3 @ t.tables[0][1].T) @ t.tables[1][1].T)
            return
        z = torch.bmm(x3, t.rows(0).transpose(1, 2))  # [B, T, r]
        y3.baddbmm_(z, t.rows(1).transpose(1, 2))  # y_b += z_b (scale B_b)^T


# -- 3. persistent slot pool -----------------------------------------------------------------------
class LoraPool:
    """Device tables per (layer, site): A^T [S, in, r_max] and (scale * B)^T [S, r_max, out], slot 0
    all zeros. A task is written into a slot once (at load); batches only gather by slot."""

    def __init__(self, backbone: Backbone, capacity: int, r_max: int):
        self.info = backbone.info
        self.capacity, self.r_max = capacity, r_max
        self.tables: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        self.slot_of: dict[int, int] = {}  # id(LoraWeights) -> slot (a real pool keys by TaskKey)
        self._next = 1

    def add(self, lw: LoraWeights) -> int:
        if lw.r > self.r_max or self._next > self.capacity:
            raise ValueError("pool full or rank above the pool's r_max")
        s = self._next
        self._next += 1
        dev, dt = self.info.device, self.info.dtype
        for key, (a, b) in lw.pairs.items():
            if key not in self.tables:
                fin, fout = (self.info.hidden_size, self.info.hidden_size) if key == POOLER else self.info.site_shape(key[1])
                self.tables[key] = (torch.zeros(self.capacity + 1, fin, self.r_max, device=dev, dtype=dt),
                                    torch.zeros(self.capacity + 1, self.r_max, fout, device=dev, dtype=dt))
            at, bt = self.tables[key]
            at[s, :, : lw.r] = a.T
            bt[s, : lw.r, :] = (b * lw.scale).T
        self.slot_of[id(lw)] = s
        return s


class PooledLoraBatch(MethodBatch):
    def __init__(self, pool_: LoraPool, parts: Sequence[LoraWeights | None], row_part: Tensor):
        self.pool = pool_
        self.parts, self.row_part = parts, row_part
        part_slot = torch.tensor([0 if p is None else pool_.slot_of[id(p)] for p in parts], device=row_part.device)
        self.slot = part_slot.index_select(0, row_part)  # [B]
        # sites some task of this batch adapts: the pool has tables for every site any pooled task uses
        self.keys = set().union(*(p.pairs for p in parts if p is not None))
        self.r = max(p.r for p in parts if p is not None)  # pad ranks to this batch's largest, not the pool's

    def add_delta_(self, layer: int, site: str, x: Tensor, y: Tensor) -> None:
        t = self.pool.tables.get((layer, site))
        if t is None or (layer, site) not in self.keys:
            return
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        y3 = y.view(y.shape[0], -1, y.shape[-1])  # [B, T, out]
        z = torch.bmm(x3, t[0][:, :, : self.r].index_select(0, self.slot))  # [B, T, r]
        y3.baddbmm_(z, t[1][:, : self.r].index_select(0, self.slot))

    def linear_delta(self, layer: int, site: str, x: Tensor) -> Tensor | None:  # the pooler (2-D input)
        t = self.pool.tables.get((layer, site))
        if t is None or (layer, site) not in self.keys:
            return None
        z = torch.bmm(x.unsqueeze(1), t[0][:, :, : self.r].index_select(0, self.slot))
        return torch.bmm(z, t[1][:, : self.r].index_select(0, self.slot)).squeeze(1)


class ProtoEngine(Engine):
    """Engine with the prototype pieces switched on: head (1), fused (2), pool (3)."""

    def __init__(self, backbone: Backbone, *, head: bool = True, fused: bool = False, pool_: LoraPool | None = None):
        if fused or pool_ is not None:
            backbone = dataclasses.replace(backbone, encoder=FusedEncoder(backbone.family))
        super().__init__(backbone)
        self.fast_head, self.fused, self.pool = head, fused, pool_

    def plan(self, tasks, row_part):
        plan, head = super().plan(tasks, row_part)
        batches = []
        for b in plan.batches:
            if isinstance(b, LoraBatch) and self.pool is not None:
                b = PooledLoraBatch(self.pool, b.parts, b.row_part)
            elif isinstance(b, LoraBatch) and self.fused:
                b = FusedLoraBatch(b.parts, b.row_part)
            batches.append(b)
        if self.fast_head:
            head = _with_fast_head(head)
        return Plan(tuple(batches)), head


def _with_fast_head(out):
    """Swap the HeadBatch in whatever the engine's plan returns for its output stage (a HeadBatch,
    or an object holding one as `.head`, as the engine's output stage is being reworked)."""
    if isinstance(out, HeadBatch):
        return FastHeadBatch(out.parts, out.row_part)
    if isinstance(getattr(out, "head", None), HeadBatch):
        out.head = FastHeadBatch(out.head.parts, out.head.row_part)
    return out


# -- the side-by-side run --------------------------------------------------------------------------
def main() -> None:
    ap = parser(__doc__.split("\n")[0])
    args = ap.parse_args()
    setup_torch(args)
    B, T = args.batch, args.seq_len
    bb = load_backbone(None, device=args.device, dtype=args.dtype)
    rounds = default_rounds(args, bb.device, cpu=9)
    info = bb.info
    engine = Engine(bb)
    env = environment(bb.device, bb.dtype)
    print(f"# proto_engine: {env}\n# batch {B} x {T}, {rounds} rounds")
    store = Path(tempfile.mkdtemp(prefix="adaptserve-proto-"))
    g = torch.Generator().manual_seed(0)

    def mk(name, w):
        v = publish(store, name, w, ["neg", "pos"], max_length=T, fingerprint=info.fingerprint)
        return engine.load_task(store / name / v, TaskKey(name, v))

    head = lambda: random_head(info, g, labels=2, pooling="pooler")  # noqa: E731
    t_base = mk("head-only", {"head": head()})
    t_qv = [mk(f"qv-{i}", {"lora": random_lora(info, g, r=8), "head": head()}) for i in range(B)]
    t_all6 = [mk(f"all6-{i}", {"lora": random_lora(info, g, r=(4, 8, 16)[i % 3], sites=SITES), "head": head()}) for i in range(B)]
    t_prefix = [mk(f"prefix-{i}", {"prefix": random_prefix(info, g, p=10 + i % 11), "head": head()}) for i in range(B)]
    t_prompt = [mk(f"prompt-{i}", {"prompt": random_prompt(info, g, p=10 + i % 11), "head": head()}) for i in range(B)]
    mixed = t_qv[:8] + t_prefix[:8] + t_prompt[:8] + t_all6[:8]  # (all6 stands in for a 4th kind here)
    mixed = [mixed[k] for k in torch.randperm(B, generator=torch.Generator().manual_seed(1)).tolist()]

    pool_ = LoraPool(bb, capacity=2 * B, r_max=16)
    for t in t_qv + t_all6:
        pool_.add(t.weights["lora"])
    fixed_head = ProtoEngine(bb, head=True)
    fused = ProtoEngine(bb, head=True, fused=True)
    pooled = ProtoEngine(bb, head=True, pool_=pool_)

    rows = texts(B, T, seed=0)
    batch = {k: engine.tokenize([ClassifyItem(ts[i] if isinstance(ts, list) else ts, rows[i]) for i in range(B)])
             for k, ts in (("base", t_base), ("qv", t_qv), ("all6", t_all6), ("prefix", t_prefix), ("prompt", t_prompt),
                           ("mixed", mixed))}

    # prototypes must give today's logits
    worst = 0.0
    with torch.inference_mode():
        for k, b in batch.items():
            ref = torch.stack(engine.logits(b))
            for e in (fixed_head, fused, pooled):
                worst = max(worst, float((torch.stack(e.logits(b)) - ref).abs().max()))
    print(f"# prototype vs engine logits, max |diff| over all batches: {worst:.2e}")

    V = {"base": lambda: engine.logits(batch["base"])}
    groups = [("qv", ("engine", "head_fix", "fused", "pool")), ("all6", ("engine", "fused", "pool"))]
    if not args.quick:
        groups += [("prefix", ("engine", "head_fix")), ("prompt", ("engine", "head_fix")), ("mixed", ("engine", "pool"))]
    engines = {"engine": engine, "head_fix": fixed_head, "fused": fused, "pool": pooled}
    for k, kinds in groups:
        for kind in kinds:
            V[f"{k}:{kind}"] = (lambda e=engines[kind], b=batch[k]: e.logits(b))
    t0 = time.perf_counter()
    with torch.inference_mode():  # warm-up call + op census (deterministic; see harness.count_ops)
        ops = {k: sum(count_ops(f).values()) for k, f in V.items()}
    with torch.inference_mode():
        tm = interleaved(V, rounds, bb.device, warmup=1)
    print(f"# timed {len(V)} variants x {rounds} rounds in {time.perf_counter() - t0:.0f}s\n")
    table(tm.rows(list(V), B, "base", ops), tm.HEADER)
    print(tm.LEGEND)
    print("(engine = service/ today; head_fix = 1; fused = 1+2; pool = 1+2+3)")
    write_json(args.out or RESULTS / "proto_engine.json", {
        "benchmark": "proto_engine", "environment": env, "config": {"batch": B, "seq_len": T, "rounds": rounds},
        "max_abs_diff_vs_engine": worst, "throughput": {k: tm.summary(k, B, base="base") for k in V},
        "aten_ops_per_call": ops,
        "raw_seconds": tm.seconds,
        "raw_cpu_seconds": tm.cpu,
    })


if __name__ == "__main__":
    main()
