"""Prompt-based tasks: a template and a verbalizer instead of a new classification head.

    adaptserve train --method lora --template "{text} It was {mask}" \\
        --verbalizer "negative=terrible;positive=great" --backbone model.gguf ...

The task's input is rendered through the template (`service/engine/template.py`) and its label
scores are the backbone's own LM-head logits for each label's words at the answer position
(`service/methods/verbalizer.py`): PET (Schick & Schuetze, 2021) and LM-BFF (Gao et al., 2021).
Training tunes LoRA / soft-prompt / adapter weights through that same forward; nothing new is
added at the output, which is why it needs so little data.

A verbalizer word must be ONE token of the backbone's tokenizer, read in context: after the
template text before `{mask}` (so a byte-level BPE model scores " great", the word with its
leading space, when the template has a space before `{mask}`). A word that is not one token is an
error that lists single-token alternatives; an exact vocabulary token ("Ġgreat", "##ible") is
accepted as written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from service.engine.template import Template, TemplateError
from service.methods.verbalizer import VerbalizerWeights, answer_context, word_in_context
from training.config import ConfigError

if TYPE_CHECKING:
    from service.engine.backbone import Backbone
    from service.engine.engine import Engine
    from service.methods.base import TaskWeights
    from training.data import LabelledData


class VerbalizerError(ConfigError):
    """A verbalizer that does not fit the labels or the backbone's vocabulary."""


# -- reading a verbalizer ----------------------------------------------------------------------------
_ONE_ENTRY = " (a label's several words go in one entry: \"negative=terrible,bad\")"


