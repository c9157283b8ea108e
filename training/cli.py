"""`adaptserve train` and `adaptserve evaluate` (also `python -m training train|evaluate`).

    adaptserve train --task sst2 --data train.csv --dev dev.csv [--test test.csv] --method lora \\
        [--lora-r 8 --lora-alpha 8 --lora-targets query,value] --store adapters_store
    adaptserve evaluate --task sst2 --store adapters_store --data test.csv [--no-early-exit]

Every problem a person can cause (a bad file, a bad option, a refused upload) ends the command
with one line on stderr and exit status 1; argparse's own usage errors exit with 2. Tables go to
stdout, progress bars and per-epoch lines to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from training.config import (
    DEFAULT_DROPOUT,
    DEFAULT_EMA,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    EXIT_LOSSES,
    EXIT_OPTIONS,
    EXIT_TARGETS,
    METHODS,
    SELECT_METRICS,
    AdapterConfig,
    ConfigError,
    LoraConfig,
    PrefixConfig,
    PromptConfig,
    TrainConfig,
)
from training.data import DataError

log = logging.getLogger("training")

# Method options: flag -> (method it belongs to, TrainConfig section, field, type).
_METHOD_FLAGS: dict[str, tuple[str, str, str, Callable[[str], Any]]] = {
    "--lora-r": ("lora", "lora", "r", int),
    "--lora-alpha": ("lora", "lora", "alpha", float),
    "--lora-targets": ("lora", "lora", "targets", lambda s: tuple(x.strip() for x in s.split(",") if x.strip())),
    "--adapter-kind": ("adapter", "adapter", "kind", str),
    "--adapter-bottleneck": ("adapter", "adapter", "bottleneck", int),
    "--reduction-factor": ("adapter", "adapter", "reduction_factor", int),
    "--adapter-activation": ("adapter", "adapter", "activation", str),
    "--prefix-length": ("prefix", "prefix", "length", int),
    "--prefix-projection": ("prefix", "prefix", "projection", int),
    "--prefix-shift-positions": ("prefix", "prefix", "shift_positions", bool),
    "--prompt-length": ("prompt", "prompt", "length", int),
}


# -- train ---------------------------------------------------------------------------------------------
def build_train_parser(prog: str = "adaptserve train") -> argparse.ArgumentParser:
    d = TrainConfig(method="lora")
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train one task (a parameter-efficient method + a classification head) on a labelled "
        "CSV/TSV/JSONL file through the serving engine's own forward, choose the best checkpoint on the dev "
        "file, and publish it as a bundle the service loads.",
    )
    g = p.add_argument_group("task and data")
    g.add_argument("--task", required=True, help="task name (a-z, 0-9, '.', '_', '-'; at most 64 characters)")
    g.add_argument("--data", required=True, type=input_path, help="training file (.csv, .tsv or .jsonl)")
    g.add_argument("--dev", required=True, type=input_path, help="dev file: chooses the checkpoint, stops early")
    g.add_argument("--test", type=input_path, help="test file, scored once with the chosen checkpoint")
    g.add_argument("--text-column", default="text", help="column with the text [%(default)s]")
    g.add_argument("--text-pair-column", default=None,
                   help="second text column for sentence-pair tasks [text_pair if the file has one]")
    g.add_argument("--label-column", default="label", help="column with the label names [%(default)s]")
    _data_format_flags(g)

    g = p.add_argument_group("method")
    g.add_argument("--method", required=True, choices=METHODS,
                   help="what to train; 'full' fine-tunes a copy of the whole backbone as a baseline")
    g.add_argument("--lora-r", type=int, help=f"LoRA rank [{d.lora.r}]")
    g.add_argument("--lora-alpha", type=float, help=f"LoRA scale numerator, scale = alpha / r [{d.lora.alpha:g}]")
    g.add_argument("--lora-targets", help=f"comma-separated linears to adapt [{','.join(d.lora.targets)}]; "
                   "any of query,key,value,attn_out,ffn_in,ffn_out, and ffn_gate on a gated FFN (SmolLM2)")
    g.add_argument("--adapter-kind", choices=("houlsby", "pfeiffer"), help=f"adapter placement [{d.adapter.kind}]")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--adapter-bottleneck", type=int, help="adapter bottleneck size")
    size.add_argument("--reduction-factor", type=int,
                      help=f"bottleneck = hidden size / this [{d.adapter.reduction_factor}]")
    g.add_argument("--adapter-activation", help=f"adapter non-linearity [{d.adapter.activation}]")
    g.add_argument("--prefix-length", type=int, help=f"prefix tokens per layer [{d.prefix.length}]")
    g.add_argument("--prefix-projection", type=int, metavar="SIZE",
                   help=f"train the prefix through an MLP of this hidden size, folded away at save "
                   f"(Li & Liang 2021); 0 = none [{d.prefix.projection}]")
    g.add_argument("--prefix-shift-positions", action=argparse.BooleanOptionalAction,
                   help="start the text's position ids after the prefix, as HF PEFT runs a prefixed BERT; "
                   "--no-prefix-shift-positions keeps the text where the backbone was pre-trained "
                   f"[{'shift' if d.prefix.shift_positions else 'no shift'}]")
    g.add_argument("--prompt-length", type=int, help=f"soft-prompt tokens [{d.prompt.length}]")
    g.add_argument("--pooling", choices=("cls", "mean", "pooler"), default=d.pooling,
                   help="how the head summarises the text [%(default)s: what MiniLM was trained for]")
    g.add_argument("--head-dense", action="store_true", help="a dense+tanh layer before the classifier")

    g = p.add_argument_group("optimisation")
    epochs = ", ".join(f"{m} {n}" for m, n in DEFAULT_EPOCHS.items())
    g.add_argument("--epochs", type=int, help=f"[per method: {epochs}]")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="[%(default)s]")
    lrs = ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())
    g.add_argument("--lr", type=float, help=f"peak learning rate [per method: {lrs}]")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="[%(default)s]")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="[%(default)s]")
    drops = ", ".join(f"{m} {p:g}" for m, p in DEFAULT_DROPOUT.items())
    g.add_argument("--dropout", type=float,
                   help=f"dropout on the backbone's hidden states and attention while training [per method: {drops}]")
    emas = ", ".join(f"{m} {e:g}" for m, e in DEFAULT_EMA.items())
    g.add_argument("--ema", type=float,
                   help="keep an exponential moving average of the trained weights with this decay and score, "
                        f"checkpoint and publish it (0 = off) [per method: {emas}]")
    g.add_argument("--seed", type=int, default=d.seed, help="fixes the initial weights and data order [%(default)s]")
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per input [%(default)s]")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without dev improvement; 0 = never [%(default)s]")
    g.add_argument("--select-metric", choices=SELECT_METRICS, default=d.select_metric,
                   help="dev metric that picks the checkpoint [%(default)s]")
    g.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")

    g = p.add_argument_group("early exit (docs/training.md)")
    g.add_argument("--early-exit", action="store_true",
                   help="also train an exit classifier + confidence predictor after every layer, and calibrate "
                   "a default exit threshold on dev")
    g.add_argument("--exit-loss", choices=EXIT_LOSSES,
                   help=f"two-stage: task first, then exits on the frozen layers (DeeBERT); weighted: one "
                   f"loss over every exit and the head (PABEE) [{d.exit_loss}]")
    g.add_argument("--exit-target", choices=EXIT_TARGETS,
                   help=f"what each exit's confidence predictor learns: safe (exiting there loses nothing vs the "
                   f"full depth), right (the exit is right, BERxiT) or agrees (it matches the full depth) "
                   f"[{d.exit_target}]")
    g.add_argument("--exit-max-drop", type=float, metavar="POINTS",
                   help=f"dev accuracy points the calibrated threshold may lose vs full depth [{d.exit_max_drop:g}]")
    g.add_argument("--exit-confidence", type=float, metavar="LEVEL",
                   help=f"one-sided confidence that the loss is within --exit-max-drop (paired upper bound over "
                   f"dev rows; 0.5 = point estimate) [{d.exit_confidence:g}]")

    from training.prompting import add_prompt_flags

    add_prompt_flags(p)  # --template / --verbalizer / --demos (training/prompting.py)

    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", type=input_path, help="local Hugging Face encoder folder, or an LM folder / .gguf file for "
                   "--template tasks [the bundled all-MiniLM-L6-v2]")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [%(default)s]")

    g = p.add_argument_group("output")
    out = g.add_mutually_exclusive_group(required=True)
    out.add_argument("--store", type=directory, help="publish into this local store directory (made active)")
    out.add_argument("--publish", metavar="URL", help="upload to a running service at URL")
    out.add_argument("--publish-full", metavar="DIR", type=directory,
                     help="--method full only: write the tuned backbone to DIR/backbone and its head to DIR/store")
    out.add_argument("--no-publish", action="store_true", help="train and report only")
    g.add_argument("--token", help="admin bearer token for --publish [$ADAPTSERVE_ADMIN_TOKEN]")
    g.add_argument("--json", type=output_file, dest="json_out", help="also write the run's summary as JSON here")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Options -> a checked TrainConfig; an option of another method is an error, not ignored."""
    sections = {"lora": LoraConfig(), "adapter": AdapterConfig(), "prefix": PrefixConfig(), "prompt": PromptConfig()}
    for flag, (method, section, name, _) in _METHOD_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if method != args.method:
            raise ConfigError(f"{flag} applies to --method {method}, not --method {args.method}")
        if flag == "--lora-targets":
            value = _METHOD_FLAGS[flag][3](value)
        sections[section] = replace(sections[section], **{name: value})
    return TrainConfig(
        method=args.method, **sections, pooling=args.pooling, head_dense=args.head_dense, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        dropout=args.dropout, ema=args.ema,
        seed=args.seed, max_length=args.max_length, patience=args.patience or None,
        select_metric=args.select_metric, max_steps=args.max_steps, **_early_exit_options(args),
    ).check()


