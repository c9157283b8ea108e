"""Verbalizers: answer a classification through the backbone's own LM head (PET, LM-BFF).

Each label maps to one or more words; at the answer position of the prompt template (the `{mask}`
token of a masked LM, the last token of a causal LM) the LM head's logits for those words are
averaged per label (PET's multi-word verbalizers). No new output layer is trained, which is why
prompt-based fine-tuning needs so little data. The word -> token id mapping is resolved with the
backbone's tokenizer when the task is built (`training`), and stored with the words.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from service.engine.spec import BackboneInfo
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
        return torch.stack([vocab_logits[:, list(ids)].mean(-1) for ids in self.token_ids], dim=-1)


class VerbalizerBatch(MethodBatch):
    def __init__(self, parts: Sequence[VerbalizerWeights | None], row_part: Tensor):
        self.parts = parts
        self.row_part = row_part

    def select(self, rows: Tensor) -> "VerbalizerBatch":
        return VerbalizerBatch(self.parts, self.row_part.index_select(0, rows))

    def logits(self, hidden: Tensor, answer: Tensor, lm_head) -> list[Tensor | None]:
        """hidden [B, S, H], answer [B] absolute positions -> per row its label logits (or None)."""
        out: list[Tensor | None] = [None] * hidden.shape[0]
        for j, p in enumerate(self.parts):
            if p is None:
                continue
            rows = (self.row_part == j).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            h = hidden[rows, answer[rows]]  # [n, H]
            z = p.label_logits(lm_head(h))
            for r, zr in zip(rows.tolist(), z):
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
