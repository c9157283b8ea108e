"""`python -m training train|evaluate|pet|zeroshot ...` (== `adaptserve train|evaluate|pet|zeroshot`).

Without a subcommand the arguments are those of `train`.
"""
import sys

from training.cli import evaluate_main, main

argv = sys.argv[1:]
if argv and not argv[0].startswith("-") and argv[0] not in ("train", "evaluate", "pet", "zeroshot"):
    print(f"python -m training: error: unknown command {argv[0]!r}: use train, evaluate, pet or zeroshot "
          "(or train's options alone)", file=sys.stderr)
    sys.exit(2)
if argv[:1] == ["evaluate"]:
    sys.exit(evaluate_main(argv[1:]))
if argv[:1] in (["pet"], ["zeroshot"]):
    from training.fewshot_cli import pet_main, zeroshot_main

    sys.exit((pet_main if argv[0] == "pet" else zeroshot_main)(argv[1:]))
sys.exit(main(argv[1:] if argv[:1] == ["train"] else argv))
