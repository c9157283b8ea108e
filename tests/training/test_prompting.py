"""Prompt-based tasks in training: templates, verbalizer words -> token ids (and the error when a
word is not one token), scoring through the LM head, and served == trained for LoRA / soft prompt
+ verbalizer, with and without demonstrations, on a tiny masked and a tiny causal LM."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from service.engine.backbone import default_backbone_path, load_backbone
from service.engine.engine import Engine
from service.engine.template import Template
from service.engine.types import ClassifyItem
from service.methods.verbalizer import VerbalizerWeights, mismatched_words
from training.cli import main
from training.config import ConfigError
from training.data import load_splits
from training.prompting import PromptSpec, VerbalizerError, parse_verbalizer, prompt_spec, resolve_verbalizer
from training.publish import save_to_store
from training.trainer import train
from tests.factories import save_tiny_lm
from tests.training.conftest import assert_served_equals_trained, rows, tiny_config, write_csv

WORDS = {"negative": ["bad", "terrible"], "positive": ["good"]}
TEMPLATES = {"mlm": "{text} it was {mask} .", "causal": "{text} it was {mask}"}


@pytest.fixture(scope="module", params=["mlm", "causal"])
def lm(request, tmp_path_factory):
    path = save_tiny_lm(request.param, tmp_path_factory.mktemp(request.param) / "lm")
    return request.param, path, load_backbone(path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    d = tmp_path_factory.mktemp("sent")
    names = {"pos": "positive", "neg": "negative"}
    tr = write_csv(d / "train.csv", [(t, names[y]) for t, y in rows(16, 11)])
    dv = write_csv(d / "dev.csv", [(t, names[y]) for t, y in rows(8, 12)])
    return load_splits(tr, dv)


# -- templates -----------------------------------------------------------------------------------------
def test_template_rendering(lm):
    kind, _, bb = lm
    tok, causal = bb.tokenizer, kind == "causal"
    t = Template.parse(TEMPLATES[kind], pair=False, needs_mask=True, causal=causal)
    ids, pos = t.encode(tok, "good movie", None, 24, causal)
    # a causal LM answers with the next token: the template ends at "was" (trailing [SEP] dropped)
    want = ["[CLS]", "good", "movie", "it", "was"] if causal else ["[CLS]", "good", "movie", "it", "was", "[MASK]", ".", "[SEP]"]
    assert tok.convert_ids_to_tokens(ids) == want
    assert pos == (len(ids) - 1 if causal else want.index("[MASK]"))


def test_template_with_demonstrations_order(lm):
    """LM-BFF: a masked LM reads the input's prompt first, then each demonstration with its label
    word; a causal LM reads the demonstrations first and answers after the input's prompt."""
    from service.methods.demos import Demo

    kind, _, bb = lm
    tok, causal = bb.tokenizer, kind == "causal"
    t = Template.parse(TEMPLATES[kind], pair=False, needs_mask=True, causal=causal)
    good, bad = tok.convert_tokens_to_ids("good"), tok.convert_tokens_to_ids("bad")
    demos = [Demo("boring plot", None, bad), Demo("fun day", None, good)]
    ids, pos = t.encode_with_demos(tok, "great film", None, demos, 40, causal)
    toks = tok.convert_ids_to_tokens(ids)
    if causal:  # the tiny WordPiece vocabulary has no newline token: segments simply follow each other
        assert toks[-4:] == ["great", "film", "it", "was"] and pos == len(ids) - 1
        assert toks.index("boring") < toks.index("bad") < toks.index("fun") < toks.index("good") < toks.index("great")
    else:
        assert toks == ["[CLS]", "great", "film", "it", "was", "[MASK]", ".", "[SEP]", "boring", "plot", "it", "was", "bad",
                        ".", "[SEP]", "fun", "day", "it", "was", "good", ".", "[SEP]"]
        assert toks[pos] == "[MASK]"
    # a tight max_length truncates the texts, longest first, and keeps every template piece and word
    short, pos = t.encode_with_demos(tok, "great film and a very long boring story", None, demos, 20 if not causal else 14, causal)
    st = tok.convert_ids_to_tokens(short)
    assert len(short) <= (20 if not causal else 14) and st.count("was") == 3 and "bad" in st and "good" in st


# -- verbalizer words ------------------------------------------------------------------------------------
def test_parse_verbalizer_forms(tmp_path):
    want = {"negative": ("terrible", "bad"), "positive": ("great",)}
    assert parse_verbalizer("negative=terrible, bad; positive=great") == want
    f = tmp_path / "v.json"
    f.write_text(json.dumps({"negative": ["terrible", "bad"], "positive": "great"}))
    assert parse_verbalizer(str(f)) == want
    assert parse_verbalizer('{"negative": ["terrible", "bad"], "positive": ["great"]}') == want
    for bad, msg in [("negative", "not LABEL=word"), ("negative=;positive=great", "has no words"), ("{nope", "not valid JSON")]:
        with pytest.raises(VerbalizerError, match=msg):
            parse_verbalizer(bad)


