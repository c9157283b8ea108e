"""`python -m training train ...` / `python -m training evaluate ...` (== `adaptserve train|evaluate`).

Without a subcommand the arguments are those of `train`.
"""
import sys

from training.cli import evaluate_main, main

argv = sys.argv[1:]
if argv[:1] == ["evaluate"]:
    sys.exit(evaluate_main(argv[1:]))
sys.exit(main(argv[1:] if argv[:1] == ["train"] else argv))
