"""The persistent slot pool: serving reads task weights from device tables written once per task.

The pooled (serving) path must equal the per-batch tables of the training path, keep doing so as
the pool grows (more tasks, larger ranks) and as slots are freed and reused by other tasks.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from service.engine.engine import Engine
from service.engine.types import ClassifyItem, TaskKey
from service.methods import adapter, head, lora, prefix, prompt, slots
from tests.engine.test_mixed_batch import _texts
from tests.factories import (publish, random_adapter, random_head, random_lora, random_method, random_prefix,
                             random_prompt, tiny_backbone)

ATOL = 1e-5


def _publish(engine: Engine, store, name: str, weights: dict, labels: int = 2):
    info = engine.backbone.info
    v = publish(store, name, weights, [f"l{k}" for k in range(labels)], fingerprint=info.fingerprint)
    return engine.load_task(store / name / v, TaskKey(name, v))


def _pooled_vs_built(engine: Engine, tasks, n_rows: int = 24) -> float:
    texts = _texts(n_rows, seed=3)
    items = [ClassifyItem(tasks[i % len(tasks)], t) for i, t in enumerate(texts)]
    batch = engine.tokenize(items)
    pooled = engine.logits(batch)  # inference mode: the slot pool
    with torch.enable_grad():  # grad mode: per-batch tables, as training builds them
        built = [z.detach().float().cpu() for z in engine.full_depth_logits(batch)]
    assert len(pooled) == len(built)
    return max(float((a - b).abs().max()) for a, b in zip(pooled, built))


def test_batch_picks_the_pool_only_when_serving(tmp_path):
    engine = Engine(tiny_backbone("bert", tmp_path))
    g = torch.Generator().manual_seed(0)
    w = random_lora(engine.backbone.info, g, r=4)
    row_part = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        assert isinstance(lora.Lora().batch([w], row_part), lora.PooledLoraBatch)
    with torch.enable_grad():
        assert isinstance(lora.Lora().batch([w], row_part), lora.LoraBatch)
    trainable = lora.LoraWeights(r=w.r, alpha=w.alpha, use_rslora=False,
                                 pairs={k: (a.clone().requires_grad_(), b) for k, (a, b) in w.pairs.items()})
    with torch.no_grad():  # weights still training (e.g. evaluation between steps) never pool
        assert isinstance(lora.Lora().batch([trainable], row_part), lora.LoraBatch)


def test_pooled_equals_per_batch_tables_every_method_and_pooling(tmp_path):
    """Ranks 2..16, adapters of both placements and activations, prefixes, prompts, and heads of
    every pooling kind (mean and pooler with no cls task in the batch) and label count."""
    engine = Engine(tiny_backbone("bert", tmp_path))
    info, g, store = engine.backbone.info, torch.Generator().manual_seed(1), tmp_path / "store"
    tasks = []
    for i, (m, variant) in enumerate([("lora", 0), ("lora", 1), ("adapter", 0), ("adapter", 1), ("prefix", 0), ("prompt", 1)]):
        pooling = ("mean", "pooler")[i % 2]
        w = {m: random_method(m, info, g, variant), "head": random_head(info, g, labels=2 + i % 3, pooling=pooling, dense=i == 3)}
        tasks.append(_publish(engine, store, f"t{i}", w, labels=2 + i % 3))
    tasks.append(_publish(engine, store, "big-rank", {"lora": random_lora(info, g, r=16, sites=("query", "ffn_out")),
                                                     "adapter": random_adapter(info, g, kind="pfeiffer", bottleneck=12, activation="gelu"),
                                                     "head": random_head(info, g, labels=5, pooling="mean")}, labels=5))
    assert _pooled_vs_built(engine, tasks) <= ATOL
    assert _pooled_vs_built(engine, tasks[:1]) <= ATOL  # one task: the no-gather path


def test_pool_grows_and_reuses_slots_without_leaking(tmp_path):
    engine = Engine(tiny_backbone("bert", tmp_path))
    info, g, store = engine.backbone.info, torch.Generator().manual_seed(2), tmp_path / "store"
    first = [_publish(engine, store, f"a{i}", {"lora": random_lora(info, g, r=2 + i % 3), "head": random_head(info, g)})
             for i in range(12)]  # more than the pool's first capacity (8)
    assert _pooled_vs_built(engine, first) <= ATOL
    used = len(lora.POOL)
    del first
    gc.collect()
    second = [_publish(engine, store, f"b{i}", {"lora": random_lora(info, g, r=3, sites=("key",)), "head": random_head(info, g)})
              for i in range(12)]
    # the freed slots are reused (zeroed first: the old tasks' query/value tables must not leak)
    assert _pooled_vs_built(engine, second) <= ATOL
    assert len(lora.POOL) <= used


@dataclass(frozen=True)
class _W:
    t: torch.Tensor

    def tensors(self):
        return {"t": self.t}


def test_slot_pool_tables_pad_and_slice_to_the_batch():
    pool = slots.SlotPool(lambda w: {"k": (w.t,)})
    small, large = _W(torch.ones(2, 3)), _W(torch.full((4, 5), 2.0))
    rows = pool.gather([small], torch.tensor([0, 0]))
    assert rows.single and rows.one("k", 0).shape == (2, 3)
    rows = pool.gather([small, large, None], torch.tensor([1, 0, 2]))
    got = rows.rows("k", 0)  # [3, 4, 5]: sliced to the widest task of this batch
    assert got.shape == (3, 4, 5)
    assert torch.equal(got[0], large.t) and torch.equal(got[2], torch.zeros(4, 5))
    assert torch.equal(got[1, :2, :3], small.t) and float(got[1].sum()) == 6.0  # zero padding
    assert torch.equal(pool.gather([small], torch.tensor([0])).rows("k", 0)[0], small.t)  # still sliced to 2x3
    del large
    gc.collect()
    reused = _W(torch.full((1, 1), 7.0))
    got = pool.gather([reused], torch.tensor([0])).rows("k", 0)
    assert got.shape == (1, 1, 1) and float(got.sum()) == 7.0
    assert len(pool) == 2
    wide = _W(torch.zeros(4, 5))
    got = pool.gather([reused, wide], torch.tensor([0, 1])).rows("k", 0)
    assert float(got[0].sum()) == 7.0  # the reused slot holds nothing of the large task it replaced


def test_batch_width_takes_each_dimension_from_any_task():
    """Tasks of one layout count once; the slice is per dimension the widest of any layout."""
    pool = slots.SlotPool(lambda w: {"k": (w.t,)})
    a, b, c = _W(torch.ones(2, 5)), _W(torch.full((4, 3), 2.0)), _W(torch.full((2, 5), 3.0))
    got = pool.gather([a, b, c], torch.tensor([0, 1, 2, 2])).rows("k", 0)
    assert got.shape == (4, 4, 5)  # 4 from b, 5 from a and c
    assert torch.equal(got[0, :2], a.t) and float(got[0, 2:].abs().sum()) == 0.0
    assert torch.equal(got[1, :, :3], b.t) and float(got[1, :, 3:].abs().sum()) == 0.0
    assert torch.equal(got[3, :2], c.t)
    assert pool.gather([a, c], torch.tensor([0, 1])).rows("k", 0).shape == (2, 2, 5)


def test_pool_capped_in_bytes_evicts_least_recent_unpinned_slots(tmp_path, monkeypatch):
    """Past the byte cap a new task takes the least recently batched slot no batch in flight
    holds; answers stay exact, an evicted task that comes back is written again."""
    engine = Engine(tiny_backbone("bert", tmp_path))
    info, g, store = engine.backbone.info, torch.Generator().manual_seed(4), tmp_path / "store"
    tasks = [_publish(engine, store, f"c{i}", {"lora": random_lora(info, g, r=2), "head": random_head(info, g)}) for i in range(40)]
    pool = slots.SlotPool(lora._pool_entries, slots.Budget(1))  # as small as can be: evict whenever growth is due
    monkeypatch.setattr(lora, "POOL", pool)
    for start in (0, 10, 20, 30, 0, 25):
        assert _pooled_vs_built(engine, tasks[start:start + 10], n_rows=20) <= ATOL
    assert pool.evictions > 0
    assert pool._capacity <= 16  # 10 tasks per batch fit in 16; the cap stopped any doubling past that
    # a batch in flight pins its slots: another batch's new tasks never take them
    held = pool.gather([t.weights["lora"] for t in tasks[:10]], torch.arange(10))
    before = {id(t.weights["lora"]): pool._slot[id(t.weights["lora"])] for t in tasks[:10]}
    pool.gather([t.weights["lora"] for t in tasks[10:30]], torch.arange(20))
    assert all(pool._slot.get(k) == s for k, s in before.items())
    assert held.slot.numel() == 10


def test_a_task_near_the_byte_cap_gets_two_slots_not_eight():
    """The first tables are sized by the cap too: a task of 10 MB under a 12 MB cap (the cache's
    device budget) costs slot 0 and its own slot, not the 8 slots (80 MB) a fresh pool starts with;
    the next task takes its slot instead of growing the tables."""
    big, other = _W(torch.full((64, 100), 1.0)), _W(torch.full((64, 100), 2.0))
    size = big.t.numel() * big.t.element_size()
    pool = slots.SlotPool(lambda w: {"k": (w.t,)}, slots.Budget(size * 3 // 2))
    assert torch.equal(pool.gather([big], torch.tensor([0])).rows("k", 0)[0], big.t)
    assert pool.nbytes() == 2 * size
    assert torch.equal(pool.gather([other], torch.tensor([0])).rows("k", 0)[0], other.t)
    assert pool.nbytes() == 2 * size and pool.evictions == 1
    held = pool.gather([big], torch.tensor([0]))  # pinned: the next task cannot take its slot ...
    assert torch.equal(pool.gather([other], torch.tensor([0])).rows("k", 0)[0], other.t)
    assert pool.nbytes() == 3 * size and held.slot.numel() == 1  # ... so it gets one more slot, no more


_METHODS = (lora, adapter, prefix, prompt, head)


def _fresh_pools(monkeypatch, budget: slots.Budget) -> list[slots.SlotPool]:
    """Empty pools on `budget` in place of every method's pool."""
    pools = [slots.SlotPool(m._pool_entries, budget) for m in _METHODS]
    for m, pool in zip(_METHODS, pools):
        monkeypatch.setattr(m, "POOL", pool)
    return pools