@pytest.mark.parametrize("spec", ["negative=bad;negative=awful;positive=good",
                                  '{"negative": "bad", "negative": ["awful"], "positive": "good"}'])
def test_a_repeated_verbalizer_label_is_refused(spec):
    """A dict would keep the last entry of a label silently ("bad" dropped)."""
    with pytest.raises(ConfigError, match="--verbalizer: label 'negative' is given twice; give each label once"):
        parse_verbalizer(spec)


def test_words_resolve_to_the_lm_heads_ids(lm):
    kind, _, bb = lm
    t = Template.parse(TEMPLATES[kind], pair=False, needs_mask=True, causal=kind == "causal")
    vw = resolve_verbalizer(bb.tokenizer, t, WORDS)
    assert vw.token_ids == tuple(tuple(bb.tokenizer.convert_tokens_to_ids(w) for w in ws) for ws in WORDS.values())


def _bpe_tokenizer():
    """A tiny byte-level BPE tokenizer (GPT-2 style: a leading space is part of the token) whose
    vocabulary holds " great" and " terrible" but not "great" without a space, nor "Great"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a film it was great", "a day it was terrible", "it was fine"] * 50, trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def test_word_that_is_not_one_token_lists_alternatives():
    tok = _bpe_tokenizer()
    spaced = Template.parse("{text} it was {mask}", pair=False, needs_mask=True, causal=True)
    vw = resolve_verbalizer(tok, spaced, {"neg": ["terrible"], "pos": ["great"]})  # read as " terrible" / " great"
    assert tok.convert_ids_to_tokens([vw.token_ids[0][0], vw.token_ids[1][0]]) == ["Ġterrible", "Ġgreat"]

    with pytest.raises(VerbalizerError) as err:  # a case variant that is one token is offered
        resolve_verbalizer(tok, spaced, {"neg": ["terrible"], "pos": ["Great"]})
    msg = str(err.value)
    assert "word 'Great' of label 'pos' is not one token after 'it was'" in msg
    assert "single-token alternatives: 'great'" in msg and "'Ġgreat'" in msg

    glued = Template.parse("{text} it was:{mask}", pair=False, needs_mask=True, causal=True)
    with pytest.raises(VerbalizerError) as err:  # no space before {mask}: offer the word with its leading space
        resolve_verbalizer(tok, glued, {"neg": ["terrible"], "pos": ["great"]})
    msg = str(err.value)
    assert "word 'great' of label 'pos' is not one token after 'it was:'" in msg and "'Ġgreat'" in msg
    assert "'terrible'" in msg  # every bad word is reported in the one error
    # ... and an exact vocabulary token is accepted as written
    vw = resolve_verbalizer(tok, glued, {"neg": ["Ġterrible"], "pos": ["Ġgreat"]})
    assert tok.convert_ids_to_tokens([vw.token_ids[1][0]]) == ["Ġgreat"]


def test_the_served_word_check_accepts_what_training_resolves_on_byte_level_bpe():
    """The load check (`mismatched_words`) reads each word as training does, in the template's
    context: " great" is `Ġgreat` after "it was ", and no false refusal for an id training stored,
    nor for a hand-written id of the word spaced otherwise; a different word's id is refused."""
    tok = _bpe_tokenizer()
    great, terrible = tok.convert_tokens_to_ids("Ġgreat"), tok.convert_tokens_to_ids("Ġterrible")
    for source, words in [("{text} it was {mask}", {"neg": ["terrible"], "pos": ["great"]}),
                          ("{text} it was:{mask}", {"neg": ["Ġterrible"], "pos": ["Ġgreat"]}),
                          ("{text}\nit was {mask}", {"neg": ["terrible"], "pos": ["great", "fine"]})]:
        t = Template.parse(source, pair=False, needs_mask=True, causal=True)
        assert mismatched_words(resolve_verbalizer(tok, t, words), list(words), tok, t) == [], source
    glued = Template.parse("{text} it was:{mask}", pair=False, needs_mask=True, causal=True)
    written = VerbalizerWeights(words=(("terrible",), ("great",)), token_ids=((terrible,), (great,)))
    assert mismatched_words(written, ["neg", "pos"], tok, glued) == []  # " great" read alone is Ġgreat
    swapped = VerbalizerWeights(words=(("terrible",), ("great",)), token_ids=((great,), (terrible,)))
    spaced = Template.parse("{text} it was {mask}", pair=False, needs_mask=True, causal=True)
    assert mismatched_words(swapped, ["neg", "pos"], tok, spaced) == [
        f"label 'neg': word 'terrible' reads as token {terrible} ('Ġterrible') after 'it was', but its token id is {great} ('Ġgreat')",
        f"label 'pos': word 'great' reads as token {great} ('Ġgreat') after 'it was', but its token id is {terrible} ('Ġterrible')"]


