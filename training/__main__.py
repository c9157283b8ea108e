"""`python -m training train|evaluate|pet|zeroshot ...` (== `adaptserve train|evaluate|pet|zeroshot`).

Without a subcommand the arguments are those of `train`.
"""
import sys

from training.cli import evaluate_main, main

argv = sys.argv[1:]
if argv[:1] == ["evaluate"]:
    sys.exit(evaluate_main(argv[1:]))
if argv[:1] in (["pet"], ["zeroshot"]):
    from training.fewshot_cli import pet_main, zeroshot_main

    sys.exit((pet_main if argv[0] == "pet" else zeroshot_main)(argv[1:]))
sys.exit(main(argv[1:] if argv[:1] == ["train"] else argv))
