"""`adaptserve train` / `adaptserve evaluate`: the happy paths end to end, and every bad input
ending in one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import json
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from service.engine.engine import Engine
from training.cli import evaluate_main, main
from training.data import load_splits
from training.evaluate import load_published
from training.publish import save_to_store
from training.report import format_metrics
from training.trainer import evaluate, train
from tests.factories import random_head
from tests.training.conftest import tiny_config

FAST = ["--max-steps", "1", "--batch-size", "8", "--max-length", "24", "--no-progress"]


def _error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), err
    return last


# -- train: bad inputs ---------------------------------------------------------------------------------
@dataclass
class Bad:
    id: str
    args: list[str]  # {train}/{dev}/{tmp}/{backbone} are filled in
    expected: str
    files: dict[str, str] = field(default_factory=dict)  # extra files in tmp: name -> content
    status: int = 1


TRAIN_OK = "--data {train} --dev {dev} --backbone {backbone} --store {tmp}/store"
BAD_TRAIN = [
    Bad("missing file", ["--task", "t", "--method", "lora", "--data", "{tmp}/nope.csv", "--dev", "{dev}", "--store", "{tmp}/s"],
        "nope.csv: file not found"),
    Bad("a directory", ["--task", "t", "--method", "lora", "--data", "{tmp}/d.csv", "--dev", "{dev}", "--store", "{tmp}/s"],
        "d.csv: is a directory", files={"d.csv/": ""}),
    Bad("unknown extension", ["--task", "t", "--method", "lora", "--data", "{tmp}/t.txt", "--dev", "{dev}", "--store", "{tmp}/s"],
        "cannot tell the format from extension '.txt'; name the file .csv / .tsv / .jsonl / .ndjson or pass --format one of",
        files={"t.txt": "text,label\na,pos\nb,neg\n"}),
    Bad("empty file", ["--task", "t", "--method", "lora", "--data", "{tmp}/empty.csv", "--dev", "{dev}", "--store", "{tmp}/s"],
        "empty.csv: file is empty", files={"empty.csv": ""}),
    Bad("unknown label column", ["--task", "t", "--method", "lora", *TRAIN_OK.split(), "--label-column", "gold"],
        "no column 'gold' (the file has columns: text, label); pass --label-column to use another column"),
    Bad("unknown text column", ["--task", "t", "--method", "lora", *TRAIN_OK.split(), "--text-column", "sentence"],
        "no column 'sentence'"),
    Bad("dev label missing from train", ["--task", "t", "--method", "lora", "--data", "{train}", "--dev", "{tmp}/dev3.csv", "--store", "{tmp}/s"],
        "label not in the training labels (neg, pos): 'meh'", files={"dev3.csv": "text,label\ngood,pos\nok,meh\n"}),
    Bad("single class", ["--task", "t", "--method", "lora", "--data", "{tmp}/one.csv", "--dev", "{dev}", "--store", "{tmp}/s"],
        "every training row (2) has label 'pos'", files={"one.csv": "text,label\ngood,pos\nfun,pos\n"}),
    Bad("not utf-8", ["--task", "t", "--method", "lora", "--data", "{tmp}/latin.csv", "--dev", "{dev}", "--store", "{tmp}/s"],
        "not valid UTF-8", files={"latin.csv": "text,label\ncaf\udce9,pos\nbad,neg\n"}),
    Bad("pairs in train only", ["--task", "t", "--method", "lora", "--data", "{tmp}/p.csv", "--dev", "{dev}", "--store", "{tmp}/s"],
        "disagree on sentence pairs", files={"p.csv": "text,text_pair,label\na,b,pos\nc,d,neg\n"}),
    Bad("bad task name", ["--task", "Bad Name", "--method", "lora", *TRAIN_OK.split()], "invalid task name 'Bad Name'"),
    Bad("option of another method", ["--task", "t", "--method", "adapter", "--lora-r", "4", *TRAIN_OK.split()],
        "--lora-r applies to --method lora, not --method adapter"),
    Bad("unknown lora site", ["--task", "t", "--method", "lora", "--lora-targets", "query,qkv", *TRAIN_OK.split()],
        "--lora-targets must name sites among query,key,value,attn_out,ffn_in,ffn_out"),
    Bad("negative prefix projection", ["--task", "t", "--method", "prefix", "--prefix-projection", "-2", *TRAIN_OK.split()],
        "--prefix-projection must be a non-negative integer (0 = none), got -2"),
    Bad("prefix projection for lora", ["--task", "t", "--method", "lora", "--prefix-projection", "8", *TRAIN_OK.split()],
        "--prefix-projection applies to --method prefix, not --method lora"),
    Bad("ema decay of 1", ["--task", "t", "--method", "lora", "--ema", "1", *TRAIN_OK.split()],
        "--ema must be a decay in [0, 1) (0 = off), got 1.0"),
    Bad("zero epochs", ["--task", "t", "--method", "head", "--epochs", "0", *TRAIN_OK.split()], "--epochs must be an integer >= 1"),
    Bad("full into a store", ["--task", "t", "--method", "full", *TRAIN_OK.split()], "pass --publish-full DIR"),
    Bad("publish-full for lora", ["--task", "t", "--method", "lora", "--data", "{train}", "--dev", "{dev}", "--publish-full", "{tmp}/f"],
        "--publish-full is for --method full"),
    Bad("not a backbone", ["--task", "t", "--method", "lora", "--data", "{train}", "--dev", "{dev}", "--backbone", "{tmp}", "--store", "{tmp}/s"],
        "has no config.json"),
    Bad("backbone that does not exist", ["--task", "t", "--method", "lora", "--data", "{train}", "--dev", "{dev}", "--backbone",
                                         "{tmp}/nowhere", "--store", "{tmp}/s"], "backbone '{tmp}/nowhere' does not exist"),
    Bad("data that is a directory", ["--task", "t", "--method", "head", "--data", "{tmp}/adir", "--dev", "{dev}", "--store", "{tmp}/s"],
        "{tmp}/adir: is a directory, not a data file", files={"adir/": ""}),
    Bad("prompt too long", ["--task", "t", "--method", "prompt", "--prompt-length", "60", *TRAIN_OK.split(), "--max-length", "24"],
        "--max-length 24 + 60 virtual tokens exceeds the backbone's 64 positions"),
    Bad("pooler on a backbone without one", ["--task", "t", "--method", "head", "--pooling", "pooler", *TRAIN_OK.split(),
                                              "--backbone", "{tmp}/distil", "--max-length", "24"], "needs a backbone with a pooler"),
    Bad("infinite lr", ["--task", "t", "--method", "lora", "--lr", "inf", *TRAIN_OK.split()], "--lr must be a finite number, got inf"),
    Bad("absurd lr", ["--task", "t", "--method", "lora", "--lr", "1e30", *TRAIN_OK.split()],
        "--lr must be in (0, 3], got 1e+30 (the methods' defaults are 5e-05 to 0.03)"),
    Bad("nan warmup", ["--task", "t", "--method", "lora", "--warmup-ratio", "nan", *TRAIN_OK.split()],
        "--warmup-ratio must be a finite number, got nan"),
    Bad("infinite lora alpha", ["--task", "t", "--method", "lora", "--lora-alpha", "inf", *TRAIN_OK.split()],
        "--lora-alpha must be a positive finite number, got inf"),
    Bad("unknown device", ["--task", "t", "--method", "lora", "--device", "banana", *TRAIN_OK.split()],
        "--device: unknown device 'banana': use auto, cpu, cuda or cuda:N"),
    Bad("json into a missing directory", ["--task", "t", "--method", "head", *TRAIN_OK.split(), "--json", "{tmp}/no/dir/x.json"],
        "--json {tmp}/no/dir/x.json: the directory {tmp}/no/dir does not exist"),
    Bad("store is a file", ["--task", "t", "--method", "head", "--data", "{train}", "--dev", "{dev}", "--store", "{tmp}/afile"],
        "--store {tmp}/afile: is a file, not a directory", files={"afile": "x"}),
    Bad("store under a file", ["--task", "t", "--method", "head", "--data", "{train}", "--dev", "{dev}", "--store", "{tmp}/afile/s"],
        "--store {tmp}/afile/s: cannot be made: {tmp}/afile is a file, not a directory", files={"afile": "x"}),
    Bad("publish URL that is not http", ["--task", "t", "--method", "head", "--data", "{train}", "--dev", "{dev}",
                                          "--publish", "ftp://host"], "--publish needs an http:// or https:// URL with a host, got 'ftp://host'"),
    Bad("publish URL without a host", ["--task", "t", "--method", "head", "--data", "{train}", "--dev", "{dev}",
                                       "--publish", "http://"], "--publish needs an http:// or https:// URL with a host, got 'http://'"),
    Bad("tab-separated .csv", ["--task", "t", "--method", "head", "--data", "{tmp}/tabs.csv", "--dev", "{dev}", "--store", "{tmp}/s"],
        "its header is one column holding tabs: if the file is TSV, pass --format tsv",
        files={"tabs.csv": "text\tlabel\ngood\tpos\nbad\tneg\n"}),
    Bad("prefix on a causal LM", ["--task", "t", "--method", "prefix", "--data", "{train}", "--dev", "{dev}", "--backbone", "{tmp}/lm",
                                  "--template", "{{text}} it was {{mask}}", "--verbalizer", "neg=bad;pos=good", "--store", "{tmp}/s", *FAST],
        "prefix tuning is not supported on causal-LM backbones"),
    Bad("template leaves no room", ["--task", "t", "--method", "lora", "--data", "{train}", "--dev", "{dev}", "--backbone", "{tmp}/lm",
                                    "--template", "{{text}} it was a very good and fun movie it was {{mask}}",
                                    "--verbalizer", "neg=bad;pos=good", "--store", "{tmp}/s", *FAST[:4], "--max-length", "8"],
        "leaves no room for the input within max_length 8: its own tokens (special tokens, template text and answer slot) "
        "take 12; raise --max-length or shorten the template"),
    Bad("repeated verbalizer label", ["--task", "t", "--method", "lora", "--data", "{train}", "--dev", "{dev}", "--backbone", "{tmp}/lm",
                                      "--template", "{{text}} it was {{mask}}", "--verbalizer", "neg=bad;neg=terrible;pos=good",
                                      "--store", "{tmp}/s"],
        "--verbalizer: label 'neg' is given twice"),
    Bad("nothing listening at --publish", ["--task", "t", "--method", "head", "--data", "{train}", "--dev", "{dev}",
                                           "--backbone", "{backbone}", "--publish", "http://127.0.0.1:9", *FAST], "cannot reach http://127.0.0.1:9"),
    Bad("no output given", ["--task", "t", "--method", "lora", "--data", "{train}", "--dev", "{dev}"],
        "one of the arguments --store --publish --publish-full --no-publish is required", status=2),
    Bad("unknown method", ["--task", "t", "--method", "bitfit", *TRAIN_OK.split()], "argument --method: invalid choice", status=2),
    Bad("early exit on a prompt task", ["--task", "t", "--method", "lora", "--early-exit", "--data", "{train}", "--dev", "{dev}",
                                        "--backbone", "{tmp}/lm", "--template", "{{text}} it was {{mask}}",
                                        "--verbalizer", "neg=bad;pos=good", "--store", "{tmp}/s"],
        "--early-exit trains exit classifiers that hand the last layer to the task's head"),
    Bad("empty --store", ["--task", "t", "--method", "head", "--data", "{train}", "--dev", "{dev}", "--store", ""],
        "argument --store: an empty path; name the directory (write . for the current one)", status=2),
    Bad("LoRA on a gate the backbone lacks", ["--task", "t", "--method", "lora", "--lora-targets", "query,ffn_gate",
                                              *TRAIN_OK.split()],
        "--lora-targets ffn_gate: this backbone has no such linear (its linears: query,key,value,attn_out,ffn_in,ffn_out; "
        "only a gated FFN has ffn_gate)"),
    Bad("LoRA rank past the hidden size", ["--task", "t", "--method", "lora", "--lora-r", "33", *TRAIN_OK.split()],
        "--lora-r 33 exceeds the backbone's hidden size 32"),
    Bad("bottleneck past the hidden size", ["--task", "t", "--method", "adapter", "--adapter-bottleneck", "100000",
                                            *TRAIN_OK.split()],
        "--adapter-bottleneck 100000 exceeds the backbone's hidden size 32"),
    Bad("seed past 64 bits", ["--task", "t", "--method", "head", "--seed", str(2**64 - 1), "--data", "{train}", "--dev", "{dev}",
                              "--store", "{tmp}/s"], "--seed must be an integer in [-2^63, 2^63)"),
    Bad("a device this build does not run on", ["--task", "t", "--method", "head", "--device", "mps", "--data", "{train}",
                                                "--dev", "{dev}", "--store", "{tmp}/s"],
        "device 'mps' is not supported: use auto, cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("case", BAD_TRAIN, ids=[c.id for c in BAD_TRAIN])
def test_train_bad_input(case, csvs, tiny_dir, tmp_path, capsys):
    for name, content in case.files.items():
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(content.encode("utf-8", "surrogateescape"))
    if "{tmp}/distil" in case.args:
        from tests.factories import save_tiny_backbone

        save_tiny_backbone("distilbert", tmp_path / "distil")
    if "{tmp}/lm" in case.args:
        from tests.factories import save_tiny_lm

        save_tiny_lm("causal", tmp_path / "lm")
    fill = dict(train=csvs["train"], dev=csvs["dev"], tmp=tmp_path, backbone=tiny_dir)
    args = [a.format(**fill) for a in case.args]
    if case.status == 2:  # argparse's own usage errors
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and case.expected in capsys.readouterr().err
        return
    assert main(args) == case.status
    assert case.expected.format(**fill) in _error_line(capsys, "adaptserve train")
    assert not (tmp_path / "store").exists() and not (tmp_path / "s").exists()  # nothing was published


# Directories the publish cannot write into, found before training. Root writes through mode bits
# (the chmod case is skipped for it, as tests/training/test_data.py's unreadable file is); sysfs and
# procfs refuse a new file to anyone, root included, and /sys and /proc/self pass os.access for root.
UNWRITABLE = [
    ("read-only task directory", "{tmp}/store", "t", "the task directory {tmp}/store/t cannot be written into (Permission denied); "
     "make it writable by this user (e.g. chmod u+w {tmp}/store/t), or pass another --store"),
    ("task directory that refuses files", "/sys", "kernel", "--store /sys: the task directory /sys/kernel cannot be written into"),
    ("store that refuses files", "/proc/self/fd", "t", "--store /proc/self/fd: cannot be written into"),
    ("task directory that is a file", "{tmp}/store", "t", "--store {tmp}/store: {tmp}/store/t is a file, not a task directory"),
    ("store still to be made where nothing can be", "/proc/adaptserve-store", "t",
     "--store /proc/adaptserve-store: cannot be made in /proc ("),
]


@pytest.mark.parametrize("store, task, expected", [c[1:] for c in UNWRITABLE], ids=[c[0] for c in UNWRITABLE])
def test_a_store_that_cannot_take_the_task_is_refused_before_training(
        store, task, expected, csvs, tiny_dir, tmp_path, capsys, monkeypatch):
    """The publish writes the new version and ACTIVE into <store>/<task>/ (or makes it in <store>):
    one that refuses writes used to be found only after training, at the write."""
    import os

    fill = dict(tmp=tmp_path)
    store, expected = Path(store.format(**fill)), expected.format(**fill)
    if store.is_relative_to(tmp_path):
        store.mkdir()
        if "is a file" in expected:
            (store / task).write_text("x")
        else:
            if os.geteuid() == 0:
                pytest.skip("root writes into a read-only directory")
            (store / task).mkdir(mode=0o555)
    elif not (store / task if task == "kernel" else store if store.exists() else store.parent).is_dir():
        pytest.skip(f"needs {store} (Linux)")
    monkeypatch.setattr("training.trainer.train", lambda *a, **k: pytest.fail("trained before the store was checked"))
    assert main(["--task", task, "--method", "head", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]),
                 "--backbone", str(tiny_dir), "--store", str(store), *FAST]) == 1
    assert expected in _error_line(capsys, "adaptserve train")
    if store.is_relative_to(tmp_path):
        assert [p.name for p in store.iterdir()] == [task]  # no probe file left behind


@pytest.mark.parametrize("lr", ["1e38", "1e20", "1e10"])
def test_a_diverging_run_stops_and_publishes_nothing(lr, csvs, tiny_dir, tmp_path, capsys, monkeypatch):
    """1e38: AdamW's step overflows float32; 1e20: the loss turns NaN; 1e10 (one step): the weights
    stay finite but the dev scores do not. Each stops with the learning rate named. (Rates this
    high are refused up front, MAX_LR; runs diverge under it too, on bad data or in half
    precision, so the guard is tested here with the cap lifted.)"""
    monkeypatch.setattr("training.config.MAX_LR", float("inf"))
    rc = main(["--task", "t", "--method", "lora", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]), "--lr", lr,
               "--backbone", str(tiny_dir), "--store", str(tmp_path / "store"), "--json", str(tmp_path / "x.json"),
               "--max-steps", "2" if lr != "1e10" else "1", "--batch-size", "8", "--max-length", "24", "--no-progress"])
    assert rc == 1
    line = _error_line(capsys, "adaptserve train")
    assert "training diverged: " in line and f"the learning rate (peak {float(lr):g}" in line and "lower it (--lr" in line
    assert not (tmp_path / "store").exists() and not (tmp_path / "x.json").exists()


def test_no_progress_quiets_the_libraries_bars_too(csvs, tiny_dir, tmp_path, capsys, monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(hf_logging, "_tqdm_active", True)  # whatever an earlier test left; restored after
    args = ["--task", "t", "--method", "head", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]), "--backbone",
            str(tiny_dir), "--no-publish", "--max-steps", "1", "--batch-size", "8", "--max-length", "24"]
    assert main(args) == 0
    assert "Loading weights" in capsys.readouterr().err  # the bar this test is about, without the flag
    assert main([*args, "--no-progress"]) == 0
    assert "Loading weights" not in capsys.readouterr().err


# -- train: the happy paths ----------------------------------------------------------------------------
def test_train_cli_publishes_a_servable_task(csvs, tiny, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = main(["--task", "cli-task", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]), "--test", str(csvs["test"]),
               "--method", "adapter", "--adapter-kind", "houlsby", "--adapter-bottleneck", "4", "--backbone", str(tiny_dir),
               "--store", str(tmp_path / "store"), "--json", str(out), *FAST])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "training summary" in stdout and "per class (test)" in stdout
    summary = json.loads(out.read_text())
    version = summary["published"]["version"]
    assert (f"published cli-task@{version} to {tmp_path / 'store' / 'cli-task' / version} (active in the store; a "
            f"service on a Redis registry serves it once activated: POST /v1/tasks/cli-task/versions/{version}/activate)"
            ) in stdout  # a write into the store does not reach Redis
    assert summary["training"]["hyperparameters"]["adapter"]["kind"] == "houlsby"
    timing = summary["timing"]  # the run's, kept out of the bundle (its content hash is the version)
    assert timing["train_seconds"] > 0 and len(timing["epoch_seconds"]) == summary["training"]["epochs_run"]
    assert timing["finished"].endswith("+00:00")
    task = load_published(Engine(tiny), tmp_path / "store", "cli-task")
    assert task.key.version == summary["published"]["version"]
    assert task.weights["adapter"].bottleneck == 4


def test_unshifted_prefix_keeps_the_text_positions(csvs, tiny, tiny_dir, tmp_path, capsys):
    """--no-prefix-shift-positions: the prefix takes no positions from the table (so max length +
    prefix may exceed it) and the bundle says the text is not shifted; shifted, the same is refused."""
    base = ["--task", "unshifted", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]), "--method", "prefix",
            "--prefix-length", "8", "--backbone", str(tiny_dir), "--store", str(tmp_path / "store"),
            "--max-steps", "1", "--batch-size", "8", "--max-length", "60", "--no-progress"]
    assert main(base) == 1
    assert "--max-length 60 + 8 virtual tokens exceeds the backbone's 64 positions" in _error_line(capsys, "adaptserve train")
    assert main([*base, "--no-prefix-shift-positions"]) == 0
    task = load_published(Engine(tiny), tmp_path / "store", "unshifted")
    assert task.weights["prefix"].shift_positions is False and task.weights["prefix"].positions_used == 0


def test_full_cli_writes_backbone_and_head(csvs, tiny_dir, tmp_path, capsys):
    rc = main(["--task", "full-task", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]), "--method", "full",
               "--backbone", str(tiny_dir), "--publish-full", str(tmp_path / "full"), *FAST])
    assert rc == 0
    assert "adaptserve serve --backbone" in capsys.readouterr().out
    assert (tmp_path / "full" / "backbone" / "config.json").is_file()
    rc = evaluate_main(["--task", "full-task", "--store", str(tmp_path / "full" / "store"), "--data", str(csvs["dev"]),
                        "--backbone", str(tmp_path / "full" / "backbone"), "--no-progress"])
    assert rc == 0 and "accuracy=" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["backbone", "store"]  # no temp folder left


def test_second_publish_full_into_one_dir_is_refused(csvs, tiny_dir, tmp_path, capsys):
    """A second run would overwrite DIR/backbone, which DIR/store's tasks are fingerprinted to:
    refused before training, and the first run's task still loads."""
    args = ["--task", "full-task", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]), "--method", "full",
            "--backbone", str(tiny_dir), "--publish-full", str(tmp_path / "full"), *FAST]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "full" / "backbone").iterdir()}
    assert main([*args, "--seed", "7"]) == 1
    line = _error_line(capsys, "adaptserve train")
    assert f"{tmp_path / 'full' / 'backbone'} already holds a backbone from an earlier run" in line
    assert "pass a new --publish-full DIR" in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "full" / "backbone").iterdir()} == before
    assert evaluate_main(["--task", "full-task", "--store", str(tmp_path / "full" / "store"), "--data", str(csvs["dev"]),
                          "--backbone", str(tmp_path / "full" / "backbone"), "--no-progress"]) == 0