def test_wordpiece_split_is_reported_with_its_pieces():
    tok = T.AutoTokenizer.from_pretrained(str(default_backbone_path()))
    t = Template.parse("{text} It was {mask} .", pair=False, needs_mask=True, causal=False)
    with pytest.raises(VerbalizerError, match=r"word 'terrrible' of label 'negative' is not one token after 'It was': "
                                              r"it is \d tokens \[.*'##.*\]; no case or spacing variant"):
        resolve_verbalizer(tok, t, {"negative": ["terrrible"], "positive": ["great"]})
    with pytest.raises(VerbalizerError, match="same token as a word of label 'negative'"):
        resolve_verbalizer(tok, t, {"negative": ["great"], "positive": ["Great"]})


def test_a_shared_word_is_not_reported_as_a_multi_token_word():
    # QA: "negative=great;positive=great" said "each label word must be a single token ...",
    # though "great" is one token: the rule named was not the one broken.
    tok = T.AutoTokenizer.from_pretrained(str(default_backbone_path()))
    t = Template.parse("{text} It was {mask} .", pair=False, needs_mask=True, causal=False)
    with pytest.raises(VerbalizerError) as err:
        resolve_verbalizer(tok, t, {"negative": ["great"], "positive": ["great"]})
    msg = str(err.value)
    assert "single token" not in msg and "each label needs words of its own" in msg
    assert "word 'great' of label 'positive' is the same token as a word of label 'negative'" in msg
    with pytest.raises(VerbalizerError) as err:  # both kinds at once: each under its own rule
        resolve_verbalizer(tok, t, {"negative": ["great", "terrrible"], "positive": ["great"]})
    msg = str(err.value)
    assert msg.index("single token") < msg.index("'terrrible'") < msg.index("words of its own") < msg.index("same token")


def test_verbalizer_must_name_the_labels(lm):
    kind, _, bb = lm
    spec = PromptSpec(TEMPLATES[kind], {"negative": ["bad"], "happy": ["good"]})
    with pytest.raises(VerbalizerError, match="no words for label\\(s\\) 'positive'; label\\(s\\) 'happy' are not labels"):
        spec.build(bb, ("negative", "positive"), False)


def test_prompt_spec_flags():
    assert prompt_spec(None, None) is None
    with pytest.raises(ConfigError, match="--template and --verbalizer go together"):
        prompt_spec("{text} it was {mask}", None)
    with pytest.raises(ConfigError, match="--demos .* needs --template"):
        prompt_spec(None, None, demos=True)


# -- scoring + served == trained ---------------------------------------------------------------------------
def test_verbalizer_scores_are_the_lm_heads_logits(lm):
    kind, path, bb = lm
    spec = PromptSpec(TEMPLATES[kind], WORDS)
    template, vw = spec.build(bb, tuple(WORDS), False)
    from training.zeroshot import prompt_task

    task = prompt_task("z", TEMPLATES[kind], WORDS, bb, max_length=24).task
    engine = Engine(bb)
    text = "the plot was fun and very good"
    got = engine.logits(engine.tokenize([ClassifyItem(task, text)]))[0]
    ids, pos = template.encode(bb.tokenizer, text, None, 24, kind == "causal")
    ref = (T.AutoModelForMaskedLM if kind == "mlm" else T.AutoModelForCausalLM).from_pretrained(str(path)).eval()
    with torch.no_grad():
        vocab = ref(input_ids=torch.tensor([ids])).logits[0, pos]
    want = torch.stack([vocab[list(i)].mean() for i in vw.token_ids])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


CASES = {"lora": ("lora", False), "prompt": ("prompt", False), "lora-demos": ("lora", True), "prompt-demos": ("prompt", True)}


@pytest.mark.parametrize("case", list(CASES))
def test_served_equals_trained(case, lm, sentiment, tmp_path):
    kind, _, bb = lm
    method, demos = CASES[case]
    spec = PromptSpec(TEMPLATES[kind], WORDS, demos=demos)
    result = train(sentiment, tiny_config(method, max_length=48), name=f"p-{case}", backbone=bb, progress=False, prompt=spec)
    assert "head" not in result.weights and "verbalizer" in result.weights and ("demos" in result.weights) == demos
    assert result.trainable_params > 0
    any_grad = [t for w in result.weights.values() for t in w.tensors().values() if t.requires_grad]
    assert any_grad and all(t.abs().sum() > 0 for t in any_grad)
    version = save_to_store(result, tmp_path)
    cfg = json.loads((tmp_path / result.name / version / "adapter_config.json").read_text())
    assert cfg["template"] == TEMPLATES[kind] and "verbalizer" in cfg["methods"] and "head" not in cfg["methods"]
    if demos:
        assert cfg["methods"]["demos"]["texts"] == list(sentiment.train.texts)
    texts = list(sentiment.dev.texts) + [sentiment.train.texts[0]]  # a training text: never its own demonstration
    assert_served_equals_trained(bb, tmp_path, result.name, texts, result.logits)