def test_the_methods_pools_share_one_byte_cap(tmp_path, monkeypatch):
    """With tasks of every method, the pools together stay within the one cap (the cache's device
    budget) that `configure` sets (capped each on its own, as before, these five grew to twice it:
    no pool alone reaches the cap). Answers stay exact; the gauge's figure is what the pools hold."""
    engine = Engine(tiny_backbone("bert", tmp_path))
    info, g, store = engine.backbone.info, torch.Generator().manual_seed(5), tmp_path / "store"
    tasks = [_publish(engine, store, f"m{i}", {"lora": random_lora(info, g, r=2),
                                               "adapter": random_adapter(info, g, bottleneck=4),
                                               "prefix": random_prefix(info, g), "prompt": random_prompt(info, g),
                                               "head": random_head(info, g)}) for i in range(12)]
    uncapped = _fresh_pools(monkeypatch, slots.Budget())
    assert _pooled_vs_built(engine, tasks[:2], n_rows=6) <= ATOL
    held = [p.nbytes() for p in uncapped]  # each pool's first tables: 8 slots
    assert all(held)
    # less than the five first tables together, by half the smallest: whichever pool grows last
    # still finds room for 4 slots of its own (a batch of 2 tasks needs 3)
    cap = sum(held) - min(held) // 2
    monkeypatch.setattr(slots, "BUDGET", slots.Budget())
    slots.configure(cap)  # as the service does, from ADAPTSERVE_CACHE_MAX_BYTES
    pools = _fresh_pools(monkeypatch, slots.BUDGET)
    for start in range(0, 24, 2):  # every task twice: more tasks than 8 slots hold
        assert _pooled_vs_built(engine, (tasks + tasks)[start:start + 2], n_rows=6) <= ATOL
        assert sum(p.nbytes() for p in pools) <= cap
    assert sum(p.evictions for p in pools) > 0
    assert slots.pool_bytes() == sum(p.nbytes() for p in pools) > 0


