"""Soft prompts (prompt tuning, Lester et al., 2021): P trainable input embeddings prepended to
the token embeddings. Position and token-type embeddings are added on top, as HF PEFT does.

In a batch each row gets its own task's prompt; rows are laid out as [prompt_b, text_b, pad] and
padded to the longest prompt (see `Encoder.embed`); rows without a prompt have length 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from service.engine.spec import BackboneInfo
from service.methods import slots
from service.methods.base import Method, MethodBatch, Problems, TaskWeights, register, take, trainable

if TYPE_CHECKING:
    from service.engine.backbone import Backbone

MAX_VIRTUAL_TOKENS = 256  # a server limit: longer prompts cost more than they have been shown to help
# Lester et al. (2021) initialise prompts from "the 5,000 most common tokens" of the vocabulary.
COMMON_TOKENS = 5000


def sample_token_ids(tokenizer, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n ids drawn (with replacement) from the vocabulary's first COMMON_TOKENS whole-word tokens.

    WordPiece and BPE vocabularies number their tokens roughly by frequency (BERT's words start
    at "the"; BPE ids follow merge order), so the first whole-word, alphabetic, non-special ids
    stand in for "most common" without a corpus. [n] long, on the CPU."""
    special = set(tokenizer.all_special_ids)
    words = []
    for tid in range(len(tokenizer)):
        piece = tokenizer.convert_ids_to_tokens(tid)
        word = piece.lstrip("\u0120\u2581")  # BPE / SentencePiece word-start markers
        if tid not in special and len(word) > 1 and word.isalpha() and not piece.startswith(("##", "[", "<")):
            words.append(tid)
            if len(words) == COMMON_TOKENS:
                break
    if not words:
        raise ValueError("the tokenizer has no whole-word tokens to initialise virtual tokens from")
    pick = torch.randint(len(words), (n,), generator=generator)
    return torch.tensor(words, dtype=torch.long)[pick]


@dataclass(frozen=True)
class PromptWeights(TaskWeights):
    method = "prompt"
    embeddings: Tensor  # [P, E]

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def positions_used(self) -> int:
        return self.num_virtual_tokens

    @classmethod
    def init(cls, backbone: "Backbone", *, num_virtual_tokens: int, generator: torch.Generator | None = None) -> "PromptWeights":
        """Fresh trainable prompt: the input embeddings of random common vocabulary tokens
        (Lester et al., 2021, "sampled vocab" init), so it starts inside the embedding manifold."""
        if not isinstance(num_virtual_tokens, int) or not 1 <= num_virtual_tokens <= MAX_VIRTUAL_TOKENS:
            raise ValueError(f"prompt length must be an integer in [1, {MAX_VIRTUAL_TOKENS}], got {num_virtual_tokens!r}")
        ids = sample_token_ids(backbone.tokenizer, num_virtual_tokens, generator)
        table = backbone.family.embeddings.word.weight  # [V, E]
        emb = table.detach().index_select(0, ids.to(table.device)).clone()  # [P, E]
        return cls(embeddings=trainable(emb, backbone.info))

    def tensors(self) -> dict[str, Tensor]:
        return {"prompt.embeddings": self.embeddings}

    def config(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens}


def _pool_entries(w: "PromptWeights") -> dict:
    e = w.embeddings  # [P, E]
    return {("embeddings", e.shape[1], e.device, e.dtype): (e,)}


POOL = slots.SlotPool(_pool_entries)


class PromptBatch(MethodBatch):
    def __init__(self, parts: Sequence[PromptWeights | None], row_part: Tensor, _built=None):
        self.parts = parts
        self.row_part = row_part
        if _built is not None:  # select(): reuse the tables, slice the per-row state
            self.table, self.lengths = _built
            return
        if slots.poolable(parts):
            self.table = slots.OneKey(POOL.gather(parts, row_part))
        else:
            self.table = slots.build([None if p is None else (p.embeddings,) for p in parts], row_part)
        lengths = slots.to_device([0 if p is None else p.num_virtual_tokens for p in parts], row_part.device)
        self.lengths = lengths.index_select(0, row_part)  # [B]

    def prompt(self) -> tuple[Tensor, Tensor]:
        return self.table.rows(0), self.lengths  # [B, Pmax, E], [B]

    def select(self, rows: Tensor) -> "PromptBatch":
        return PromptBatch(self.parts, self.row_part.index_select(0, rows),
                           _built=(self.table.select(rows), self.lengths.index_select(0, rows)))


@register
class Prompt(Method):
    name = "prompt"
    order = 30

    def parse(self, section: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo) -> PromptWeights:
        problems = Problems("prompt")
        p = section.get("num_virtual_tokens")
        if not isinstance(p, int) or not 1 <= p <= MAX_VIRTUAL_TOKENS:
            problems.add(f"'num_virtual_tokens' must be an integer in [1, {MAX_VIRTUAL_TOKENS}], got {p!r}")
            problems.raise_if_any()
        extra = sorted(set(tensors) - {"prompt.embeddings"})
        if extra:
            problems.add(f"unrecognised prompt tensors {extra}")
        emb = take(tensors, "prompt.embeddings", (p, backbone.embedding_size), problems)
        problems.raise_if_any()
        return PromptWeights(embeddings=emb.to(device=backbone.device, dtype=backbone.dtype).contiguous())

    def batch(self, parts: Sequence[TaskWeights | None], row_part: Tensor) -> PromptBatch | None:
        if all(p is None for p in parts):
            return None
        return PromptBatch(parts, row_part)  # type: ignore[arg-type]
