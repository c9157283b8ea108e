"""Verbalizers: answer a classification through the backbone's own LM head (PET, LM-BFF).

Each label maps to one or more words; at the answer position of the prompt template (the `{mask}`
token of a masked LM, the last token of a causal LM) the LM head's logits for those words are
averaged per label (PET's multi-word verbalizers). No new output layer is trained, which is why
prompt-based fine-tuning needs so little data. The word -> token id mapping is resolved with the
backbone's tokenizer when the task is built (`training`), and stored with the words; a task
load checks that each stored id is its word (`mismatched_words`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from service.engine.spec import BackboneInfo
from service.engine.template import Template
from service.methods import slots
from service.methods.base import Method, MethodBatch, Problems, TaskWeights, register


@dataclass(frozen=True)
class VerbalizerWeights(TaskWeights):
    method = "verbalizer"
    words: tuple[tuple[str, ...], ...]  # per label
    token_ids: tuple[tuple[int, ...], ...]  # per label, one id per word

    @property
    def num_labels(self) -> int:
        return len(self.token_ids)

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def config(self) -> dict[str, Any]:
        return {"label_words": [list(w) for w in self.words], "token_ids": [list(t) for t in self.token_ids]}

    def label_logits(self, vocab_logits: Tensor) -> Tensor:
        """[n, V] -> [n, labels]: mean logit of each label's words."""
        # one index of every word, sent without waiting (indexing by a list copies it blocking)
        index = slots.to_device([i for ids in self.token_ids for i in ids], vocab_logits.device, torch.long)
        words = vocab_logits.index_select(1, index).split([len(ids) for ids in self.token_ids], dim=1)
        return torch.stack([w.mean(-1) for w in words], dim=-1)


def answer_context(template: Template) -> tuple[str, str]:
    """(the template text right before {mask}, the joiner between it and the word): a label word is
    tokenised after that text, as the model will read it."""
    parts = template.parts
    i = parts.index(("slot", "mask")) if ("slot", "mask") in parts else len(parts)
    if i == 0 or parts[i - 1][0] != "lit":  # {mask} opens the template or directly follows an input
        return "", ""
    before = parts[i - 1][1]
    return before.strip(), " " if before[-1].isspace() else ""


def word_in_context(tokenizer, ctx: str, joiner: str, word: str) -> list[int]:
    """Token ids of `word` as it follows `ctx` (+ `joiner`) in a prompt."""
    if ctx:
        a = tokenizer.encode(ctx, add_special_tokens=False)
        b = tokenizer.encode(ctx + joiner + word, add_special_tokens=False)
        if b[: len(a)] == a and len(b) > len(a):
            return b[len(a):]
    return tokenizer.encode(joiner + word, add_special_tokens=False)


def mismatched_words(weights: VerbalizerWeights, labels: Sequence[str], tokenizer, template: Template) -> list[str]:
    """Each stored (word, token id) that disagree: the words are what a reader of the bundle or of
    `GET /v1/tasks/{task}` sees, the ids are what is scored. An id is its word when the word is
    that one token read in the template's context (what `training.prompting.resolve_verbalizer`
    stores), is that exact vocabulary token ("Ġgreat", "##ible", also what training stores), or
    is that one token read alone, with or without a leading space (a hand-written bundle's id for
    "great" where the template's context gives " great": the same word, spaced otherwise). The
    unknown token is the word only where the word is written as it."""
    ctx, joiner = answer_context(template)
    unk = tokenizer.unk_token_id
    out: list[str] = []
    for label, words, ids in zip(labels, weights.words, weights.token_ids):
        for word, tid in zip(words, ids):
            in_context = word_in_context(tokenizer, ctx, joiner, word)
            readings = (in_context, tokenizer.encode(word, add_special_tokens=False),
                        tokenizer.encode(" " + word, add_special_tokens=False))
            # the exact vocabulary token (not get_vocab(): it copies the whole vocabulary, ~10 ms a load)
            exact = tokenizer.convert_tokens_to_ids(word) == tid and (tid != unk or word == tokenizer.unk_token)
            if exact or (tid != unk and [tid] in readings):
                continue
            where = f" after {ctx!r}" if ctx else ""
            if in_context == [tid]:  # the unknown token: the word is not in the vocabulary
                out.append(f"label {label!r}: word {word!r} is not in the vocabulary: its token id {tid} is the "
                           f"unknown token {tokenizer.convert_ids_to_tokens(tid)!r}")
                continue
            pieces = tokenizer.convert_ids_to_tokens(in_context)
            reads = (f"token {in_context[0]} ({pieces[0]!r})" if len(in_context) == 1 else
                     f"{len(in_context)} tokens {in_context} {pieces}")
            out.append(f"label {label!r}: word {word!r} reads as {reads}{where}, but its token id is {tid} "
                       f"({tokenizer.convert_ids_to_tokens(tid)!r})")
    return out