def _early_exit_options(args: argparse.Namespace) -> dict[str, Any]:
    """--early-exit and its options (absent from parsers without them: early exit off)."""
    given = {k: v for k in EXIT_OPTIONS if (v := getattr(args, k, None)) is not None}
    if not getattr(args, "early_exit", False):
        if given:
            raise ConfigError(f"--{next(iter(given)).replace('_', '-')} applies with --early-exit")
        return {}
    return {"early_exit": True, **given}


def main(argv: Sequence[str] | None = None) -> int:
    """`adaptserve train ...`; returns the exit status."""
    args = build_train_parser().parse_args(argv)
    _library_bars(args)
    return _guarded("adaptserve train", lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from service.store import validate_task_name
    from training.data import load_splits

    validate_task_name(args.task)
    config = config_from_args(args)
    if config.early_exit and (args.template is not None or args.verbalizer is not None):
        raise ConfigError("--early-exit trains exit classifiers that hand the last layer to the task's head, and a "
                          "prompt task (--template/--verbalizer) answers through its verbalizer, not a head: drop "
                          "--early-exit, or train a head without a template")
    if args.publish_full is not None and config.method != "full":
        raise ConfigError(f"--publish-full is for --method full; use --store or --publish for {config.method}")
    if config.method == "full" and (args.store is not None or args.publish is not None):
        raise ConfigError(
            "--method full trains a whole new backbone as a baseline, not a task the service can load; "
            "pass --publish-full DIR to write the tuned backbone and its head, or --no-publish"
        )
    # --data / --dev / --test are read (whole) just below, before any training
    _check_paths(args.device, store=args.store, task=args.task, publish=args.publish, publish_full=args.publish_full,
                 json_out=args.json_out, token=args.token)
    splits = load_splits(args.data, args.dev, args.test, **_columns(args))
    _setup_logging()
    from training.publish import publish_http, save_full_result, save_to_store, stored_line
    from training.report import format_comparison, format_metrics, format_table
    from training.trainer import train

    from training.prompting import prompt_spec

    prompt = prompt_spec(args.template, args.verbalizer, args.demos)
    backbone = _load_backbone(args.backbone, args.device, "float32")
    info = backbone.info
    config.check_backbone(info.max_positions, info.has_pooler, info.kind, info.hidden_size, info.sites)
    if prompt is not None:  # fail before training: template, words, LM head, room for the input
        prompt.build(backbone, splits.train.label_names, splits.train.has_pairs, config.max_length)
    result = train(splits, config, name=args.task, backbone=backbone, progress=not args.no_progress, prompt=prompt)

    where = "not published (--no-publish)"
    published: dict[str, Any] = {}
    if args.store is not None:
        version = save_to_store(result, args.store)
        where = stored_line(args.store, args.task, version)
        published = {"store": str(args.store), "version": version}
    elif args.publish is not None:
        sent = publish_http(result, args.publish, args.token)
        where = f"published {args.task}@{sent.version} to {sent.url}"
        published = {"url": sent.url, "version": sent.version}
    elif args.publish_full is not None:
        art = save_full_result(result, args.publish_full)
        where = (f"wrote the tuned backbone to {art.backbone_dir} and {args.task}@{art.version} to {art.store}; "
                 f"serve with: adaptserve serve --backbone {art.backbone_dir} --store {art.store}")
        published = {"backbone": str(art.backbone_dir), "store": str(art.store), "version": art.version}

    bundle_bytes = _bundle_size(result)
    runs = {"dev": result.dev_metrics} | ({"test": result.test_metrics} if result.test_metrics else {})
    print(format_table(
        ["task", "method", "trainable", "% backbone", "bundle bytes", "epochs", "best epoch", "steps", "train s"],
        [[args.task, config.method, result.trainable_params,
          100.0 * result.trainable_params / backbone.num_params, bundle_bytes, len(result.history),
          result.best_epoch, result.steps, result.train_seconds]],
        title="training summary",
    ))
    print()
    print(format_comparison(runs, name_header="split"))
    print()
    last = result.test_metrics or result.dev_metrics
    print(format_metrics(last, title=f"per class ({'test' if result.test_metrics else 'dev'})"))
    print()
    print(where)
    if args.json_out is not None:
        summary = {"task": args.task, "method": config.method, "trainable_params": result.trainable_params,
                   "bundle_bytes": bundle_bytes, "published": published, **result.bundle_config(),
                   "timing": result.timing()}
        write_json(args.json_out, summary)
    return 0


def _bundle_size(result) -> int | None:
    if result.config.method == "full":
        return None
    from service.engine.bundle import bundle_bytes

    cfg_b, w_b = bundle_bytes(result.bundle_config(), result.weights)
    return len(cfg_b) + len(w_b)


# -- evaluate ------------------------------------------------------------------------------------------
def build_evaluate_parser(prog: str = "adaptserve evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Score a published task on a labelled file through the serving path "
        "(Engine.load_task + Engine.classify): accuracy, macro-F1 and a per-class table.",
    )
    p.add_argument("--task", required=True, help="task name in the store")
    p.add_argument("--store", required=True, type=directory, help="local store directory")
    p.add_argument("--data", required=True, type=input_path, help="labelled file (.csv, .tsv or .jsonl)")
    p.add_argument("--version", help="version to score [the task's active version]")
    p.add_argument("--backbone", type=input_path, help="local encoder folder [the bundled all-MiniLM-L6-v2]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [%(default)s]")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="[%(default)s, as served]")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward [%(default)s]")
    p.add_argument("--no-early-exit", action="store_true",
                   help="score every row at full depth, as train's dev/test scores are, not under the task's "
                   "stored early-exit policy [the stored policy, as served; the output says where rows exited]")
    p.add_argument("--text-column", default="text", help="[%(default)s]")
    p.add_argument("--text-pair-column", default=None, help="[text_pair if the file has one]")
    p.add_argument("--label-column", default="label", help="[%(default)s]")
    _data_format_flags(p)
    p.add_argument("--json", type=output_file, dest="json_out", help="also write the metrics as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """`adaptserve evaluate ...`; returns the exit status."""
    args = build_evaluate_parser().parse_args(argv)
    _library_bars(args)
    return _guarded("adaptserve evaluate", lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    from service.engine.bundle import read_config
    from service.engine.engine import Engine
    from service.store import LocalStore
    from service.engine.types import TaskKey
    from service.methods.exits import patience_problem
    from training.data import read_eval
    from training.evaluate import evaluate_task
    from training.report import format_metrics

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
    _check_paths(args.device, json_out=args.json_out)  # --store is only read here
    if not args.store.expanduser().is_dir():  # LocalStore's own message is the server's, naming ADAPTSERVE_STORE
        what = "is not a directory" if args.store.expanduser().exists() else "does not exist"
        raise ConfigError(f"--store {args.store}: {what}; name the store directory the task was published into")
    store = LocalStore(args.store)
    key = TaskKey(args.task, args.version) if args.version else store.resolve(args.task)
    bundle = store.bundle_dir(key)
    with _naming(key):
        labels = read_config(bundle).get("labels")
    if not isinstance(labels, list):
        raise DataError(f"task {args.task!r} names no labels in its bundle")
    data = read_eval(args.data, labels, **_columns(args))
    _setup_logging()
    engine = Engine(_load_backbone(args.backbone, args.device, args.dtype))
    with _naming(key):
        task = engine.load_task(bundle, key)
    scored = evaluate_task(engine, task, data, args.batch_size, progress=not args.no_progress,
                           full_depth=args.no_early_exit)
    metrics, exits = scored.metrics, scored.early_exit
    print(format_metrics(metrics, title=f"{key} on {args.data}"))
    if exits is not None:  # a task with exit classifiers: say which accuracy this is (docs/training.md)
        never = exits.policy.name == "patience" and patience_problem(exits.policy.threshold, task.exit_count)
        hint = ("" if exits.full_depth_forced else
                "; the stored policy is off, so these are the full-depth scores" if exits.policy.name == "off" else
                f"; the stored patience {exits.policy.threshold:g} is more than the task's {task.exit_count} exit "
                "layers, so no row can exit early: these are the full-depth scores" if never else
                "; --no-early-exit scores at full depth")
        print(exits.describe() + hint)
    if args.json_out is not None:
        write_json(args.json_out, {"task": str(key), "data": str(args.data), **metrics.as_dict(),
                                   "early_exit": None if exits is None else exits.as_dict()})
    return 0


# -- shared --------------------------------------------------------------------------------------------
def write_json(path: Path, summary: dict[str, Any]) -> None:
    """--json's file; a write that fails (a full disk) names it. What was published stays published."""
    try:
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--json {path}: cannot be written ({err.strerror or err}); the run's other results "
                          "(printed above) stand") from None