def test_per_batch_tables_map_rows_to_slots_without_reading_the_device():
    # slots.build runs once per (layer, site) per training batch: its row -> slot map is computed
    # on the device from row_part (no host copy, no check read back), and `single` from the part
    # count alone. The values must be what the per-row gather needs.
    a, b = torch.randn(2, 3), torch.randn(4, 3)
    one = slots.build([(a,)], torch.zeros(5, dtype=torch.long))
    assert one.single and one.slot.tolist() == [1] * 5
    torch.testing.assert_close(one.tables[0][1], a)
    row_part = torch.tensor([1, 0, 2, 2, 0])
    mixed = slots.build([(a,), None, (b,)], row_part)  # part 1 has no weights here: slot 0 (zeros)
    assert not mixed.single and mixed.slot.tolist() == [0, 1, 2, 2, 1]
    rows = mixed.rows(0)  # [B, 4, 3]: a zero-padded to b's shape
    assert float(rows[0].abs().sum()) == 0.0
    torch.testing.assert_close(rows[1][:2], a)
    torch.testing.assert_close(rows[2], b)
    assert slots.build([None, None], row_part[:2]) is None


def _rows(pool: slots.SlotPool, tasks) -> torch.Tensor:
    return pool.gather(tasks, torch.arange(len(tasks))).rows("k", 0)