def parse_verbalizer(spec: str | Path | Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Label -> words, from `"negative=terrible,bad;positive=great,good"`, a JSON object (inline or
    a .json file: `{"negative": ["terrible", "bad"], "positive": "great"}`) or a mapping."""
    if isinstance(spec, Mapping):
        raw: Any = dict(spec)
    else:
        text = str(spec).strip()
        path = Path(text)
        if text.endswith(".json") or (len(text) < 4096 and path.is_file()):
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as err:
                raise VerbalizerError(f"--verbalizer {spec}: cannot read the file: {err.strerror or err}") from None
            except UnicodeDecodeError:
                raise VerbalizerError(f"--verbalizer {spec}: the file is not UTF-8") from None
        if text.lstrip().startswith("{"):
            try:
                raw = json.loads(text, object_pairs_hook=lambda pairs: unique_labels(pairs, "--verbalizer", _ONE_ENTRY))
            except json.JSONDecodeError as err:
                raise VerbalizerError(f"--verbalizer: not valid JSON: {err}") from None
        else:
            entries = []
            for part in filter(None, (p.strip() for p in text.split(";"))):
                label, eq, words = part.partition("=")
                if not eq or not label.strip():
                    raise VerbalizerError(f"--verbalizer: {part!r} is not LABEL=word[,word...]; "
                                          "write e.g. \"negative=terrible,bad;positive=great,good\"")
                entries.append((label.strip(), [w for w in words.split(",")]))
            raw = unique_labels(entries, "--verbalizer", _ONE_ENTRY)
    if not isinstance(raw, dict) or not raw:
        raise VerbalizerError("--verbalizer must map each label to one or more words")
    out: dict[str, tuple[str, ...]] = {}
    for label, words in raw.items():
        words = [words] if isinstance(words, str) else words
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise VerbalizerError(f"--verbalizer: label {label!r} must map to a word or a list of words")
        words = [w.strip() for w in words if w.strip()]
        if not words:
            raise VerbalizerError(f"--verbalizer: label {label!r} has no words")
        out[str(label)] = tuple(words)
    return out


def unique_labels(pairs: Sequence[tuple[str, Any]], flag: str, hint: str = "") -> dict[str, Any]:
    """(label, value) pairs as a dict; a label given twice is an error (a dict would keep the last).
    Also the `object_pairs_hook` of a JSON form, so `{"neg": .., "neg": ..}` is refused the same way."""
    out: dict[str, Any] = {}
    for label, value in pairs:
        if label in out:
            raise ConfigError(f"{flag}: label {label!r} is given twice; give each label once{hint}")
        out[label] = value
    return out


def order_by_labels(label_words: Mapping[str, Sequence[str]], labels: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The verbalizer in the task's label order; it must name exactly the task's labels."""
    missing = [lab for lab in labels if lab not in label_words]
    extra = [lab for lab in label_words if lab not in labels]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no words for label(s) {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"label(s) {', '.join(map(repr, extra))} are not labels of the data")
        raise VerbalizerError(f"--verbalizer: {'; '.join(parts)} (the labels are {', '.join(labels)})")
    return {lab: tuple(label_words[lab]) for lab in labels}


# -- words -> token ids ------------------------------------------------------------------------------
def single_token_alternatives(tokenizer, word: str, ctx: str = "", joiner: str = " ") -> list[str]:
    """Words (case variants read in context) and exact vocabulary tokens (the word with / without
    a leading space, for byte-level BPE and SentencePiece) that ARE one token."""
    seen: list[str] = []
    variants = list(dict.fromkeys([word, word.lower(), word.capitalize(), word.upper()]))
    for v in variants:
        if len(word_in_context(tokenizer, ctx, joiner, v)) == 1 and v != word:
            seen.append(v)
    for v in variants:
        for space in (" ", ""):
            ids = tokenizer.encode(space + v, add_special_tokens=False)
            if len(ids) == 1:
                piece = tokenizer.convert_ids_to_tokens(ids[0])
                if piece != word and piece not in seen:
                    seen.append(piece)
    return seen


def resolve_verbalizer(tokenizer, template: Template, label_words: Mapping[str, Sequence[str]]) -> VerbalizerWeights:
    """Label words -> `VerbalizerWeights` (one token id per word), in `label_words` order.
    Every word that is not one token is reported in one error, with alternatives."""
    ctx, joiner = answer_context(template)
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    problems: list[str] = []
    shared: list[str] = []
    ids: list[tuple[int, ...]] = []
    owner: dict[int, str] = {}
    for label, words in label_words.items():
        row = []
        for word in words:
            toks = word_in_context(tokenizer, ctx, joiner, word)
            if len(toks) == 1 and toks[0] != unk:
                tid = toks[0]
            elif word in vocab:  # an exact vocabulary token, e.g. "Ġgreat"
                tid = vocab[word]
            else:
                pieces = tokenizer.convert_ids_to_tokens(toks)
                alts = single_token_alternatives(tokenizer, word, ctx, joiner)
                where = f" after {ctx!r}" if ctx else ""
                what = "the unknown token" if toks == [unk] else f"{len(toks)} tokens {pieces}"
                hint = (f"single-token alternatives: {', '.join(map(repr, alts))}" if alts else
                        "no case or spacing variant of it is one token either; choose another word")
                problems.append(f"word {word!r} of label {label!r} is not one token{where}: it is {what}; {hint}")
                continue
            if tid in owner and owner[tid] != label:
                shared.append(f"word {word!r} of label {label!r} is the same token as a word of label {owner[tid]!r}")
            owner[tid] = label
            row.append(tid)
        ids.append(tuple(row))
    if problems or shared:  # each kind of problem under its own rule, not every one under "single token"
        rules = ([f"each label word must be a single token of the backbone's tokenizer; {'; '.join(problems)}"] if problems else []) + (
            [f"each label needs words of its own (on a shared word the labels always score the same); {'; '.join(shared)}"]
            if shared else [])
        raise VerbalizerError("verbalizer: " + "; and ".join(rules))
    return VerbalizerWeights(words=tuple(tuple(w) for w in label_words.values()), token_ids=tuple(ids))


def parse_template(source: str, *, pair: bool, causal: bool) -> Template:
    """`Template.parse` for a verbalizer task, its `TemplateError` as a `ConfigError` (--template)."""
    try:
        return Template.parse(source, pair=pair, needs_mask=True, causal=causal)
    except TemplateError as err:
        raise ConfigError(f"--template: {err}") from None


def require_lm_head(backbone: "Backbone") -> None:
    if not backbone.info.has_lm_head:
        raise ConfigError(
            f"a template + verbalizer task scores label words with the backbone's LM head, and {backbone.name} has "
            "none: pass --backbone with a masked or causal LM (a *ForMaskedLM / *ForCausalLM folder or a .gguf file)"
        )


# -- a prompt task in training -----------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSpec:
    """How a task is asked: a template, each label's words, and whether demonstrations are shown.

    `train(..., prompt=PromptSpec(...))` replaces the classification head with the verbalizer;
    the bundle gets the "verbalizer" method (and "demos" with `demos=True`) and the "template"."""

    template: str
    label_words: Mapping[str, Sequence[str]] = field(hash=False)
    demos: bool = False  # LM-BFF demonstrations: one training example per class, nearest by MiniLM cosine

    def build(self, backbone: "Backbone", labels: Sequence[str], pair: bool,
              max_length: int | None = None) -> tuple[Template, VerbalizerWeights]:
        """Check the spec against the backbone and labels (and, given `max_length`, that the
        template and its demonstrations leave room for the input); the parsed template and verbalizer."""
        require_lm_head(backbone)
        causal = backbone.info.kind == "decoder"
        template = parse_template(self.template, pair=pair, causal=causal)
        words = order_by_labels(self.label_words, labels)
        verbalizer = resolve_verbalizer(backbone.tokenizer, template, words)
        if max_length is not None:
            try:  # the demonstrations are one training example per class (training/demos.py)
                template.check_fits(backbone.tokenizer, max_length, causal, len(labels) if self.demos else 0)
            except TemplateError as err:
                raise ConfigError(f"--template: {err}; raise --max-length or shorten the template") from None
        return template, verbalizer

    def parsed_template(self, backbone: "Backbone", pair: bool) -> Template:
        return parse_template(self.template, pair=pair, causal=backbone.info.kind == "decoder")

    def attach(self, weights: dict[str, "TaskWeights"], engine: "Engine", train_data: "LabelledData",
               method: str, max_length: int | None = None) -> dict[str, "TaskWeights"]:
        """The task's weights with the verbalizer (and the demonstration pool) in place of the head."""
        if method in ("head", "full"):
            raise ConfigError(
                f"--method {method} cannot train a template + verbalizer task (the verbalizer replaces the head, and "
                "full fine-tuning copies only the encoder); choose lora, prompt or adapter, or publish it untrained "
                "with `adaptserve zeroshot`"
            )
        _, verbalizer = self.build(engine.backbone, train_data.label_names, train_data.has_pairs, max_length)
        out = {m: w for m, w in weights.items() if m != "head"}
        out["verbalizer"] = verbalizer
        if self.demos:
            from training.demos import build_pool

            out["demos"] = build_pool(engine, train_data)
        return out

    def bundle_config(self) -> dict[str, Any]:
        return {"template": self.template}


def prompt_spec(template: str | None, verbalizer: str | Path | Mapping[str, Any] | None, demos: bool = False) -> PromptSpec | None:
    """A `PromptSpec` from the CLI's --template / --verbalizer / --demos (None when neither is given)."""
    if template is None and verbalizer is None:
        if demos:
            raise ConfigError("--demos shows labelled examples inside a prompt: it needs --template and --verbalizer")
        return None
    if template is None or verbalizer is None:
        raise ConfigError("--template and --verbalizer go together: the template says where the label word goes, "
                          "the verbalizer which word each label is")
    return PromptSpec(template=template, label_words=parse_verbalizer(verbalizer), demos=demos)


def add_prompt_flags(parser) -> None:
    """--template / --verbalizer / --demos on `adaptserve train`."""
    g = parser.add_argument_group("prompt (template + verbalizer instead of a head; needs an LM --backbone)")
    g.add_argument("--template", help="e.g. \"{text} It was {mask} .\" ({text_pair} for pairs; for a causal LM "
                   "{mask} ends it: \"{text} It was {mask}\")")
    g.add_argument("--verbalizer", help="label words: \"negative=terrible,bad;positive=great,good\" or a JSON file")
    g.add_argument("--demos", action="store_true",
                   help="LM-BFF demonstrations: append one training example per class, the most similar by "
                   "all-MiniLM-L6-v2 cosine, to every prompt (training and serving)")