class VerbalizerBatch(MethodBatch):
    def __init__(self, parts: Sequence[VerbalizerWeights | None], row_part: Tensor):
        self.parts = parts
        self.row_part = row_part
        self.part_of_row: list[int] | None = None  # row_part on the host, when the engine knows it

    def select(self, rows: Tensor) -> "VerbalizerBatch":
        return VerbalizerBatch(self.parts, self.row_part.index_select(0, rows))

    def logits(self, hidden: Tensor, answer: Tensor, lm_head) -> list[Tensor | None]:
        """hidden [B, S, H], answer [B] absolute positions -> per row its label logits (or None)."""
        out: list[Tensor | None] = [None] * hidden.shape[0]
        # on a GPU, reading row_part back would wait here for the whole model to finish
        part_of_row = self.part_of_row if self.part_of_row is not None else self.row_part.tolist()
        for j, p in enumerate(self.parts):
            if p is None:
                continue
            rows = [r for r, k in enumerate(part_of_row) if k == j]
            if not rows:
                continue
            index = slots.to_device(rows, hidden.device, torch.long)
            h = hidden[index, answer.index_select(0, index)]  # [n, H]
            z = p.label_logits(lm_head(h))
            for r, zr in zip(rows, z):
                out[r] = zr
        return out


@register
class Verbalizer(Method):
    name = "verbalizer"
    order = 91
    stage = "output"

    def parse(self, section: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo) -> VerbalizerWeights:
        problems = Problems("verbalizer")
        if not backbone.has_lm_head:
            problems.add("this backbone has no LM head to score label words (load a *ForMaskedLM or *ForCausalLM checkpoint)")
        words, ids = section.get("label_words"), section.get("token_ids")
        ok = (isinstance(words, list) and isinstance(ids, list) and len(words) == len(ids) >= 2
              and all(isinstance(w, list) and isinstance(i, list) and len(w) == len(i) >= 1 for w, i in zip(words, ids)))
        if not ok:
            problems.add("'label_words' and 'token_ids' must be parallel lists (one list of words and ids per label, >= 2 labels)")
            problems.raise_if_any()
        if blank := [w for ws in words for w in ws if not isinstance(w, str) or not w.strip()][:3]:
            problems.add(f"label words {blank} are not words: each must be a non-empty string (the token its id scores)")
        bad = [t for i in ids for t in i if not isinstance(t, int) or not 0 <= t < backbone.vocab_size]
        if bad:
            problems.add(f"token ids {bad[:5]} are outside the backbone's vocabulary of {backbone.vocab_size}")
        owners: dict[int, list[int]] = {}
        for label, label_ids in enumerate(ids):
            for t in dict.fromkeys(label_ids):
                owners.setdefault(t, []).append(label)
        shared = {t: ls for t, ls in owners.items() if len(ls) > 1}
        if shared:  # such labels score the same on that word: as `adaptserve train/zeroshot` refuse it
            t, ls = next(iter(shared.items()))
            word = words[ls[0]][list(ids[ls[0]]).index(t)]
            problems.add(f"token id {t} ({word!r}) is a word of labels {' and '.join(f'#{k}' for k in ls)} (their positions in 'labels'): "
                         "each label needs words of its own, or the labels score the same on it"
                         + (f" ({len(shared) - 1} more shared ids)" if len(shared) > 1 else ""))
        if tensors:
            problems.add(f"a verbalizer has no tensors, found {sorted(tensors)[:3]}")
        problems.raise_if_any()
        return VerbalizerWeights(words=tuple(tuple(w) for w in words), token_ids=tuple(tuple(i) for i in ids))

    def batch(self, parts: Sequence[TaskWeights | None], row_part: Tensor) -> VerbalizerBatch | None:
        if all(p is None for p in parts):
            return None
        return VerbalizerBatch(parts, row_part)  # type: ignore[arg-type]