def test_a_widening_is_held_to_the_byte_cap():
    """A task wider than the tables (a larger rank) widens every slot of them: where that would pass
    the cap, the least recently batched slots make way, as they do for growth, and the tables are
    rebuilt to the slots that fit; slots a batch in flight holds stay, and it keeps reading them."""
    narrow = [_W(torch.full((2, 4), float(i + 1))) for i in range(7)]  # 32 bytes a slot
    wide = _W(torch.full((8, 4), 9.0))  # 128 bytes a slot: all 8 slots widened would take 1 KiB
    pool = slots.SlotPool(lambda w: {"k": (w.t,)}, slots.Budget(512))
    for w in narrow:
        _rows(pool, [w])
    assert pool.nbytes() == 8 * 32 and len(pool) == 7
    got = _rows(pool, [wide, narrow[6]])
    # 512 // 128 = 4 slots: slot 0, the wide task and the two most recently batched narrow ones
    assert pool.nbytes() == 512 and len(pool) == 3 and pool.evictions == 5
    assert torch.equal(got[0], wide.t) and torch.equal(got[1, :2], narrow[6].t) and float(got[1, 2:].sum()) == 0
    assert torch.equal(_rows(pool, narrow[:1])[0], narrow[0].t)  # an evicted task comes back, written again
    # every slot pinned by a batch in flight: the widening still happens, past the cap, as growth does
    pool = slots.SlotPool(lambda w: {"k": (w.t,)}, slots.Budget(512))
    held = pool.gather(narrow[:3], torch.arange(3))
    before = held.rows("k", 0).clone()
    got = _rows(pool, [wide])
    assert torch.equal(got[0], wide.t) and len(pool) == 4 and pool.evictions == 0
    assert torch.equal(held.rows("k", 0), before)


