"""Prompt templates: `{text} It was {mask} .`, pairs `{text} ? {mask} , {text_pair}`.

A template is parsed once into literal pieces and slots. Encoding tokenises each piece on its own,
truncates only the inputs (longest first) so the template and the answer slot always survive, adds
the tokenizer's special tokens, and reports the answer position: the `{mask}` token for a masked
LM, the last token for a causal LM (which predicts the next word, so `{mask}` must end the
template there).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from service.engine.truncation import longest_first

_SLOT = re.compile(r"\{(\w*)\}")
SLOTS = ("text", "text_pair", "mask")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    source: str
    parts: tuple[tuple[str, str], ...]  # ("lit", "It was") | ("slot", "text")

    @property
    def slots(self) -> set[str]:
        return {v for k, v in self.parts if k == "slot"}

    @classmethod
    def parse(cls, source: str, *, pair: bool, needs_mask: bool, causal: bool) -> "Template":
        if not isinstance(source, str) or not source.strip():
            raise TemplateError("a template must be a non-empty string such as '{text} It was {mask} .'")
        parts: list[tuple[str, str]] = []
        pos = 0
        for m in _SLOT.finditer(source):
            if m.start() > pos:
                parts.append(("lit", source[pos:m.start()]))
            if m.group(1) not in SLOTS:
                raise TemplateError(f"unknown placeholder {{{m.group(1)}}} in template {source!r}; use {{text}}, {{text_pair}}, {{mask}}")
            parts.append(("slot", m.group(1)))
            pos = m.end()
        if pos < len(source):
            parts.append(("lit", source[pos:]))
        t = cls(source, tuple(parts))
        names = [v for k, v in parts if k == "slot"]
        problems = []
        if "text" not in names:
            problems.append("it has no {text}")
        if pair and "text_pair" not in names:
            problems.append("a pair task needs {text_pair}")
        if not pair and "text_pair" in names:
            problems.append("{text_pair} appears but the task takes single texts")
        if needs_mask and "mask" not in names:
            problems.append("scoring label words needs a {mask} where the word goes")
        elif not causal and "mask" not in names:  # a head task's template: `encode` reads the answer at {mask}
            problems.append("a masked LM's template needs a {mask} (the answer position)")
        if any(names.count(s) > 1 for s in SLOTS):
            problems.append("each placeholder may appear once")
        if causal and "mask" in names and (parts[-1] != ("slot", "mask")) and not (
            len(parts) >= 2 and parts[-2] == ("slot", "mask") and not parts[-1][1].strip()
        ):
            problems.append("for a causal LM {mask} must end the template (the model predicts the next word)")
        if problems:
            raise TemplateError(f"template {source!r}: " + "; ".join(problems))
        return t

    def encode(self, tokenizer, text: str, text_pair: str | None, max_length: int, causal: bool) -> tuple[list[int], int]:
        """(token ids with special tokens, answer position)."""
        mask_id = tokenizer.mask_token_id if not causal else None
        pieces: list[tuple[str, list[int]]] = []
        for n, (kind, value) in enumerate(self.parts):
            if kind == "lit":
                # WordPiece ignores spacing; byte-level BPE needs the leading space (" great"), but a
                # space right before the answer would become a token of its own.
                before_answer = n + 1 == len(self.parts) or self.parts[n + 1] == ("slot", "mask")
                lit = value.strip() if not causal else (value.rstrip() if before_answer else value)
                if lit:
                    pieces.append(("lit", tokenizer.encode(lit, add_special_tokens=False)))
            elif value == "mask":
                if causal:
                    break  # the next token is the answer
                pieces.append(("mask", [mask_id]))
            else:
                src = text if value == "text" else (text_pair or "")
                pieces.append((value, tokenizer.encode(src, add_special_tokens=False)))
        head, tail = special_frame(tokenizer)
        specials = len(head) + len(tail)
        budget = max_length - specials - sum(len(ids) for k, ids in pieces if k in ("lit", "mask"))
        if budget < 1:
            raise TemplateError(f"template {self.source!r} leaves no room for the input within max_length {max_length}")
        _truncate_inputs(pieces, budget)
        body = [t for _, ids in pieces for t in ids]
        ids = head + body + tail
        if causal:  # the answer is read at the last template token
            return _causal_answer(tokenizer, ids, body)
        return ids, ids.index(mask_id)

    def encode_with_demos(self, tokenizer, text: str, text_pair: str | None, demos, max_length: int,
                          causal: bool) -> tuple[list[int], int]:
        """(token ids, answer position) of the prompt with demonstrations (LM-BFF, Gao et al., 2021):
        the input's template, then each demonstration (`service.methods.demos.Demo`) as its own
        copy of the template with its label word in place of `{mask}`, segments separated by the
        tokenizer's [SEP] (masked LMs, as LM-BFF) or a newline (causal LMs). A causal LM answers
        with the token after the input's template, so there the demonstrations come first and the
        input last (the usual in-context order). Inputs and demonstrations share the max_length
        budget and are truncated longest first; the template pieces and label words survive."""
        if not demos:
            return self.encode(tokenizer, text, text_pair, max_length, causal)
        if causal:
            sep = tokenizer.encode("\n", add_special_tokens=False)
        else:
            sep = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
        own = self._pieces(tokenizer, text, text_pair, causal, None)
        shown = [self._pieces(tokenizer, d.text, d.text_pair, causal, d.word_id) for d in demos]
        segments = shown + [own] if causal else [own] + shown
        pieces: list[tuple[str, list[int]]] = []
        for i, seg in enumerate(segments):
            if i:
                pieces.append(("lit", list(sep)))
            pieces.extend(seg)
        head, tail = special_frame(tokenizer)
        fixed = sum(len(ids) for k, ids in pieces if k in ("lit", "mask"))
        budget = max_length - len(head) - len(tail) - fixed
        if budget < len(segments):
            raise TemplateError(f"template {self.source!r} with {len(demos)} demonstrations leaves no room for the "
                                f"inputs within max_length {max_length}")
        _truncate_inputs(pieces, budget)
        body = [t for _, ids in pieces for t in ids]
        ids = head + body + tail
        if causal:  # the answer is read at the last template token (see `encode`)
            return _causal_answer(tokenizer, ids, body)
        return ids, ids.index(tokenizer.mask_token_id)

    def check_fits(self, tokenizer, max_length: int, causal: bool, demos: int = 0) -> None:
        """Raise `TemplateError` where no input could ever fit: the template's own tokens (special
        tokens, literal text, the answer slot and, with `demos` demonstrations, their copies of the
        template and label words plus separators) leave fewer than one token per input segment of
        `max_length`. `encode` / `encode_with_demos` would refuse every request of such a task;
        this is their budget, computed once (the fixed pieces do not depend on the text)."""
        head, tail = special_frame(tokenizer)
        fixed = lambda pieces: sum(len(ids) for k, ids in pieces if k in ("lit", "mask"))  # noqa: E731
        own = fixed(self._pieces(tokenizer, "", None, causal, None))
        if demos:
            sep = tokenizer.encode("\n", add_special_tokens=False) if causal else (
                [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else [])
            # a demonstration is its own copy of the template with a one-token label word for {mask}
            own += demos * (fixed(self._pieces(tokenizer, "", None, causal, 0)) + len(sep))
        taken = len(head) + len(tail) + own
        if max_length - taken < demos + 1:  # one token per segment at least, as the encoders require
            with_demos = f" with {demos} demonstrations" if demos else ""
            raise TemplateError(
                f"template {self.source!r}{with_demos} leaves no room for the input within max_length {max_length}: "
                f"its own tokens (special tokens, template text{', demonstrations' if demos else ''} and answer slot) "
                f"take {taken}"
            )

    def own_tokens(self, tokenizer, causal: bool) -> int:
        """The tokens of a prompt that are not its inputs': special tokens (a causal prompt drops
        those after its answer, `_causal_answer`), the template text and a masked LM's answer slot.
        Each piece is tokenised on its own, so an uncut prompt's length (`encode`) is this plus the
        inputs' tokens."""
        head, tail = special_frame(tokenizer)
        pieces = self._pieces(tokenizer, "", None, causal, None)
        return len(head) + (0 if causal else len(tail)) + sum(len(ids) for k, ids in pieces if k in ("lit", "mask"))

    def _pieces(self, tokenizer, text: str, text_pair: str | None, causal: bool,
                fill: int | None) -> list[tuple[str, list[int]]]:
        """The template's pieces for one segment, tokenised as `encode` does; `fill` puts a label
        word's token in place of `{mask}` (a demonstration), None keeps the answer slot."""
        pieces: list[tuple[str, list[int]]] = []
        for n, (kind, value) in enumerate(self.parts):
            if kind == "lit":
                before_answer = n + 1 == len(self.parts) or self.parts[n + 1] == ("slot", "mask")
                lit = value.strip() if not causal else (value.rstrip() if before_answer else value)
                if lit:
                    pieces.append(("lit", tokenizer.encode(lit, add_special_tokens=False)))
            elif value == "mask":
                if fill is not None:
                    pieces.append(("lit", [fill]))
                    if causal:
                        break  # a causal template ends at its answer
                elif causal:
                    break
                else:
                    pieces.append(("mask", [tokenizer.mask_token_id]))
            else:
                src = text if value == "text" else (text_pair or "")
                pieces.append((value, tokenizer.encode(src, add_special_tokens=False)))
        return pieces


