"""Tokenising before the queue (`Engine.pretokenize`): the forward then only pads the rows, and
what it computes is what it computed when it tokenised them itself."""
from __future__ import annotations

import random
import threading
import pytest
import torch

from service.engine.backbone import load_backbone
from service.engine.bundle import write_bundle
from service.engine.engine import Engine
from service.engine.types import INLINE_TOKENIZE_CHARS, ClassifyItem, TaskKey
from service.methods.demos import DemosWeights, bundled_sentence_encoder
from tests.factories import WORDS, publish, random_head, random_lora, save_tiny_lm, verbalizer_task


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def minilm_rows(minilm_engine, tmp_path_factory: pytest.TempPathFactory) -> list[ClassifyItem]:
    """Rows of three tasks in one batch: single texts at two max_lengths and a pair task, some
    rows over their max_length (truncated), pairs with one long side."""
    engine = minilm_engine
    info = engine.backbone.info
    store = tmp_path_factory.mktemp("pretok")
    g = torch.Generator().manual_seed(0)
    tasks = []
    for name, kind, max_length in (("short", "single", 8), ("long", "single", 64), ("nli", "pair", 24)):
        v = publish(store, name, {"lora": random_lora(info, g), "head": random_head(info, g)}, ["a", "b"],
                    input_kind=kind, max_length=max_length, fingerprint=info.fingerprint)
        tasks.append(engine.load_task(store / name / v, TaskKey(name, v)))
    rng = random.Random(0)
    rows = []
    for k in range(12):
        task = tasks[k % 3]
        pair = _text(rng, rng.choice((2, 60))) if task.input_kind == "pair" else None
        rows.append(ClassifyItem(task, _text(rng, rng.randint(1, 40)), pair))
    return rows


@pytest.fixture(scope="module")
def mlm_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, list[ClassifyItem]]:
    """A masked-LM engine with a template task and an LM-BFF task (demonstrations)."""
    root = tmp_path_factory.mktemp("pretok-mlm")
    engine = Engine(load_backbone(save_tiny_lm("mlm", root / "lm"), device="cpu", dtype="float32"))
    vw = verbalizer_task(engine.backbone.tokenizer, {"n": ["bad"], "p": ["good"]})
    cfg = {"labels": ["n", "p"], "max_length": 24, "template": "{text} it was {mask} ."}
    enc = bundled_sentence_encoder("cpu")
    texts = ("good fun day", "bad boring plot")
    demos = DemosWeights(texts=texts, text_pairs=None, labels=(1, 0), embeddings=enc.embed(list(texts)), encoder=enc.fingerprint)
    plain = write_bundle(root / "store", "prompt", cfg, {"verbalizer": vw})
    lmbff = write_bundle(root / "store", "lmbff", cfg, {"verbalizer": vw, "demos": demos})
    tasks = [engine.load_task(root / "store" / "prompt" / plain, TaskKey("prompt", plain)),
             engine.load_task(root / "store" / "lmbff" / lmbff, TaskKey("lmbff", lmbff))]
    rng = random.Random(1)
    engine.store = root / "store"  # for tests that load the tasks again
    return engine, [ClassifyItem(tasks[k % 2], _text(rng, rng.randint(1, 30))) for k in range(6)]


def _same_batch(a, b) -> None:
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert (a.token_type_ids is None) == (b.token_type_ids is None)
    if a.token_type_ids is not None:
        assert torch.equal(a.token_type_ids, b.token_type_ids)
    assert torch.equal(a.answer_pos, b.answer_pos) and torch.equal(a.row_part, b.row_part)
    assert [t.key for t in a.tasks] == [t.key for t in b.tasks]


def test_pretokenized_rows_make_the_batch_the_forward_made(minilm_engine, minilm_rows) -> None:
    engine = minilm_engine
    assert any(len(engine.tokenize([it]).input_ids[0]) == it.task.spec.max_length for it in minilm_rows)  # some truncated
    ready = engine.pretokenize(minilm_rows)
    assert all(it.encoded is not None for it in ready)
    _same_batch(engine.tokenize(ready), engine.tokenize(minilm_rows))
    mixed = [ready[k] if k % 2 else minilm_rows[k] for k in range(len(ready))]  # some rows tokenised, some not
    _same_batch(engine.tokenize(mixed), engine.tokenize(minilm_rows))


