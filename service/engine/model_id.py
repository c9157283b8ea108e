"""Which model a name or a path says it is: the backbone's, and a PEFT adapter's base model.

PEFT writes into `base_model_name_or_path` whatever its base model was loaded from: a hub id
(`sentence-transformers/all-MiniLM-L6-v2`, or an ownerless legacy one such as `bert-base-uncased`),
a Hugging Face cache snapshot (`.../models--<owner>--<name>/snapshots/<revision>`, which holds the
hub id), or another local folder. Only the first two say which model they are: another path names
a folder on the machine that trained the adapter (`/tmp/base`, `./checkpoint-500`), so it is not
compared. Names are compared by model name, ignoring case and owner: an owner re-hosting the same
weights (`Xenova/all-MiniLM-L6-v2`) is the same model, and PEFT writes both spellings.

An adapter trained on another model whose layers have this backbone's shapes (another 6-layer,
384-wide MiniLM) loads and answers wrong scores: the shapes cannot tell, only the name can.
"""
from __future__ import annotations

import re
from pathlib import Path

BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# A hub id: `name` or `owner/name`, each of letters, digits, `-`, `_` and `.`, not starting with `-` or
# `.` (the hub's rule; a path starting `./`, `/` or `~` is a local folder), at most 96 characters each.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
_CACHE_PREFIX = "models--"  # the Hugging Face cache keeps a hub model as models--<owner>--<name>/


def _cached_id(parts: list[str]) -> str | None:
    """'owner/name' of a path inside the Hugging Face cache, else None."""
    for part in reversed(parts):
        if part.startswith(_CACHE_PREFIX) and len(part) > len(_CACHE_PREFIX):
            return part[len(_CACHE_PREFIX):].replace("--", "/")  # the hub allows no '--' in a name
    return None


def folder_model_id(path: Path) -> str:
    """The id a backbone folder goes by: the hub id of a Hugging Face cache snapshot, else the folder's name."""
    return _cached_id(list(path.resolve().parts)) or path.name


def model_name(name_or_path: str) -> str | None:
    """'sentence-transformers/all-MiniLM-L6-v2' (or a cache path of it) -> 'all-minilm-l6-v2';
    None for a path that names only a local folder."""
    text = name_or_path.strip().replace("\\", "/")
    hub_id = _cached_id(text.split("/")) or (text if _HUB_ID.fullmatch(text) else None)
    return hub_id.rsplit("/", 1)[-1].lower() if hub_id else None


def other_base_model(base: object, backbone_id: str | None) -> str | None:
    """Why an adapter whose config names `base` as its base model seems trained for another model
    than the backbone known as `backbone_id`, or None: the same model, or either name says nothing."""
    if not isinstance(base, str) or backbone_id is None:
        return None
    theirs, ours = model_name(base), model_name(backbone_id)
    if theirs is None or ours is None or theirs == ours:
        return None
    return (f"the adapter's base_model_name_or_path is {base[:200]!r}, but this server's backbone is "
            f"{backbone_id!r}: an adapter trained on another model can fit this backbone's shapes and still "
            f"answer wrong scores. Train it on {backbone_id!r}; if it was, set base_model_name_or_path to "
            f"{backbone_id!r} in adapter_config.json")
