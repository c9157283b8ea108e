"""The demonstration pool of a prompt task (LM-BFF): the training examples, embedded once.

Serving picks demonstrations from this pool (`service/methods/demos.py`); training builds it from
the training split with the same sentence encoder the engine will use to embed each input, and
stores the embeddings in the bundle so the service never re-embeds the pool.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from service.methods.demos import MAX_POOL, DemosWeights
from training.config import ConfigError

if TYPE_CHECKING:
    from service.engine.engine import Engine
    from training.data import LabelledData


def build_pool(engine: "Engine", data: "LabelledData") -> DemosWeights:
    """Every row of `data` as a demonstration candidate, with its unit-norm MiniLM embedding."""
    if len(data) > MAX_POOL:
        raise ConfigError(f"--demos keeps the training set as the demonstration pool; {len(data)} rows exceed the "
                          f"served limit of {MAX_POOL} (demonstrations are for few-shot training sets)")
    encoder = engine.sentence_encoder()
    emb = encoder.embed(list(data.texts), list(data.text_pairs) if data.text_pairs is not None else None)
    return DemosWeights(texts=tuple(data.texts), text_pairs=data.text_pairs, labels=tuple(data.label_ids),
                        embeddings=emb.detach().float().contiguous(), encoder=encoder.fingerprint,
                        encoder_name=encoder.name)
