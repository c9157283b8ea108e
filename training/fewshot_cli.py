"""`adaptserve zeroshot` and `adaptserve pet` (also `python -m training zeroshot|pet`).

    adaptserve zeroshot --task sent --labels negative,positive --template "{text} It was {mask}" \\
        --verbalizer "negative=terrible;positive=great" --backbone SmolLM2-135M-Instruct.Q4_1.gguf --store DIR
    adaptserve zeroshot --task sent --labels negative,positive \\
        --descriptions "negative=a negative review;positive=a positive review" --store DIR
    adaptserve pet --task sent --data train.csv --unlabelled unlabelled.csv --dev dev.csv \\
        --patterns patterns.json --backbone model.gguf --store DIR

Same conventions as `adaptserve train` (`training/cli.py`): every problem a person can cause is one
line `adaptserve <verb>: error: ...` and exit status 1; tables to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from training.cli import (
    _check_paths, _columns, _data_format_flags, _guarded, _library_bars, _load_backbone, _setup_logging, directory,
    input_path, json_or_path, output_file, write_json,
)
from training.config import DEFAULT_LR, ConfigError, TrainConfig
from training.pet import DEFAULT_TEMPERATURE, WEIGHTINGS
from training.zeroshot import DEFAULT_SCALE


def _output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    out = g.add_mutually_exclusive_group(required=True)
    out.add_argument("--store", type=directory, help="publish into this local store directory (made active)")
    out.add_argument("--publish", metavar="URL", help="upload to a running service at URL")
    out.add_argument("--no-publish", action="store_true", help="build and report only")
    g.add_argument("--token", help="admin bearer token for --publish [$ADAPTSERVE_ADMIN_TOKEN]")
    g.add_argument("--json", type=output_file, dest="json_out", help="also write the summary as JSON here")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


# -- zeroshot ------------------------------------------------------------------------------------------
def build_zeroshot_parser(prog: str = "adaptserve zeroshot") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Publish a task with no training data: either a prompt (template + verbalizer) answered by an "
        "LM backbone's own LM head, or label descriptions compared by cosine with a sentence encoder.",
    )
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--labels", help="comma-separated label names, in output order [the verbalizer's / descriptions' order]")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--template", help="(a) prompt: e.g. \"{text} It was {mask}\" (needs --verbalizer and an LM --backbone)")
    kind.add_argument("--descriptions", help="(b) \"negative=a negative review;positive=a positive review\" or a JSON file")
    p.add_argument("--verbalizer", help="(a) \"negative=terrible,bad;positive=great,good\" or a JSON file")
    p.add_argument("--pair", action="store_true", help="(a) a sentence-pair task (the template has {text_pair})")
    p.add_argument("--scale", type=float, default=None,
                   help=f"(b) logits = scale x cosine [{DEFAULT_SCALE:g}: all-MiniLM-L6-v2's training temperature 0.05]")
    p.add_argument("--max-length", type=int, default=TrainConfig(method="lora").max_length, help="[%(default)s]")
    p.add_argument("--backbone", type=input_path, help="(a) an LM folder or .gguf; (b) an encoder, not a causal LM [the bundled all-MiniLM-L6-v2]")
    p.add_argument("--device", default="auto", help="[%(default)s]")
    g = p.add_argument_group("optional scoring through the serving path")
    g.add_argument("--test", type=input_path, help="a labelled file to score the published task on")
    g.add_argument("--text-column", default="text")
    g.add_argument("--text-pair-column", default=None)
    g.add_argument("--label-column", default="label")
    _data_format_flags(g)
    _output_flags(p)
    return p


def zeroshot_main(argv: Sequence[str] | None = None) -> int:
    args = build_zeroshot_parser().parse_args(argv)
    _library_bars(args)
    return _guarded("adaptserve zeroshot", lambda: _zeroshot(args))


def _zeroshot(args: argparse.Namespace) -> int:
    from service.store import validate_task_name
    from training.zeroshot import description_task, prompt_task, publish_zeroshot_http, save_zeroshot

    validate_task_name(args.task)
    if args.template is not None and args.verbalizer is None:
        raise ConfigError("--template needs --verbalizer: which word stands for each label")
    if args.descriptions is not None and (args.verbalizer is not None or args.pair):
        raise ConfigError("--descriptions builds a cosine head; --verbalizer and --pair belong to --template")
    if args.template is not None and args.scale is not None:
        raise ConfigError("--scale belongs to --descriptions (it scales the cosine head); a --template task's "
                          "scores come from the LM's own logits")
    _check_paths(args.device, inputs=[("--test", args.test)], store=args.store, task=args.task, publish=args.publish,
                 json_out=args.json_out, token=args.token)
    _setup_logging()
    backbone = _load_backbone(args.backbone, args.device, "float32")
    if args.template is not None:
        task = prompt_task(args.task, args.template, args.verbalizer, backbone, labels=args.labels, pair=args.pair,
                           max_length=args.max_length)
    else:
        task = description_task(args.task, args.descriptions, backbone, labels=args.labels,
                                scale=DEFAULT_SCALE if args.scale is None else args.scale, max_length=args.max_length)
    test = _read_test(args, task.task) if args.test is not None else None  # its problems stop the run unpublished
    published = _publish(args, lambda store: save_zeroshot(task, store), lambda: publish_zeroshot_http(task, args.publish, args.token))
    summary: dict[str, Any] = {"task": args.task, "kind": "prompt" if args.template else "descriptions",
                               "labels": list(task.labels), "methods": sorted(task.weights), **published}
    if test is not None:
        summary["test"] = _score(args, task.task, backbone, test).as_dict()
    _report(args, summary)
    return 0


# -- pet -----------------------------------------------------------------------------------------------
def build_pet_parser(prog: str = "adaptserve pet") -> argparse.ArgumentParser:
    t, s = TrainConfig(method="lora"), TrainConfig(method="lora")
    p = argparse.ArgumentParser(
        prog=prog,
        description="PET: prompt-tune one teacher per pattern on the labelled file, soft-label the unlabelled file "
        "with their ensemble, and distil a student (a head task on the sentence encoder), which is published.",
    )
    g = p.add_argument_group("task and data")
    g.add_argument("--task", required=True)
    g.add_argument("--data", required=True, type=input_path, help="labelled training file")
    g.add_argument("--unlabelled", required=True, type=input_path,
                   help="unlabelled file, read as --data is (--format, --text-column, --empty-text); a label column, "
                   "if any, is ignored")
    g.add_argument("--dev", required=True, type=input_path, help="dev file: chooses every checkpoint")
    g.add_argument("--test", type=input_path, help="test file, scored with the student (and each teacher)")
    g.add_argument("--max-unlabelled", type=int, help="use a seeded random subsample of this many unlabelled rows")
    g.add_argument("--text-column", default="text")
    g.add_argument("--text-pair-column", default=None)
    g.add_argument("--label-column", default="label")
    _data_format_flags(g)
    g = p.add_argument_group("PET")
    g.add_argument("--patterns", required=True, type=json_or_path,
                   help="JSON file, or the JSON itself: [{\"template\": \"{text} It was {mask}\", \"verbalizer\": "
                   "\"negative=bad;positive=good\"}, ...] (>= 3)")
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="distillation temperature [%(default)s: PET]")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="prior",
                   help="pattern weights: prior = accuracy on the training set before training (PET), dev = trained "
                   "teacher's dev accuracy, uniform [%(default)s]")
    g = p.add_argument_group("teachers (prompt-based fine-tuning on --backbone)")
    g.add_argument("--teacher-method", choices=("lora", "prompt", "adapter", "prefix"), default="lora")
    g.add_argument("--teacher-epochs", type=int, default=t.epochs)
    g.add_argument("--teacher-lr", type=float, help=f"[the method's default: lora {DEFAULT_LR['lora']:g}]")
    g.add_argument("--teacher-max-steps", type=int)
    g = p.add_argument_group("student (a head task on --student-backbone)")
    g.add_argument("--student-method", choices=("lora", "adapter", "head", "prompt", "prefix"), default="lora")
    g.add_argument("--student-epochs", type=int, default=s.epochs)
    g.add_argument("--student-lr", type=float)
    g.add_argument("--student-backbone", type=input_path, help="encoder folder [the bundled all-MiniLM-L6-v2]")
    g = p.add_argument_group("shared")
    g.add_argument("--batch-size", type=int, default=t.batch_size)
    g.add_argument("--max-length", type=int, default=t.max_length)
    g.add_argument("--seed", type=int, default=t.seed)
    g.add_argument("--patience", type=int, default=t.patience, help="0 = never stop early [%(default)s]")
    g.add_argument("--backbone", type=input_path, required=True, help="the teachers' LM: a *ForMaskedLM / *ForCausalLM folder or a .gguf")
    g.add_argument("--device", default="auto")
    _output_flags(p)
    return p


def pet_main(argv: Sequence[str] | None = None) -> int:
    args = build_pet_parser().parse_args(argv)
    _library_bars(args)
    return _guarded("adaptserve pet", lambda: _pet(args))


def _pet(args: argparse.Namespace) -> int:
    from service.store import validate_task_name
    from training.data import load_splits
    from training.pet import PetConfig, load_patterns, publish_pet_http, read_unlabelled, run_pet, save_pet
    from training.report import format_table

    validate_task_name(args.task)
    # the input files are all read before training
    _check_paths(args.device, store=args.store, task=args.task, publish=args.publish, json_out=args.json_out,
                 token=args.token)
    shared = dict(batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, patience=args.patience or None)
    config = PetConfig(
        teacher=TrainConfig(method=args.teacher_method, epochs=args.teacher_epochs, lr=args.teacher_lr,
                            max_steps=args.teacher_max_steps, **shared),
        student=TrainConfig(method=args.student_method, epochs=args.student_epochs, lr=args.student_lr, **shared),
        temperature=args.temperature, weighting=args.weighting,
    ).check()
    if args.max_unlabelled is not None and args.max_unlabelled < 1:
        raise ConfigError(f"--max-unlabelled must be a positive integer, got {args.max_unlabelled}")
    patterns = load_patterns(args.patterns)
    splits = load_splits(args.data, args.dev, args.test, **_columns(args))
    texts, pairs = read_unlabelled(args.unlabelled, args.text_column,
                                   args.text_pair_column or ("text_pair" if splits.train.has_pairs else None),
                                   limit=args.max_unlabelled, seed=args.seed, file_format=args.file_format,
                                   empty_text=args.empty_text)
    _setup_logging()
    teacher_bb = _load_backbone(args.backbone, args.device, "float32")
    student_bb = _load_backbone(args.student_backbone, args.device, "float32")
    result = run_pet(splits, texts, patterns, config, name=args.task, teacher_backbone=teacher_bb,
                     student_backbone=student_bb, unlabelled_pairs=pairs, progress=not args.no_progress)
    published = _publish(args, lambda store: save_pet(result, store), lambda: publish_pet_http(result, args.publish, args.token))
    rows = [[f"teacher {t.pattern.name}", t.pattern.template, t.prior_accuracy, t.weight, t.result.dev_metrics.accuracy,
             t.result.test_metrics.accuracy if t.result.test_metrics else None] for t in result.teachers]
    st = result.student
    rows.append(["student", f"{config.student.method} + head on {student_bb.name}", None, None, st.dev_metrics.accuracy,
                 st.test_metrics.accuracy if st.test_metrics else None])
    print(format_table(["model", "pattern", "prior acc", "weight", "dev acc", "test acc"], rows, title=f"PET {args.task}"))
    summary = {"task": args.task, "unlabelled": result.unlabelled, "seconds": round(result.seconds, 3),
               "label_seconds": round(result.label_seconds, 3), **published,
               "pet": result.bundle_config()["training"]["pet"], "dev": st.dev_metrics.as_dict(),
               **({"test": st.test_metrics.as_dict()} if st.test_metrics else {})}
    _report(args, summary)
    return 0


# -- shared --------------------------------------------------------------------------------------------
def _publish(args: argparse.Namespace, to_store, to_url) -> dict[str, Any]:
    from training.publish import stored_line

    if args.store is not None:
        version = to_store(args.store)
        print(stored_line(args.store, args.task, version))
        return {"store": str(args.store), "version": version}
    if args.publish is not None:
        sent = to_url()
        print(f"published {args.task}@{sent.version} to {sent.url}")
        return {"url": sent.url, "version": sent.version}
    print("not published (--no-publish)")
    return {}


def _read_test(args: argparse.Namespace, task):
    """The --test file, checked against the task (its labels, pairs or single texts) before
    anything is published."""
    from training.data import read_eval
    from training.evaluate import check_inputs

    data = read_eval(args.test, list(task.labels), **_columns(args), known_as="the task's labels")
    check_inputs(task, data)
    return data


def _score(args: argparse.Namespace, task, backbone, data):
    from service.engine.engine import Engine
    from training.evaluate import evaluate_served
    from training.report import format_metrics

    metrics = evaluate_served(Engine(backbone), task, data, progress=not args.no_progress)
    print(format_metrics(metrics, title=f"{args.task} on {args.test}"))
    return metrics


def _report(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json_out is not None:
        write_json(args.json_out, summary)
