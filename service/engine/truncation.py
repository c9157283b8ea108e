"""Truncation whose cost follows what is kept, not what is thrown away.

An input may be thousands of tokens long (the HTTP limits count characters) while its task keeps
`max_length` of them, and the cut runs on the forward thread, where every other task's batch waits
behind it. Two cuts were slow in the length of the input:

* A fast tokenizer truncating a *pair* splits each side's dropped tokens into overflow windows of
  `max_length` and pairs every window of one side with every window of the other: a pair of
  1,500 CJK characters took 1 s at max_length 16 (0.02 s at 512), and 4,000 characters per side
  at max_length 8 held the forward thread for over a minute. `cut_pairs` cuts each side to a
  little over `max_length` tokens first; a side never keeps more than that, so the ids the
  tokenizer returns are unchanged.
* A template's inputs were cut one token at a time, copying the list each time. `longest_first`
  works out the kept lengths directly.
"""
from __future__ import annotations

from typing import Sequence

# Tokens kept past max_length when a side is cut ahead of the tokenizer. A cut inside a word can
# change how the tokens just before it merge (byte-level BPE); this many tokens keep any such
# change away from the ones that survive.
MARGIN = 16
# How many tokens more the side that wins the odd token keeps (see `cut_pairs`): more than a cut
# can shift a side's count by (a character split into byte tokens, merges redone at the cut).
GAP = 8


def cut_pairs(tokenizer, firsts: Sequence[str], seconds: Sequence[str], max_length: int) -> tuple[list[str], list[str]]:
    """Both sides of each pair cut at token boundaries to about `max_length + MARGIN` tokens
    (without special tokens), so that `tokenizer(firsts, seconds, truncation=True, max_length=...)`
    returns the same ids as uncut.

    The tokenizer's longest-first rule hands an odd token to the longer side (the second of
    equals), so the cut keeps that side longer by `GAP` tokens. Pairs whose sides all fit in
    `max_length` characters are left alone (at most 4 byte tokens a character: too short to
    matter), and so is everything when the tokenizer cannot give offsets (slow, pure-Python
    tokenizers)."""
    firsts, seconds = list(firsts), list(seconds)
    long = [i for i, pair in enumerate(zip(firsts, seconds)) if max(map(len, pair)) > max_length]
    if not long or not getattr(tokenizer, "is_fast", False):
        return firsts, seconds
    keep = max_length + MARGIN
    enc = tokenizer([firsts[i] for i in long] + [seconds[i] for i in long], add_special_tokens=False,
                    return_offsets_mapping=True, verbose=False)["offset_mapping"]
    for i, one, two in zip(long, enc[: len(long)], enc[len(long):]):
        if max(len(one), len(two)) <= keep + GAP:
            continue  # nothing worth cutting
        winner = 0 if len(one) > len(two) else 1
        for k, (side, offsets) in enumerate(((firsts, one), (seconds, two))):
            cut = keep + GAP if k == winner else keep
            if len(offsets) > cut:
                side[i] = side[i][: offsets[cut][0]]
    return firsts, seconds


def longest_first(lengths: Sequence[int], budget: int) -> list[int]:
    """The lengths left after removing one token at a time from the longest input (the first of
    equals) until their sum fits `budget` (>= 0), worked out in whole rounds."""
    kept = list(lengths)
    excess = sum(kept) - budget
    while excess > 0:
        top = max(kept)
        tied = [i for i, n in enumerate(kept) if n == top]
        below = max((n for n in kept if n < top), default=0)
        step = min(top - below, excess // len(tied))
        if step == 0:  # fewer tokens to remove than inputs tied: the first ones lose one each
            for i in tied[:excess]:
                kept[i] -= 1
            break
        for i in tied:
            kept[i] -= step
        excess -= step * len(tied)
    return kept