def test_save_full_keeps_the_same_backbone_and_refuses_another(tiny, tmp_path):
    from training.config import ConfigError
    from training.full import save_full, trainable_copy

    head = {"head": random_head(tiny.info, torch.Generator())}
    cfg = {"labels": ["neg", "pos"], "max_length": 24}
    tuned = trainable_copy(tiny)
    first = save_full(tmp_path, "t", tuned, cfg, head)
    again = save_full(tmp_path, "t", tuned, cfg, head)  # the very same backbone: kept, nothing rewritten
    assert again.version == first.version
    with torch.no_grad():
        next(tuned.model.parameters()).add_(1.0)
    with pytest.raises(ConfigError, match=r"already holds another backbone \(sha256:.*pass a new --publish-full DIR"):
        save_full(tmp_path, "t", tuned, cfg, head)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", "store"]


# -- evaluate ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published(tiny, csvs, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    splits = load_splits(csvs["train"], csvs["dev"], csvs["test"])
    result = train(splits, tiny_config("lora", max_steps=4), name="ev", backbone=tiny, progress=False)
    save_to_store(result, store)
    return store, result, splits


def test_evaluate_scores_through_the_serving_path(published, csvs, tiny_dir, tmp_path, capsys):
    store, result, splits = published
    out = tmp_path / "m.json"
    rc = evaluate_main(["--task", "ev", "--store", str(store), "--data", str(csvs["test"]), "--backbone", str(tiny_dir),
                        "--batch-size", "5", "--json", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    # the served scores equal the trainer's own on the same file (same weights, same math)
    expected = evaluate(result.engine, result.task, splits.test)
    assert format_metrics(expected) in printed
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == expected.accuracy and saved["macro_f1"] == expected.macro_f1 and saved["n"] == 16


BAD_EVAL = [
    Bad("unknown task", ["--task", "nope", "--store", "{store}", "--data", "{test}"], "task 'nope' not found"),
    # named by the flag the user gave, not the server's ADAPTSERVE_STORE (which evaluate never reads)
    Bad("not a store", ["--task", "ev", "--store", "{tmp}/none", "--data", "{test}"],
        "error: --store {tmp}/none: does not exist; name the store directory the task was published into"),
    Bad("store is a file", ["--task", "ev", "--store", "{tmp}/x.csv", "--data", "{test}"],
        "error: --store {tmp}/x.csv: is not a directory; name the store directory", files={"x.csv": "text,label\n"}),
    Bad("label the task does not know", ["--task", "ev", "--store", "{store}", "--data", "{tmp}/x.csv"],
        "label not in the training labels (neg, pos): 'meh'", files={"x.csv": "text,label\ngood,pos\nok,meh\n"}),
    Bad("pairs for a single-text task", ["--task", "ev", "--store", "{store}", "--data", "{tmp}/p.csv"],
        "task 'ev' classifies single texts, but the file has a pair column", files={"p.csv": "text,text_pair,label\na,b,pos\n"}),
    Bad("missing data", ["--task", "ev", "--store", "{store}", "--data", "{tmp}/nope.csv"], "file not found"),
    Bad("unknown version", ["--task", "ev", "--store", "{store}", "--data", "{test}", "--version", "v9"], "has no version 'v9'"),
    Bad("other backbone", ["--task", "ev", "--store", "{store}", "--data", "{test}", "--backbone", "{tmp}/other"],
        "trained on backbone"),
    Bad("unknown device", ["--task", "ev", "--store", "{store}", "--data", "{test}", "--device", "banana"],
        "--device: unknown device 'banana'"),
    Bad("json into a missing directory", ["--task", "ev", "--store", "{store}", "--data", "{test}", "--json", "{tmp}/no/m.json"],
        "the directory"),
]


@pytest.mark.parametrize("case", BAD_EVAL, ids=[c.id for c in BAD_EVAL])
def test_evaluate_bad_input(case, published, csvs, tiny_dir, tmp_path, capsys):
    for name, content in case.files.items():
        (tmp_path / name).write_text(content)
    if "{tmp}/other" in case.args:
        from tests.factories import save_tiny_backbone

        save_tiny_backbone("bert", tmp_path / "other", seed=1)
    fill = dict(store=published[0], test=csvs["test"], tmp=tmp_path)
    args = [a.format(**fill) for a in case.args]
    if "--backbone" not in args:
        args += ["--backbone", str(tiny_dir)]
    assert evaluate_main(args + ["--no-progress"]) == case.status
    line = _error_line(capsys, "adaptserve evaluate")
    assert case.expected.format(**fill) in line and "ADAPTSERVE_STORE" not in line


def _commands() -> dict:
    """Each subcommand's parser and the least command line it takes (no output choice: --no-publish
    is added unless the flag under test is one)."""
    from training.cli import build_evaluate_parser, build_train_parser
    from training.fewshot_cli import build_pet_parser, build_zeroshot_parser

    return {
        "train": (build_train_parser, "--task t --data a.csv --dev b.csv --method head"),
        "evaluate": (build_evaluate_parser, "--task t --store s --data a.csv"),
        "pet": (build_pet_parser, "--task t --data a.csv --unlabelled u.csv --dev b.csv --patterns p.json --backbone lm"),
        "zeroshot": (build_zeroshot_parser, "--task t --descriptions a=b"),
    }


def _path_flags(parser) -> list[str]:
    """The options that name a file or folder: found by their argparse type, so a new one is in the
    table below without being listed."""
    from training.cli import directory, input_path, json_or_path, output_file

    return [a.option_strings[0] for a in parser._actions if a.type in (input_path, directory, output_file, json_or_path)]


PATH_FLAGS = [(command, flag) for command, (build, _) in _commands().items() for flag in _path_flags(build())]


# Options whose help mentions a file but that name none: inline text or a file ("" is an empty
# mapping, refused as such), and a column name.
NOT_PATHS = {"--verbalizer", "--descriptions", "--text-pair-column"}


def test_the_path_flag_table_holds_every_path_flag():
    """A path option typed plain `Path` (or untyped, its help naming a file or folder, as
    --patterns was) would read "" as `.`: every one has a type that refuses it."""
    import re

    found = {c: {f for command, f in PATH_FLAGS if command == c} for c in _commands()}
    assert {"--data", "--dev", "--test", "--backbone", "--store", "--publish-full", "--json"} <= found["train"]
    assert {"--data", "--backbone", "--store", "--json"} <= found["evaluate"]
    assert {"--data", "--dev", "--test", "--unlabelled", "--patterns", "--backbone", "--student-backbone", "--store",
            "--json"} <= found["pet"]
    assert {"--test", "--backbone", "--store", "--json"} <= found["zeroshot"]
    for command, (build, _) in _commands().items():
        for a in build()._actions:
            flag = a.option_strings[0] if a.option_strings else a.dest
            assert a.type is not Path, f"{command} {flag}: typed Path, which reads '' as '.'"
            names_a_path = a.nargs != 0 and not a.choices and re.search(r"\b(file|folder|directory|DIR)\b",
                                                                         f"{a.help} {a.metavar}")
            if names_a_path and flag not in NOT_PATHS:
                assert flag in found[command], f"{command} {flag}: names a path but is not a path type"


@pytest.mark.parametrize("command, flag", PATH_FLAGS, ids=[f"{c} {f}" for c, f in PATH_FLAGS])
def test_an_empty_path_is_refused_naming_the_flag(command, flag, capsys):
    """`--data ""` is `Path("")`, which is `.`: it used to be reported as ". : is a directory, not a
    data file", a path nobody typed. Every path flag of every subcommand refuses it in argparse,
    exit status 2, before anything runs."""
    build, args = _commands()[command]
    base = args.split() + ([] if command == "evaluate" or flag in ("--store", "--publish-full") else ["--no-publish"])
    with pytest.raises(SystemExit) as exit_:
        build().parse_args([*base, flag, ""])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: an empty path; name the " in err, err
    assert "Traceback" not in err
    for blank in (" ", "\t"):
        with pytest.raises(SystemExit):
            build().parse_args([*base, flag, blank])
    given = build().parse_args([*base, flag, "x"])
    assert Path("x") in [v for v in vars(given).values() if isinstance(v, Path)]


def test_an_empty_json_path_is_named_as_a_file_to_write(capsys):
    from training.cli import build_evaluate_parser

    with pytest.raises(SystemExit):
        build_evaluate_parser().parse_args(["--task", "t", "--store", "s", "--data", "a.csv", "--json", ""])
    assert "argument --json: an empty path; name the file to write" in capsys.readouterr().err


def test_an_empty_data_path_is_not_read_as_the_current_directory(csvs, tmp_path, capsys):
    """End to end through `adaptserve train`: exit status 2 and the flag, never ". : is a directory"."""
    with pytest.raises(SystemExit) as exit_:
        main(["--task", "t", "--method", "head", "--data", "", "--dev", str(csvs["dev"]), "--no-publish"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "adaptserve train: error: argument --data: an empty path; name the file or " \
        "folder to read" in err and ". :" not in err, err


def test_evaluate_names_the_task_of_a_broken_bundle(csvs, tiny_dir, tmp_path, capsys):
    bundle = tmp_path / "store" / "hand" / "v1"  # a hand-named version: no content hash to catch the edit
    bundle.mkdir(parents=True)
    (bundle / "adapter_config.json").write_text('{"labels": ["neg", "pos"],')
    (bundle / "adapter_model.safetensors").write_bytes(b"")
    (bundle.parent / "ACTIVE").write_text("v1\n")
    args = ["--task", "hand", "--store", str(tmp_path / "store"), "--data", str(csvs["test"]), "--backbone", str(tiny_dir)]
    assert evaluate_main(args + ["--no-progress"]) == 1
    assert "task hand@v1 in the store: adapter_config.json is not valid UTF-8 JSON" in _error_line(capsys, "adaptserve evaluate")


def test_evaluate_names_the_dtypes_it_knows(published, csvs, tiny_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--task", "ev", "--store", str(published[0]), "--data", str(csvs["test"]), "--dtype", "int8",
                       "--backbone", str(tiny_dir)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--dtype: invalid choice: 'int8'" in err and "bfloat16" in err


@pytest.mark.parametrize("entry", ["python -m training", "adaptserve"])
def test_entry_points_run_evaluate(entry, published, csvs, tiny_dir, monkeypatch, capsys):
    """`python -m training evaluate ...` and `adaptserve evaluate ...` (service.cli) reach evaluate_main."""
    args = ["evaluate", "--task", "ev", "--store", str(published[0]), "--data", str(csvs["dev"]),
            "--backbone", str(tiny_dir), "--no-progress"]
    if entry == "adaptserve":
        from service.cli import main as adaptserve

        assert adaptserve(args) == 0
    else:
        monkeypatch.setattr(sys, "argv", ["python -m training", *args])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module("training", run_name="__main__")
        assert exit_.value.code == 0
    assert "ev@" in capsys.readouterr().out


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device every write to fails with ENOSPC)")
def test_a_json_file_that_cannot_be_written_is_named(published, csvs, tiny_dir, capsys):
    args = ["--task", "ev", "--store", str(published[0]), "--data", str(csvs["test"]), "--backbone", str(tiny_dir),
            "--json", "/dev/full", "--no-progress"]
    assert evaluate_main(args) == 1
    assert "--json /dev/full: cannot be written (No space left on device)" in _error_line(capsys, "adaptserve evaluate")


def test_an_unknown_command_is_named(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m training", "bogus", "--task", "t"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("training", run_name="__main__")
    assert exit_.value.code == 2 and "unknown command 'bogus': use train, evaluate, pet or zeroshot" in capsys.readouterr().err


def test_an_unreachable_publish_url_is_found_before_training(csvs, tiny_dir, tmp_path, capsys, monkeypatch):
    import socket

    import training.trainer

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --publish")

    monkeypatch.setattr(training.trainer, "train", no_training)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--task", "t", "--method", "head", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]),
            "--backbone", str(tiny_dir), "--publish", f"http://127.0.0.1:{port}/"]
    assert main(args) == 1
    line = _error_line(capsys, "adaptserve train")
    assert f"cannot reach http://127.0.0.1:{port}" in line and "checked before training" in line


@pytest.mark.parametrize("json_out, expected", [
    ("/proc/adaptserve.json", "--json /proc/adaptserve.json: cannot be written ("),  # procfs: no new files, even for root
    ("/proc/version", "--json /proc/version: cannot be written ("),  # there, and not writable by root either
    ("{tmp}/afile/x.json", "--json {tmp}/afile/x.json: the directory {tmp}/afile is a file"),
])
def test_a_json_file_that_cannot_be_written_is_refused_before_training(
        json_out, expected, csvs, tiny_dir, tmp_path, capsys, monkeypatch):
    """--json is written last: a path os.access passes for root but no write reaches (procfs) used
    to be found after training and publishing, exit 1 with the task published."""
    (tmp_path / "afile").write_text("x")
    json_out, expected = json_out.format(tmp=tmp_path), expected.format(tmp=tmp_path)
    if not Path(json_out).parent.exists():
        pytest.skip("needs /proc (Linux)")
    before = Path(json_out).read_bytes() if Path(json_out).is_file() else None
    monkeypatch.setattr("training.trainer.train", lambda *a, **k: pytest.fail("trained before --json was checked"))
    assert main(["--task", "t", "--method", "head", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]),
                 "--backbone", str(tiny_dir), "--no-publish", "--json", json_out, *FAST]) == 1
    assert expected in _error_line(capsys, "adaptserve train")
    if before is not None:
        assert Path(json_out).read_bytes() == before


@pytest.mark.parametrize("token, expected", [
    ("adm-s\u00e9cret", "--token: the admin token holds a space, a control or a non-ASCII character"),
    ("adm secret", "--token: the admin token holds a space"),
])
def test_a_token_no_header_can_carry_is_named_before_training(token, expected, csvs, tiny_dir, capsys, monkeypatch):
    """It used to end in a UnicodeEncodeError traceback (non-ASCII) or 'cannot reach' the server."""
    monkeypatch.setattr("training.trainer.train", lambda *a, **k: pytest.fail("trained before the token was checked"))
    args = ["--task", "t", "--method", "head", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]),
            "--backbone", str(tiny_dir), "--publish", "http://127.0.0.1:9/", "--token", token]
    assert main(args) == 1
    line = _error_line(capsys, "adaptserve train")
    assert expected in line and "cannot reach" not in line and token not in line