def test_template_and_demonstration_rows_too(mlm_rows) -> None:
    engine, rows = mlm_rows
    ready = engine.pretokenize(rows)
    _same_batch(engine.tokenize(ready), engine.tokenize(rows))
    assert int(engine.tokenize(ready).answer_pos.max()) > 0  # the answer slot is carried, not reset
    for a, b in zip(engine.classify(ready), engine.classify(rows)):
        assert a.logits == b.logits


def test_the_inline_lane_takes_short_plain_rows_only(minilm_engine, minilm_rows, mlm_rows) -> None:
    engine = minilm_engine
    short = [it for it in minilm_rows if len(it.text) + len(it.text_pair or "") < INLINE_TOKENIZE_CHARS // 8][:4]
    inline = engine.pretokenize_inline(short)
    assert inline is not None
    assert [it.encoded for it in inline] == [it.encoded for it in engine.pretokenize(short)]
    long = [ClassifyItem(short[0].task, "word " * (INLINE_TOKENIZE_CHARS // 5 + 1))]
    assert engine.pretokenize_inline(long) is None  # over the characters an event loop should spend
    mlm, rows = mlm_rows
    assert mlm.pretokenize_inline([it for it in rows if "demos" not in it.task.weights]) is not None
    assert mlm.pretokenize_inline(rows) is None  # demonstrations: a sentence-encoder forward


def test_the_inline_lane_never_waits(minilm_engine, minilm_rows) -> None:
    """While another caller holds the loop's tokenizer copy, the loop is told to use a thread."""
    engine = minilm_engine
    engine.warmup()  # the copy exists before the first request
    with engine._inline_lock:
        assert engine.pretokenize_inline(minilm_rows[:1]) is None
    assert engine.pretokenize_inline(minilm_rows[:1]) is not None


def test_a_forward_of_pretokenized_rows_never_takes_the_tokenizer(minilm_engine, minilm_rows) -> None:
    """The shared tokenizer busy (a long request being tokenised) does not hold up a forward of
    rows tokenised before they were queued, and its answers are the same."""
    engine = minilm_engine
    ready = engine.pretokenize(minilm_rows)
    expected = engine.classify(minilm_rows)
    got: list = []
    with engine._tok_lock:
        worker = threading.Thread(target=lambda: got.extend(engine.classify(ready)))
        worker.start()
        worker.join(timeout=60)
        finished = not worker.is_alive()
    worker.join()
    assert finished, "the forward waited for the tokenizer"
    assert [p.logits for p in got] == [p.logits for p in expected]


def test_long_pairs_are_cut_before_the_queue_as_the_forward_cut_them(minilm_engine, minilm_rows) -> None:
    engine = minilm_engine
    pair_task = next(it.task for it in minilm_rows if it.text_pair is not None)
    long = [ClassifyItem(pair_task, "good " * 700, "bad " * 700) for _ in range(8)]
    ready = engine.pretokenize(long)
    assert all(len(it.encoded.ids) == pair_task.spec.max_length for it in ready)
    assert [p.label for p in engine.classify(ready)] == [p.label for p in engine.classify(long)]


def test_a_task_load_takes_the_tokenizer_lock_for_its_template_check(mlm_rows) -> None:
    """Loading a template task tokenises its template (does it fit max_length?) on a cache loader
    thread. Unlocked, that call rewrote the shared tokenizer's truncation settings under a request
    being tokenised in a worker thread, whose rows then went untruncated."""
    engine, rows = mlm_rows
    key = next(it.task.key for it in rows if "demos" not in it.task.weights)
    loaded: list = []
    with engine._tok_lock:  # a request's rows being tokenised
        loader = threading.Thread(target=lambda: loaded.append(engine.load_task(engine.store / key.name / key.version, key)))
        loader.start()
        loader.join(timeout=1.0)
        waited = loader.is_alive()
    loader.join(timeout=60)
    assert waited, "the load used the tokenizer without its lock"
    assert loaded and loaded[0].key == key
