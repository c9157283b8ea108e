"""Truncation: cutting long pair sides before the tokenizer changes no id, and the template's
longest-first cut keeps what the one-token-at-a-time rule kept."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers as T

from service.engine.bundle import write_bundle
from service.engine.truncation import GAP, MARGIN, cut_pairs, longest_first
from service.engine.types import ClassifyItem, TaskKey
from tests.factories import random_head

WORDS = ["the", "film", "was", "unbelievably", "good", "bad", "antidisestablishmentarianism", "x", "naïve", "Ωmega",
         "漢字", "テスト", "😀", "co-operate", "it's", "1999", "...", "—", "a" * 120]


def _text(rng: random.Random, n_words: int) -> str:
    spaced = rng.random() < 0.7
    return (" " if spaced else "").join(rng.choice(WORDS) for _ in range(n_words))


def _bpe_tokenizer() -> T.PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2 style): a cut inside a word can change merges there."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    tok.train_from_iterator([_text(rng, 20) for _ in range(300)], trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


@pytest.fixture(scope="module", params=["minilm-wordpiece", "byte-level-bpe"])
def tokenizer(request, minilm_backbone):
    return minilm_backbone.tokenizer if request.param == "minilm-wordpiece" else _bpe_tokenizer()


def test_cut_sides_change_no_id_of_a_truncated_pair(tokenizer) -> None:
    rng = random.Random(1)
    cut_any = False
    for _ in range(60):
        max_length = rng.choice([4, 8, 16, 33, 64])
        firsts = [_text(rng, rng.randint(0, 150)) for _ in range(3)]
        seconds = [_text(rng, rng.randint(0, 150)) for _ in range(2)]
        seconds.append(firsts[2] if rng.random() < 0.5 else firsts[2] + " x")  # equal sides, or one token apart
        a, b = cut_pairs(tokenizer, firsts, seconds, max_length)
        cut_any |= a != firsts or b != seconds
        assert all(x.startswith(y) for x, y in zip(firsts + seconds, a + b))  # a cut keeps a prefix
        assert tokenizer(a, b, truncation=True, max_length=max_length)["input_ids"] == \
            tokenizer(firsts, seconds, truncation=True, max_length=max_length)["input_ids"]
    assert cut_any


def test_the_side_that_wins_the_odd_token_keeps_more(tokenizer) -> None:
    long, longer, short = "漢 " * 3000, "漢 " * 3001, "short"
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    (a,), (b,) = cut_pairs(tokenizer, [longer], [long], 8)
    assert (count(a), count(b)) == (8 + MARGIN + GAP, 8 + MARGIN)
    (a,), (b,) = cut_pairs(tokenizer, [long], [long], 8)  # equals: the second side wins
    assert (count(a), count(b)) == (8 + MARGIN, 8 + MARGIN + GAP)
    (a,), (b,) = cut_pairs(tokenizer, [short], [long], 8)
    assert (a, count(b)) == (short, 8 + MARGIN + GAP)
    assert cut_pairs(tokenizer, ["x" * 8, "y"], ["z", "w" * 8], 8) == (["x" * 8, "y"], ["z", "w" * 8])  # short pairs


def test_long_pairs_reach_the_tokenizer_cut(minilm_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pair of 4,000-character sides at max_length 8 held the forward thread for over a minute
    in the tokenizer's own pair truncation; it now sees sides of max_length + MARGIN (+ GAP) tokens."""
    tok = minilm_engine.backbone.tokenizer
    seen: list[tuple[list[str], list[str]]] = []
    real_call = type(tok).__call__

    def spy(self, text=None, text_pair=None, **kwargs):
        if text_pair is not None and kwargs.get("truncation"):
            seen.append((list(text), list(text_pair)))
        return real_call(self, text, text_pair, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", spy)
    info = minilm_engine.backbone.info
    cfg = {"labels": ["no", "yes"], "input_kind": "pair", "max_length": 8, "backbone": {"fingerprint": info.fingerprint}}
    version = write_bundle(tmp_path, "pairs", cfg, {"head": random_head(info, torch.Generator().manual_seed(0), labels=2)})
    task = minilm_engine.load_task(tmp_path / "pairs" / version, TaskKey("pairs", version))
    side = "漢" * 4000
    batch = minilm_engine.tokenize([ClassifyItem(task, side, side)])
    assert batch.input_ids.shape[1] == 8
    ((firsts, seconds),) = seen
    assert [len(real_call(tok, s, add_special_tokens=False)["input_ids"]) for s in firsts + seconds] == [8 + MARGIN, 8 + MARGIN + GAP]


def _one_at_a_time(lengths: list[int], budget: int) -> list[int]:
    kept = list(lengths)
    while sum(kept) > budget:
        i = max(range(len(kept)), key=lambda k: kept[k])
        kept[i] -= 1
    return kept


def test_longest_first_is_the_one_token_at_a_time_rule() -> None:
    rng = random.Random(2)
    for _ in range(2000):
        lengths = [rng.choice([0, 1, 2, 5, 7, 40, 41, 300]) for _ in range(rng.randint(1, 5))]
        budget = rng.randint(0, sum(lengths) + 3)
        assert longest_first(lengths, budget) == _one_at_a_time(lengths, budget), (lengths, budget)