@contextlib.contextmanager
def _naming(key) -> Iterator[None]:
    """A bundle error names its file ("adapter_config.json is not valid JSON"); say whose."""
    from service.errors import BundleError

    try:
        yield
    except BundleError as err:
        if str(key) in err.message or repr(key.name) in err.message:
            raise
        raise BundleError(f"task {key} in the store: {err.message}") from None


def _data_format_flags(g) -> None:
    g.add_argument("--format", dest="file_format", choices=("csv", "tsv", "jsonl"),
                   help="the format of every input file [each file's own extension: .csv, .tsv, .jsonl/.ndjson, "
                   "so train.csv with dev.jsonl needs no --format]")
    g.add_argument("--empty-text", choices=("error", "keep", "skip"), default="error",
                   help="rows with an empty text: refuse the file, keep them as '', or skip them [%(default)s]")


def _columns(args: argparse.Namespace) -> dict[str, Any]:
    return dict(file_format=args.file_format, text_column=args.text_column, text_pair_column=args.text_pair_column,
                label_column=args.label_column, empty_text=args.empty_text)


_PARAM = re.compile(r"\b(file_format|empty_text|text_column|text_pair_column|label_column)= ?")


def _for_cli(message: str) -> str:
    """training.data names its Python parameters ("pass label_column= ..."); name the flags."""
    return _PARAM.sub(lambda m: "--format " if m.group(1) == "file_format" else f"--{m.group(1).replace('_', '-')} ", message)


