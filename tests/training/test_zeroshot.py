"""Zero-shot tasks: (a) template + verbalizer on an LM, (b) label descriptions on an encoder; each
published in one command and served by the engine as built."""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as T

from service.engine.backbone import load_backbone
from service.engine.engine import Engine
from service.engine.types import ClassifyItem
from training.config import ConfigError
from training.evaluate import load_published
from training.fewshot_cli import zeroshot_main
from training.zeroshot import DEFAULT_SCALE, description_task, parse_descriptions, parse_labels, prompt_task, save_zeroshot
from tests.factories import save_tiny_lm
from tests.training.conftest import write_csv

TEXTS = ["the movie was good and fun", "a boring plot and bad acting", "ok"]


def _served(engine, task, texts):
    return torch.tensor([p.logits for p in engine.classify([ClassifyItem(task, t) for t in texts])])


@pytest.mark.parametrize("kind", ["mlm", "causal"])
def test_prompt_zeroshot_publishes_and_serves(kind, tmp_path):
    path = save_tiny_lm(kind, tmp_path / "lm")
    bb = load_backbone(path, device="cpu", dtype="float32")
    template = "{text} it was {mask}" + (" ." if kind == "mlm" else "")
    zs = prompt_task("zs-a", template, "negative=bad,terrible;positive=good", bb, labels="negative,positive", max_length=24)
    version = save_zeroshot(zs, tmp_path / "store")
    cfg = json.loads((tmp_path / "store" / "zs-a" / version / "adapter_config.json").read_text())
    assert set(cfg["methods"]) == {"verbalizer"} and cfg["template"] == template and cfg["training"]["method"] == "zeroshot"
    engine = Engine(bb)
    task = load_published(engine, tmp_path / "store", "zs-a")
    served = _served(engine, task, TEXTS)
    torch.testing.assert_close(served, zs.logits(TEXTS), atol=1e-6, rtol=0)
    # the scores are the LM head's own logits for the label words
    ref = (T.AutoModelForMaskedLM if kind == "mlm" else T.AutoModelForCausalLM).from_pretrained(str(path)).eval()
    ids, pos = task.spec.template.encode(bb.tokenizer, TEXTS[0], None, 24, kind == "causal")
    with torch.no_grad():
        vocab = ref(input_ids=torch.tensor([ids])).logits[0, pos]
    tid = bb.tokenizer.convert_tokens_to_ids
    want = torch.stack([vocab[[tid("bad"), tid("terrible")]].mean(), vocab[tid("good")]])
    torch.testing.assert_close(served[0], want, atol=1e-5, rtol=0)


def test_description_zeroshot_is_scaled_cosine(tiny_dir, tmp_path):
    bb = load_backbone(tiny_dir, device="cpu", dtype="float32")
    zs = description_task("zs-b", "negative=a bad boring movie;positive=a good fun movie", bb, max_length=24)
    head = zs.weights["head"]
    assert head.pooling == "mean" and head.normalize and torch.equal(head.out_b, torch.zeros(2))
    torch.testing.assert_close(head.out_w.norm(dim=-1), torch.full((2,), DEFAULT_SCALE))
    version = save_zeroshot(zs, tmp_path / "store")
    assert "created" not in zs.bundle_config()  # no time of day: the same descriptions are the same version
    assert save_zeroshot(description_task("zs-b", "negative=a bad boring movie;positive=a good fun movie", bb,
                                          max_length=24), tmp_path / "store") == version
    engine = Engine(bb)
    task = load_published(engine, tmp_path / "store", "zs-b")
    served = _served(engine, task, TEXTS)

    # reference: Hugging Face's encoder, mean over every non-padding token, cosine x 20
    tok, model = bb.tokenizer, T.AutoModel.from_pretrained(str(tiny_dir)).eval()

    def emb(texts):
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    want = DEFAULT_SCALE * emb(TEXTS) @ emb(["a bad boring movie", "a good fun movie"]).T
    torch.testing.assert_close(served, want, atol=1e-4, rtol=0)


def test_parse_descriptions():
    assert parse_descriptions("neg=a bad, boring film;pos=a good one") == {"neg": "a bad, boring film", "pos": "a good one"}
    assert parse_descriptions('{"a": "x", "b": "y"}') == {"a": "x", "b": "y"}
    for bad, msg in [("neg=only one", "at least 2"), ("neg=x;pos=", "needs a non-empty description"), ("neg x;pos=y", "not LABEL="),
                     ("neg=a movie review;pos= a movie review ", "labels 'neg' and 'pos' have the same description 'a movie review'")]:
        with pytest.raises(ConfigError, match=msg):
            parse_descriptions(bad)


@pytest.mark.parametrize("spec", ["neg=a bad film;pos=a good one;neg=an awful film",
                                  '{"neg": "a bad film", "pos": "a good one", "neg": "an awful film"}'])
def test_a_repeated_description_label_is_refused(spec):
    """A dict would keep the last description of a label silently."""
    with pytest.raises(ConfigError, match="--descriptions: label 'neg' is given twice"):
        parse_descriptions(spec)


def test_labels_must_match(tiny_dir):
    bb = load_backbone(tiny_dir, device="cpu", dtype="float32")
    with pytest.raises(ConfigError, match="describe exactly the labels negative, positive; missing positive; not a label: pos"):
        description_task("x", "negative=bad;pos=good", bb, labels="negative,positive", max_length=24)


