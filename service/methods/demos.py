"""Demonstrations (LM-BFF, Gao et al., 2021): labelled examples shown inside the prompt.

A prompt task (template + verbalizer) may carry a pool of labelled examples. For each input the
engine picks, per class, the pool example whose sentence embedding is most similar to the input's
(cosine of mean-pooled all-MiniLM-L6-v2 embeddings, LM-BFF's "similarity-based" selection with
SBERT), never the input itself, and appends each one as its own copy of the template with its label
word in place of `{mask}` (`Template.encode_with_demos`). The rewrite happens at tokenisation, so
training (which runs `Engine.tokenize`) and serving see the same prompt for the same input.

LM-BFF samples demonstrations from the top half of the most similar examples at training time and
ensembles over samples at test time; here the choice is deterministic (the nearest per class), so
one forward per input serves and the trained prompt is the served prompt.

The pool is stored in the bundle: texts and labels in the config, their unit-norm embeddings as
the tensor `demos.embeddings` [N, E] (so serving never re-embeds the pool), plus the fingerprint
of the sentence encoder that made them (a different encoder would give incomparable vectors).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from service.engine.spec import BackboneInfo
from service.engine.truncation import cut_pairs
from service.methods.base import Method, Problems, TaskWeights, register, take

if TYPE_CHECKING:
    from service.engine.backbone import Backbone

# sentence-transformers runs all-MiniLM-L6-v2 with max_seq_length 256 (its sentence_bert_config.json).
SENTENCE_MAX_LENGTH = 256
MAX_POOL = 4096  # a server limit: the pool lives in the bundle's config and is scanned per input


@dataclass(frozen=True)
class Demo:
    """One demonstration placed in a prompt: its text(s) and the token id of its label word."""

    text: str
    text_pair: str | None
    word_id: int


@dataclass(frozen=True)
class DemosWeights(TaskWeights):
    method = "demos"
    texts: tuple[str, ...]
    text_pairs: tuple[str, ...] | None
    labels: tuple[int, ...]  # label index of each pool example
    embeddings: Tensor  # [N, E] unit-norm sentence embeddings of the pool
    encoder: str  # fingerprint of the sentence encoder that embedded the pool
    encoder_name: str = field(default="", compare=False)

    def tensors(self) -> dict[str, Tensor]:
        return {"demos.embeddings": self.embeddings}

    def trainable_params(self) -> int:
        return 0  # a pool of examples, not trained weights

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"texts": list(self.texts), "labels": list(self.labels), "per_class": 1,
                               "encoder": {"fingerprint": self.encoder, "name": self.encoder_name, "pooling": "mean"}}
        if self.text_pairs is not None:
            cfg["text_pairs"] = list(self.text_pairs)
        return cfg

    def pick(self, query: Tensor, texts: Sequence[str], pairs: Sequence[str | None], label_words: Sequence[int]) -> list[list[Demo]]:
        """query [n, E] unit-norm -> per input, one `Demo` per label (in label order): the pool
        example of that label with the highest cosine similarity, the input itself excluded.
        A label with no (other) example in the pool is left out."""
        # Scored on the device, chosen on the host: one copy back per batch, not a device read per
        # row and label (on a GPU each of those waits for the queue).
        sim = (query.to(self.embeddings) @ self.embeddings.T).float().cpu()  # [n, N] cosine similarities
        pool_pairs = self.text_pairs or (None,) * len(self.texts)
        same = torch.tensor([[t == pt and p == pp for pt, pp in zip(self.texts, pool_pairs)] for t, p in zip(texts, pairs)],
                            dtype=torch.bool).reshape(sim.shape)
        sim = sim.masked_fill(same, float("-inf"))  # never the input as its own demonstration
        out: list[list[Demo]] = [[] for _ in texts]
        for c, word in enumerate(label_words):
            members = [j for j, label in enumerate(self.labels) if label == c]
            if not members:
                continue
            best_sim, best = sim[:, members].max(dim=1)  # [n]
            for r, (score, k) in enumerate(zip(best_sim.tolist(), best.tolist())):
                if score > float("-inf"):
                    j = members[k]
                    out[r].append(Demo(self.texts[j], pool_pairs[j], word))
        return out


@register
class Demos(Method):
    name = "demos"
    order = 5
    # Not an encoder hook and not an output: it rewrites the input text before tokenisation
    # (`Engine.tokenize`), so `Engine.plan` (which batches "encoder" methods) skips it.
    stage = "input"

    def parse(self, section: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo) -> DemosWeights:
        problems = Problems("demos")
        texts, labels, pairs = section.get("texts"), section.get("labels"), section.get("text_pairs")
        ok = (isinstance(texts, list) and isinstance(labels, list) and len(texts) == len(labels) >= 1
              and all(isinstance(t, str) for t in texts)
              and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in labels))
        if not ok:
            problems.add("'texts' and 'labels' must be parallel, non-empty lists of strings and label indices")
            problems.raise_if_any()
        if len(texts) > MAX_POOL:
            problems.add(f"the pool has {len(texts)} examples; at most {MAX_POOL} are served")
        if pairs is not None and not (isinstance(pairs, list) and len(pairs) == len(texts) and all(isinstance(p, str) for p in pairs)):
            problems.add("'text_pairs' must list one string per pool text")
        if section.get("per_class", 1) != 1:
            problems.add("only one demonstration per class ('per_class': 1) is supported")
        enc = section.get("encoder")
        if not (isinstance(enc, dict) and isinstance(enc.get("fingerprint"), str)):
            problems.add("'encoder.fingerprint' must name the sentence encoder that embedded the pool")
            enc = {"fingerprint": ""}
        emb = tensors.get("demos.embeddings")
        dim = emb.shape[1] if emb is not None and emb.dim() == 2 else 0
        emb = take(tensors, "demos.embeddings", (len(texts), dim), problems)
        extra = sorted(set(tensors) - {"demos.embeddings"})
        if extra:
            problems.add(f"unrecognised demos tensors {extra}")
        problems.raise_if_any()
        return DemosWeights(texts=tuple(texts), text_pairs=None if pairs is None else tuple(pairs), labels=tuple(labels),
                            embeddings=emb.to(device=backbone.device, dtype=torch.float32).contiguous(),
                            encoder=enc["fingerprint"], encoder_name=str(enc.get("name", "")))

    def batch(self, parts: Sequence[TaskWeights | None], row_part: Tensor) -> None:
        return None  # nothing happens inside the forward


# -- the sentence encoder ----------------------------------------------------------------------------
class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a plain encoder backbone: how
    sentence-transformers runs all-MiniLM-L6-v2 (mean over every non-padding token, [CLS] and
    [SEP] included), computed with the engine's own encoder forward."""

    def __init__(self, backbone: "Backbone"):
        self.backbone = backbone
        self._lock = threading.Lock()  # the fast tokenizer is not thread-safe

    @property
    def fingerprint(self) -> str:
        return self.backbone.fingerprint

    @property
    def name(self) -> str:
        return self.backbone.name

    def embed(self, texts: Sequence[str], pairs: Sequence[str | None] | None = None, batch_size: int = 64) -> Tensor:
        """[n, E] float32 unit-norm embeddings on the backbone's device (never tracks gradients)."""
        from service.engine.encoder import Plan

        b = self.backbone
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                chunk = list(texts[i : i + batch_size])
                second = None if pairs is None or all(p is None for p in pairs[i : i + batch_size]) else \
                    [p or "" for p in pairs[i : i + batch_size]]
                with self._lock:
                    if second is not None:  # as Engine.tokenize: cut long sides before the pair truncation
                        chunk, second = cut_pairs(b.tokenizer, chunk, second, SENTENCE_MAX_LENGTH)
                    enc = b.tokenizer(chunk, second, truncation=True, max_length=SENTENCE_MAX_LENGTH, padding=True,
                                      return_tensors="pt")
                mask = enc["attention_mask"].to(b.device)
                types = enc.get("token_type_ids")
                if b.family.embeddings.token_type is None or types is None:
                    types = None
                else:
                    types = types.to(b.device)
                st = b.encoder.forward(enc["input_ids"].to(b.device), mask, types, Plan())
                w = mask.unsqueeze(-1).to(st.hidden.dtype)  # [n, T, 1]
                mean = (st.hidden * w).sum(1) / w.sum(1).clamp(min=1)  # [n, H]
                out.append(torch.nn.functional.normalize(mean.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, b.info.hidden_size, device=b.device)


_SHARED: dict[str, SentenceEncoder] = {}
_SHARED_LOCK = threading.Lock()


def bundled_sentence_encoder(device: torch.device | str) -> SentenceEncoder:
    """The bundled all-MiniLM-L6-v2 as a sentence encoder on `device`, fp32, loaded once per
    process and device (every Engine in the process shares it: it is frozen and read-only)."""
    key = str(torch.device(device))
    with _SHARED_LOCK:
        if key not in _SHARED:
            from service.engine.backbone import load_backbone

            _SHARED[key] = SentenceEncoder(load_backbone(None, device=key, dtype="float32"))
        return _SHARED[key]