def _library_bars(args: argparse.Namespace) -> None:
    """--no-progress quiets the libraries' bars too (transformers' "Loading weights", a GGUF
    file's conversion), not only ours."""
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _guarded(prog: str, run: Callable[[], int]) -> int:
    """Run a command; anything a person can cause becomes one line on stderr and exit status 1."""
    from service.errors import AdaptserveError
    from training.publish import PublishError

    try:
        return run()
    except DataError as err:
        message = _for_cli(str(err))
    except (ConfigError, PublishError) as err:
        message = str(err)
    except AdaptserveError as err:  # bad task name, missing task/store, a bundle that does not fit
        message = err.message
    except OSError as err:  # a store or output path that cannot be written
        message = f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def _check_paths(device: str, *, inputs: Sequence[tuple[str, Path | None]] = (), store: Path | None = None,
                 task: str | None = None, publish: str | None = None, publish_full: Path | None = None,
                 json_out: Path | None = None, token: str | None = None) -> None:
    """Before any work: the device, the files a run reads late (`inputs`: (flag, path)), and every
    place it writes (--store directory and `task`'s directory in it, --publish-full directory,
    --publish URL, --json file). A run that trains for an hour and then cannot write its result,
    or publishes and then cannot read its test file, has wasted the hour or left a half-done job
    behind."""
    from service.engine.backbone import resolve_device

    try:
        resolve_device(device)
    except ValueError as err:
        raise ConfigError(f"--device: {err}") from None
    for flag, path in inputs:
        if path is not None and not path.is_file():
            raise DataError(f"{flag} {path}: {'is a directory' if path.is_dir() else 'file not found'}")
        if path is not None and not os.access(path, os.R_OK):
            raise DataError(f"{flag} {path}: permission denied")
    if store is not None:
        if task is not None:
            _check_task_dir(store, task)
        _check_dir("--store", store)
    if publish is not None:
        from training.publish import PublishError, probe

        try:
            probe(publish, token)
        except PublishError as err:
            raise ConfigError(f"{err} (checked before training)") from None
    if publish_full is not None:
        from training.full import holds_backbone

        _check_dir("--publish-full", publish_full)
        holds_backbone(publish_full)  # refuses a DIR that already holds a backbone: its tasks need it
    out = json_out
    if out is not None:
        if out.is_dir():
            raise ConfigError(f"--json {out}: is a directory; name a file")
        parent = out.parent  # Path("x.json").parent is "."
        if not parent.is_dir():
            what = "is a file" if parent.exists() else "does not exist"
            raise ConfigError(f"--json {out}: the directory {parent} {what}")
        why = _unwritable_file(out) if out.exists() else _unwritable(parent)  # a real write, not os.access (root)
        if why:
            raise ConfigError(f"--json {out}: cannot be written ({why}); name a file this user can write")