def _causal_answer(tokenizer, ids: list[int], body: list[int]) -> tuple[list[int], int]:
    """A causal prompt's tokens and answer position: its last token, trailing specials (e.g. EOS)
    dropped. A prompt with no token at all (an empty input, a template with no text of its own
    before `{mask}`, a tokenizer that adds no BOS: SmolLM2's) would be a row of length 0, which
    fails a forward of its own and, in a batch, reads its answer off a padding position (an
    answer that depends on the batch). The model then reads its start token instead, BOS (else
    EOS), as language models do at the start of a text: the next-word distribution given nothing."""
    last = len(ids) - 1
    while last > 0 and ids[last] in tokenizer.all_special_ids and ids[last] not in body[-1:]:
        last -= 1
    if last >= 0:
        return ids[: last + 1], last
    return [start_token(tokenizer)], 0


def start_token(tokenizer) -> int:
    """The token a text with no tokens of its own is read as: BOS, else EOS (a causal LM's start)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise TemplateError("the input has no tokens (an empty input, and no template text before {mask}) and the "
                            "tokenizer has no BOS or EOS token to start it with")
    return start


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after a single sequence ([CLS] .. [SEP],
    <s> .. </s>, BOS ..), read off an encoding of a plain word."""
    cached = getattr(tokenizer, "_adaptserve_frame", None)
    if cached is not None:
        return cached
    plain = tokenizer.encode("hello", add_special_tokens=False)
    full = tokenizer.encode("hello", add_special_tokens=True)
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            frame = (full[:i], full[i + len(plain):])
            break
    else:
        frame = ([], [])
    tokenizer._adaptserve_frame = frame
    return frame


def _truncate_inputs(pieces: list[tuple[str, list[int]]], budget: int) -> None:
    """Cut the input pieces (text, text_pair) in place, longest first, until they fit `budget`."""
    inputs = [i for i, (k, _) in enumerate(pieces) if k in ("text", "text_pair")]
    kept = longest_first([len(pieces[i][1]) for i in inputs], budget)
    for i, n in zip(inputs, kept):
        pieces[i] = (pieces[i][0], pieces[i][1][:n])
