"""Tokenizing long text pairs: the tokenizer's own pair truncation against cutting each side first
(`service.engine.truncation.cut_pairs`, what `Engine.tokenize` does), side by side in one run.

    python bench/pair_truncation.py            # bundled MiniLM tokenizer, CPU, ~30 s

A fast tokenizer truncating a pair pairs every overflow window of one side with every window of
the other, so its time grows with the square of the dropped tokens; the cut makes it linear. Each
case also checks that both give the same ids. Cases whose uncut call would take minutes run only
the cut path. Prints a table and writes bench/results/pair_truncation.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.backbone import default_backbone_path  # noqa: E402
from service.engine.truncation import cut_pairs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = {"CJK": "漢" * 4000, "English": ("the film was surprisingly good and the plot held up " * 80)[:4000]}
# (script, characters a side, pairs, max_length, also time the uncut call)
CASES = [("CJK", 1500, 4, 16, True), ("CJK", 4000, 4, 32, True), ("CJK", 4000, 1, 8, False),
         ("CJK", 4000, 64, 32, False), ("English", 4000, 4, 32, True), ("English", 4000, 64, 32, False)]


def main() -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_backbone_path())
    rows = []
    for script, chars, n, max_length, uncut in CASES:
        side = [SIDES[script][:chars]] * n
        t = time.perf_counter()
        firsts, seconds = cut_pairs(tok, side, side, max_length)
        cut_ids = tok(firsts, seconds, truncation=True, max_length=max_length)["input_ids"]
        cut_s = time.perf_counter() - t
        row = {"script": script, "chars_a_side": chars, "pairs": n, "max_length": max_length, "cut_s": round(cut_s, 4)}
        if uncut:
            t = time.perf_counter()
            ids = tok(side, side, truncation=True, max_length=max_length)["input_ids"]
            row["uncut_s"] = round(time.perf_counter() - t, 4)
            row["same_ids"] = ids == cut_ids
            row["speedup"] = round(row["uncut_s"] / cut_s, 1)
        rows.append(row)
        print(f"{script:8} {n:3} pairs x {chars} chars, max_length {max_length:3}: cut {cut_s:7.3f} s"
              + (f"; uncut {row['uncut_s']:7.3f} s ({row['speedup']}x), same ids: {row['same_ids']}" if uncut else ""),
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "pair_truncation.json"
    out.write_text(json.dumps({"command": "python bench/pair_truncation.py", "rows": rows}, indent=1) + "\n")
    print(f"results: {out}")
    return 0 if all(r.get("same_ids", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