def input_path(value: str) -> Path:
    """An argparse type for a file or folder the command reads (--data, --backbone, ...): an empty
    value is refused, not read as `Path("")`, which is `.` and would be reported as ". : is a
    directory, not a data file", naming a path the user never wrote. Write `.` to mean that."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; name the file or folder to read")
    return Path(value)


def json_or_path(value: str) -> str | Path:
    """An argparse type for an option that takes JSON inline or a file of it (--patterns): JSON (it
    starts with `[` or `{`) is kept as typed, since a `Path` would rewrite it (`http://` collapses
    to `http:/`); anything else is a path, as `input_path` takes it."""
    return value if value.lstrip().startswith(("[", "{")) else input_path(value)


def directory(value: str) -> Path:
    """An argparse type for directories the command writes into: an empty value is refused, not
    read as the current directory (`Path("")` is `.`), which would scatter a store's task folders
    into wherever the command ran. Write `.` to mean that."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; name the directory (write . for the current one)")
    return Path(value)


def output_file(value: str) -> Path:
    """An argparse type for a file the command writes (--json): an empty value is refused, not
    read as `Path("")`, which is `.` and would be reported as "--json .: is a directory", naming
    a path the user never wrote."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; name the file to write")
    return Path(value)


def _check_dir(flag: str, path: Path) -> None:
    """`path` is a writable directory, or one that can be made (its nearest existing ancestor is)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise ConfigError(f"{flag} {path}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
        raise ConfigError(f"{flag} {path}: {where}, not a directory")
    if existing == path and (why := _unwritable(path)):  # the directory itself: probed with a real write
        raise ConfigError(f"{flag} {path}: cannot be written into ({why}); make it writable by this user, or "
                          f"pass another {flag}")
    if existing != path and (why := _unwritable(existing, directory=True)):  # where it would be made: a real mkdir
        raise ConfigError(f"{flag} {path}: cannot be made in {existing} ({why}); pass a {flag} this user can create")


def _check_task_dir(store: Path, task: str) -> None:
    """`<store>/<task>/`, where an earlier version left it, takes the new version and the ACTIVE
    pointer (service.engine.bundle.write_bundle): one that refuses writes would otherwise be found
    only after training, at the publish."""
    task_dir = store / task
    if task_dir.is_symlink() and not task_dir.exists():
        raise ConfigError(f"--store {store}: the task directory {task_dir} is a broken symbolic link")
    if not task_dir.exists():
        return  # made at the publish, in the store: _check_dir's
    if not task_dir.is_dir():
        raise ConfigError(f"--store {store}: {task_dir} is a file, not a task directory; move it away, or pass "
                          "another --store")
    why = _unwritable(task_dir)
    if why:
        raise ConfigError(f"--store {store}: the task directory {task_dir} cannot be written into ({why}); make it "
                          f"writable by this user (e.g. chmod u+w {task_dir}), or pass another --store")


def _unwritable(parent: Path, directory: bool = False) -> str | None:
    """Why no file (or, `directory`, no folder) can be made in `parent`, or None: a probe, made and
    removed at once (a dot-name no store lists). Not os.access: root passes it whatever the mode
    bits say, and some file systems (/proc, /sys, a network mount that checks on the server)
    refuse only the write."""
    try:
        if directory:
            os.rmdir(tempfile.mkdtemp(prefix=".adaptserve-probe-", dir=parent))
            return None
        fd, probe = tempfile.mkstemp(prefix=".adaptserve-probe-", dir=parent)
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    os.unlink(probe)
    return None


def _unwritable_file(path: Path) -> str | None:
    """Why the existing file `path` cannot be written, or None: opened for appending, which
    changes nothing (no byte written, the content and the modification time stay)."""
    try:
        with open(path, "ab"):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def _load_backbone(path: Path | None, device: str, dtype: str):
    from service.engine.backbone import load_backbone

    try:
        return load_backbone(path, device=device, dtype=dtype)
    except (ValueError, OSError) as err:  # not a model folder, unsupported family, bad device
        raise ConfigError(f"--backbone {path or '(bundled MiniLM)'}: {err}") from None


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