def test_the_engine_answers_exactly_while_a_larger_rank_stays_within_the_cap(tmp_path, monkeypatch):
    """LoRA tasks of rank 2 fill the cap, then rank-16 ones arrive among them: the tables widen 8x
    in rank, the pool stays within the cap and the answers equal the per-batch tables'."""
    engine = Engine(tiny_backbone("bert", tmp_path))
    info, g, store = engine.backbone.info, torch.Generator().manual_seed(6), tmp_path / "store"
    small = [_publish(engine, store, f"s{i}", {"lora": random_lora(info, g, r=2), "head": random_head(info, g)}) for i in range(6)]
    large = [_publish(engine, store, f"l{i}", {"lora": random_lora(info, g, r=16), "head": random_head(info, g)}) for i in range(2)]
    budget = slots.Budget()
    pool = slots.SlotPool(lora._pool_entries, budget)
    monkeypatch.setattr(lora, "POOL", pool)
    assert _pooled_vs_built(engine, small, n_rows=12) <= ATOL
    budget.max_bytes = 4 * pool.nbytes()  # 32 slots of rank 2, 4 of rank 16 (8 of them would be 8 times those 8)
    for batch in (small[:2] + large[:1], large, small[2:4] + large[1:], small[3:6], large[:1] + small[:2]):
        assert _pooled_vs_built(engine, batch, n_rows=12) <= ATOL
        assert pool.nbytes() <= budget.max_bytes
    assert pool.evictions > 0


def test_tables_shrink_once_collected_tasks_leave_them_mostly_empty():
    """After a burst of tasks, or a wide one, the tables give memory back when the task cache drops
    those tasks: to twice the slots still in use, as wide as those tasks need, nothing once none is
    left. A batch that took its rows before keeps reading them."""
    pool = slots.SlotPool(lambda w: {"k": (w.t,)}, slots.Budget())
    burst = [_W(torch.full((2, 3), float(i + 1))) for i in range(30)] + [_W(torch.full((6, 6), 9.0))]
    _rows(pool, burst)
    assert pool.nbytes() == 32 * 6 * 6 * 4  # 32 slots, as wide as the wide task
    kept = [burst[0], burst[29]]
    held = pool.gather(kept, torch.arange(2))
    before = held.rows("k", 0).clone()
    del burst[1:]
    gc.collect()
    got = _rows(pool, kept + [_W(torch.full((1, 1), 5.0))])
    assert pool.nbytes() == 6 * 2 * 3 * 4  # 2 x (2 tasks left + slot 0) slots of 2x3; the new task took one
    assert torch.equal(got[0], kept[0].t) and torch.equal(got[1], kept[1].t) and float(got[2].sum()) == 5.0
    assert torch.equal(held.rows("k", 0), before)
    del burst, kept, got
    gc.collect()
    fresh = _W(torch.ones(1, 2))
    assert torch.equal(_rows(pool, [fresh])[0], fresh.t)
    assert pool.nbytes() == 8 * 1 * 2 * 4  # the others gone: the tables started afresh, at this task's size


def test_a_pool_claims_a_fair_share_of_the_cap_from_one_that_took_it_all():
    """One method's pool filled the cap in a burst; another method's pool then claims up to an even
    share (the first gives back its least recently batched slots) instead of evicting on every new task."""
    budget = slots.Budget(1024)
    first, second = (slots.SlotPool(lambda w: {"k": (w.t,)}, budget) for _ in range(2))
    burst = [_W(torch.full((2, 4), float(i + 1))) for i in range(31)]  # 32 bytes a slot: 32 slots fill the cap
    _rows(first, burst)
    assert first.nbytes() == 1024
    working_set = [_W(torch.full((2, 4), -float(i + 1))) for i in range(14)]
    for _ in range(3):
        for w in working_set:
            assert torch.equal(_rows(second, [w])[0], w.t)
    assert second.evictions == 0 and second.nbytes() == 512  # its share, 16 slots: all 14 tasks stay pooled
    assert first.nbytes() + second.nbytes() <= 1024
    assert first.evictions == 16 and len(first) == 15  # its least recently batched ones went
    got = _rows(first, burst[16:])
    assert all(torch.equal(got[i], w.t) for i, w in enumerate(burst[16:]))
    assert first.evictions == 16  # the most recent stayed