def test_lora_on_a_gated_ffn_trains_its_gate_and_serves_as_trained(sentiment, tmp_path):
    # qa-llm: the decoder serves LoRA on ffn_gate, but the trainer refused that target. (The tiny
    # causal LM is a Llama: its FFN is gated.)
    from training.config import LoraConfig

    bb = load_backbone(save_tiny_lm("causal", tmp_path / "lm"), device="cpu", dtype="float32")
    config = tiny_config("lora", max_length=48, lora=LoraConfig(r=4, alpha=4.0, targets=("query", "ffn_gate")))
    result = train(sentiment, config, name="gate", backbone=bb, progress=False, prompt=PromptSpec(TEMPLATES["causal"], WORDS))
    pairs = result.weights["lora"].pairs
    assert {site for _, site in pairs} == {"query", "ffn_gate"} and all(b.abs().sum() > 0 for _, b in pairs.values())
    save_to_store(result, tmp_path / "store")
    assert_served_equals_trained(bb, tmp_path / "store", result.name, list(sentiment.dev.texts), result.logits)


def test_demonstrations_change_the_prompt(lm, sentiment):
    """With demos the served input holds the nearest example of each class (not itself)."""
    kind, _, bb = lm
    spec = PromptSpec(TEMPLATES[kind], WORDS, demos=True)
    result = train(sentiment, tiny_config("lora", max_length=64), name="d", backbone=bb, progress=False, prompt=spec)
    engine = result.engine
    text = sentiment.train.texts[0]
    batch = engine.tokenize([ClassifyItem(result.task, text)])
    shown = bb.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    (demos,) = engine._demonstrations(result.task, [ClassifyItem(result.task, text)])
    assert len(demos) == 2 and all(d.text != text for d in demos)
    for d in demos:
        assert d.text in shown
    assert shown.count("it was") == 3


# -- the CLI --------------------------------------------------------------------------------------------
def test_cli_trains_a_prompt_task(lm, sentiment, tmp_path, capsys):
    kind, path, _ = lm
    verb = tmp_path / "v.json"
    verb.write_text(json.dumps(WORDS))
    status = main(["--task", "cli-p", "--method", "lora", "--data", sentiment.train.source, "--dev", sentiment.dev.source,
                   "--template", TEMPLATES[kind], "--verbalizer", str(verb), "--backbone", str(path),
                   "--store", str(tmp_path / "store"), "--max-steps", "1", "--batch-size", "8", "--max-length", "32",
                   "--no-progress", "--device", "cpu"])
    assert status == 0, capsys.readouterr().err
    (version,) = [p for p in (tmp_path / "store" / "cli-p").iterdir() if p.is_dir()]
    cfg = json.loads((version / "adapter_config.json").read_text())
    assert cfg["methods"]["verbalizer"]["label_words"] == [["bad", "terrible"], ["good"]]


@pytest.mark.parametrize("method,extra,backbone,message", [
    ("lora", ["--template", "{text} it was .", "--verbalizer", "negative=bad;positive=good"], "lm",
     "--template: template '{text} it was .': scoring label words needs a {mask}"),
    ("lora", ["--template", "{text} it was {mask}", "--verbalizer", "negative=bad;positive=good"], "minilm",
     "has none: pass --backbone with a masked or causal LM"),
    ("lora", ["--template", "{text} it was {mask}", "--verbalizer", "negative=bad;positive=goodish"], "lm",
     "word 'goodish' of label 'positive' is not one token"),
    ("lora", ["--template", "{text} it was {mask}"], "lm", "--template and --verbalizer go together"),
    ("head", ["--template", "{text} it was {mask}", "--verbalizer", "negative=bad;positive=good"], "lm",
     "--method head cannot train a template + verbalizer task"),
])
def test_cli_prompt_errors(method, extra, backbone, message, lm, sentiment, tmp_path, capsys):
    _, path, _ = lm
    args = ["--task", "bad", "--method", method, "--data", sentiment.train.source, "--dev", sentiment.dev.source,
            "--no-publish", "--max-steps", "1", "--max-length", "32", "--no-progress", "--device", "cpu", *extra]
    if backbone == "lm":
        args += ["--backbone", str(path)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("adaptserve train: error: ") and message in last, last