def test_zeroshot_cli(tiny_dir, tmp_path, capsys):
    test = write_csv(tmp_path / "test.csv", [("good fun", "positive"), ("bad plot", "negative")])
    args = ["--task", "zs-cli", "--labels", "negative,positive", "--descriptions", "negative=a bad movie;positive=a good movie",
            "--backbone", str(tiny_dir), "--store", str(tmp_path / "store"), "--test", str(test), "--no-progress", "--max-length", "24",
            "--device", "cpu", "--json", str(tmp_path / "s.json")]
    assert zeroshot_main(args) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["methods"] == ["head"] and "accuracy" in summary["test"] and summary["version"]
    lm = save_tiny_lm("causal", tmp_path / "lm")
    for bad, message in [
        (["--template", "{text} it was {mask}", "--backbone", str(lm)], "--template needs --verbalizer"),
        (["--template", "{text} it was {mask} .", "--verbalizer", "negative=bad;positive=good", "--backbone", str(lm)],
         "for a causal LM {mask} must end the template"),
        (["--template", "{text} it was {mask}", "--verbalizer", "negative=bad;positive=good", "--backbone", str(tiny_dir)],
         "has none: pass --backbone with a masked or causal LM"),
    ]:
        assert zeroshot_main(["--task", "z", "--labels", "negative,positive", *bad, "--no-publish", "--device", "cpu",
                              "--max-length", "24"]) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("adaptserve zeroshot: error: ") and message in last, last


def test_zeroshot_checks_everything_before_publishing(tiny_dir, tmp_path, capsys):
    """A template with no room for the input, a non-finite scale, a --test file that is missing or
    has other labels, a --json in a missing directory: one line each, and nothing published."""
    lm = save_tiny_lm("causal", tmp_path / "lm")
    store = tmp_path / "store"
    prompt = ["--backbone", str(lm), "--verbalizer", "negative=bad;positive=good"]
    other_labels = write_csv(tmp_path / "other.csv", [("good fun", "pos"), ("bad plot", "neg")])
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("text,text_pair,label\ngood,fun,positive\nbad,plot,negative\n")
    for bad, message in [
        ([*prompt, "--template", "{text} it was a very good and fun movie it was {mask}", "--max-length", "8"],
         "--template: template '{text} it was a very good and fun movie it was {mask}' leaves no room for the input "
         "within max_length 8: its own tokens (special tokens, template text and answer slot) take 12"),
        ([*prompt, "--template", "{text} it was {mask}", "--test", str(tmp_path / "nonexist.csv")],
         f"--test {tmp_path / 'nonexist.csv'}: file not found"),
        ([*prompt, "--template", "{text} it was {mask}", "--test", str(other_labels)], "labels not in the task's labels"),
        ([*prompt, "--template", "{text} it was {mask}", "--test", str(pairs)], "classifies single texts, but the file has a pair column"),
        ([*prompt, "--template", "{text} it was {mask}", "--json", str(tmp_path / "no" / "s.json")], "does not exist"),
        (["--backbone", str(tiny_dir), "--descriptions", "negative=a bad movie;positive=a good movie", "--scale", "inf"],
         "--scale must be a positive finite number, got inf"),
        ([*prompt, "--template", "{text} it was {mask}", "--scale", "10"], "--scale belongs to --descriptions"),
        # QA: a causal LM's mean-pooled states made a cosine head that answered at chance, published without a word
        (["--backbone", str(lm), "--descriptions", "negative=a bad movie;positive=a good movie"],
         "--descriptions compares sentence embeddings, so it needs a sentence encoder (the bundled all-MiniLM-L6-v2 "
         "when --backbone is left out); lm is a causal LM (llama), whose mean-pooled states are not sentence embeddings"),
    ]:
        args = ["--task", "z", *bad, "--store", str(store), "--device", "cpu", "--no-progress"]
        assert zeroshot_main(args if "--max-length" in bad else [*args, "--max-length", "24"]) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("adaptserve zeroshot: error: ") and message in last, last
        assert not store.exists()


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs /sys (Linux): it refuses a new file to anyone, root too")
def test_zeroshot_refuses_a_task_directory_it_cannot_write_before_loading_anything(tiny_dir, capsys, monkeypatch):
    import training.fewshot_cli as fewshot_cli

    monkeypatch.setattr(fewshot_cli, "_load_backbone", lambda *a, **k: pytest.fail("the backbone loaded before the store was checked"))
    assert zeroshot_main(["--task", "kernel", "--labels", "negative,positive", "--descriptions", "negative=bad;positive=good",
                          "--backbone", str(tiny_dir), "--store", "/sys", "--device", "cpu", "--no-progress"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("adaptserve zeroshot: error: --store /sys: the task directory /sys/kernel cannot be written into"), last


def test_a_one_label_prompt_task_and_empty_labels_are_refused(tmp_path):
    """One label would publish a task the engine refuses to load; an empty --labels entry is a typo."""
    lm = load_backbone(save_tiny_lm("causal", tmp_path / "lm"), device="cpu", dtype="float32")
    with pytest.raises(ConfigError, match=r"at least 2 labels; the verbalizer maps only \['positive'\]"):
        prompt_task("zs-one", "{text} It was {mask}", "positive=good", lm, max_length=24)
    with pytest.raises(ConfigError, match="--labels has an empty label in 'negative,,positive'"):
        parse_labels("negative,,positive")
    with pytest.raises(ConfigError, match="--labels has an empty label"):
        prompt_task("zs-empty", "{text} It was {mask}", "negative=bad;positive=good", lm, labels="negative,positive,",
                    max_length=24)
