"""Prompt tasks: template + verbalizer through the model's own LM head, masked and causal."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from service.engine.backbone import load_backbone
from service.engine.bundle import write_bundle
from service.engine.engine import Engine
from service.engine.template import Template, TemplateError
from service.engine.types import ClassifyItem, TaskKey
from service.errors import BundleError
from tests.factories import random_method, save_tiny_lm, verbalizer_task

WORDS = {"negative": ["bad", "terrible"], "positive": ["good"]}


@pytest.fixture(scope="module", params=["mlm", "causal"])
def lm(request, tmp_path_factory):
    path = save_tiny_lm(request.param, tmp_path_factory.mktemp(request.param) / "lm")
    return request.param, path, Engine(load_backbone(path, device="cpu", dtype="float32"))


def _publish(engine, store, name, template, extra=None, pair=False):
    w = {"verbalizer": verbalizer_task(engine.backbone.tokenizer, WORDS), **(extra or {})}
    cfg = {"labels": list(WORDS), "input_kind": "pair" if pair else "single", "max_length": 24, "template": template,
           "backbone": {"fingerprint": engine.backbone.fingerprint}}
    v = write_bundle(store, name, cfg, w)
    return engine.load_task(store / name / v, TaskKey(name, v))


def test_served_equals_hf_lm_head(lm, tmp_path):
    kind, path, engine = lm
    template = "{text} it was {mask}" if kind == "causal" else "{text} . it was {mask} ."
    task = _publish(engine, tmp_path, "sent", template)
    text = "the movie was very good and fun"
    got = engine.logits(engine.tokenize([ClassifyItem(task, text)]))[0]
    ids, pos = task.spec.template.encode(engine.backbone.tokenizer, text, None, 24, kind == "causal")
    cls = T.AutoModelForMaskedLM if kind == "mlm" else T.AutoModelForCausalLM
    ref_model = cls.from_pretrained(str(path)).eval()
    with torch.no_grad():
        vocab = ref_model(input_ids=torch.tensor([ids])).logits[0, pos]
    tok = engine.backbone.tokenizer
    if kind == "mlm":
        assert ids[pos] == tok.mask_token_id
    want = torch.stack([vocab[[tok.convert_tokens_to_ids(w) for w in ws]].mean() for ws in WORDS.values()])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_prompt_tasks_mix_with_lora_and_soft_prompts(lm, tmp_path):
    kind, _, engine = lm
    info = engine.backbone.info
    g = torch.Generator().manual_seed(0)
    template = "{text} it was {mask}" if kind == "causal" else "{text} it was {mask} ."
    tasks = [
        _publish(engine, tmp_path, "plain", template),
        _publish(engine, tmp_path, "lora", template, {"lora": random_method("lora", info, g, 2)}),
        _publish(engine, tmp_path, "prompt", template, {"prompt": random_method("prompt", info, g, 0)}),
        _publish(engine, tmp_path, "prompt2", template, {"prompt": random_method("prompt", info, g, 2)}),
    ]
    texts = ["good movie", "the plot was long and boring and bad", "ok", "really fun day in the park"]
    items = [ClassifyItem(tasks[i % 4], texts[(i * 3) % 4]) for i in range(8)]
    mixed = engine.logits(engine.tokenize(items))
    for it, z in zip(items, mixed):
        torch.testing.assert_close(z, engine.logits(engine.tokenize([it]))[0], atol=1e-5, rtol=0)
    assert float((mixed[0] - mixed[1]).abs().max()) > 0 or items[0].text != items[1].text


def test_truncation_keeps_template_and_answer(lm):
    kind, _, engine = lm
    tok = engine.backbone.tokenizer
    t = Template.parse("{text} it was {mask}", pair=False, needs_mask=True, causal=kind == "causal")
    ids, pos = t.encode(tok, " ".join(["good"] * 100), None, 16, kind == "causal")
    assert len(ids) <= 16
    if kind == "mlm":
        assert ids[pos] == tok.mask_token_id
    assert tok.convert_tokens_to_ids("was") in ids


@pytest.mark.parametrize(
    "template,pair,causal,message",
    [
        ("It was {mask}.", False, False, "it has no {text}"),
        ("{text} It was.", False, False, "needs a {mask}"),
        ("{text} {mask} {text_pair}", False, False, "{text_pair} appears"),
        ("{text} ? {mask}", True, False, "a pair task needs {text_pair}"),
        ("{text} It was {mask} .", False, True, "must end the template"),
        ("{text} {label}", False, False, "unknown placeholder {label}"),
        ("{text} {mask} {mask}", False, False, "each placeholder may appear once"),
    ],
)
def test_bad_templates(template, pair, causal, message):
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("}", r"\}").replace("?", r"\?")):
        Template.parse(template, pair=pair, needs_mask=True, causal=causal)


def test_a_head_tasks_template_on_a_masked_lm_needs_a_mask():
    # A bundle's template without a verbalizer is parsed with needs_mask=False; on a masked LM
    # `encode` still reads the answer at {mask}, so such a bundle passed the checks and every
    # encode raised 'ValueError: 103 is not in list' (the upload said only that). A causal LM
    # answers at the last token and needs none.
    with pytest.raises(TemplateError, match=r"a masked LM's template needs a \{mask\}"):
        Template.parse("Review: {text} Done.", pair=False, needs_mask=False, causal=False)
    assert Template.parse("Review: {text} Done.", pair=False, needs_mask=False, causal=True).slots == {"text"}


def test_verbalizer_refused_without_lm_head(tmp_path):
    from tests.factories import tiny_backbone

    engine = Engine(tiny_backbone("bert", tmp_path))
    with pytest.raises(BundleError, match="no LM head"):
        _publish(engine, tmp_path / "s", "x", "{text} it was {mask}")


def _no_bos_causal_lm(out):
    """The tiny causal LM with a tokenizer that adds no special tokens, as SmolLM2's GGUF
    tokenizer does (its BOS exists but is not added)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.factories import WORDS as VOCAB

    path = save_tiny_lm("causal", out)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCAB]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for f in path.glob("*token*"):
        f.unlink()
    T.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]",
                              unk_token="[UNK]").save_pretrained(path)
    return path


def test_causal_prompt_with_no_tokens_reads_bos_alone_and_in_a_batch(tmp_path):
    # QA (SmolLM2 GGUF): a template with no text before {mask} ("{text} {mask}") and an empty
    # input made a row of 0 tokens: alone a 500 ("cannot reshape tensor of 0 elements"), in a
    # batch an answer read off a padding position, so it changed with its batch-mates.
    path = _no_bos_causal_lm(tmp_path / "lm")
    engine = Engine(load_backbone(path, device="cpu", dtype="float32"))
    tok = engine.backbone.tokenizer
    assert tok.encode("", add_special_tokens=True) == []
    task = _publish(engine, tmp_path / "s", "bare", "{text} {mask}")
    ids, pos = task.spec.template.encode(tok, "", None, 24, True)
    assert (ids, pos) == ([tok.bos_token_id], 0)
    alone = engine.logits(engine.tokenize([ClassifyItem(task, "")]))[0]
    for mate in ("the movie was very good and fun", "bad"):
        batch = engine.logits(engine.tokenize([ClassifyItem(task, mate), ClassifyItem(task, "")]))
        torch.testing.assert_close(batch[1], alone, atol=1e-5, rtol=0)
    ref = T.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        vocab = ref(input_ids=torch.tensor([[tok.bos_token_id]])).logits[0, 0]
    want = torch.stack([vocab[[tok.convert_tokens_to_ids(w) for w in ws]].mean() for ws in WORDS.values()])
    torch.testing.assert_close(alone, want, atol=1e-5, rtol=0)


def test_a_token_shared_by_two_labels_is_refused_at_load(lm, tmp_path):
    # QA: `adaptserve train/zeroshot` refuse two labels sharing a word, but an uploaded bundle
    # with one loaded and served: on that word the labels always tie.
    from service.methods.verbalizer import VerbalizerWeights

    _, _, engine = lm
    good = engine.backbone.tokenizer.convert_tokens_to_ids("good")
    w = {"verbalizer": VerbalizerWeights(words=(("good",), ("good", "fun")), token_ids=((good,), (good, good + 1)))}
    cfg = {"labels": ["negative", "positive"], "input_kind": "single", "max_length": 24, "template": "{text} it was {mask}",
           "backbone": {"fingerprint": engine.backbone.fingerprint}}
    v = write_bundle(tmp_path, "dup", cfg, w)
    with pytest.raises(BundleError, match=rf"token id {good} \('good'\) is a word of labels #0 and #1 \(their positions"):
        engine.load_task(tmp_path / "dup" / v, TaskKey("dup", v))


def test_a_plain_causal_task_given_an_empty_input_reads_bos_alone_and_in_a_batch(tmp_path):
    # QA (SmolLM2 GGUF): a head task (no template) on a tokenizer that adds no BOS made an empty
    # input a row of 0 tokens: alone a 500, in a batch a head read off padding (~0.5 / 0.5). The row
    # is the start token, as a template prompt with no tokens is.
    from tests.factories import publish, random_head

    path = _no_bos_causal_lm(tmp_path / "lm")
    engine = Engine(load_backbone(path, device="cpu", dtype="float32"))
    info, tok = engine.backbone.info, engine.backbone.tokenizer
    g = torch.Generator().manual_seed(3)
    v = publish(tmp_path / "s", "plain", {"head": random_head(info, g, labels=2, pooling="last")}, ["neg", "pos"],
                fingerprint=info.fingerprint)
    task = engine.load_task(tmp_path / "s" / "plain" / v, TaskKey("plain", v))
    (encoded,) = [it.encoded for it in engine.pretokenize([ClassifyItem(task, "")])]
    assert encoded.ids == [tok.bos_token_id]
    alone = engine.logits(engine.tokenize([ClassifyItem(task, "")]))[0]
    assert torch.isfinite(alone).all()
    for mate in ("the movie was very good and fun", "bad"):
        batch = engine.logits(engine.tokenize([ClassifyItem(task, mate), ClassifyItem(task, "")]))
        torch.testing.assert_close(batch[1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "words, ids, message",
    [
        ((("bad", "terrible"), ("good",)), (("bad", "terrible"), ("good",)), None),  # the ids of the words
        ((("BAD",), ("Good",)), (("bad",), ("good",)), None),  # an uncased tokenizer reads them as these
        ((("bad",), ("good",)), (("good",), ("bad",)),  # swapped: shown as 'bad', scored as 'good'
         "label 'negative': word 'bad' reads as token {bad} ('bad') after 'it was', but its token id is {good} ('good')"),
        ((("bad", "terrible"), ("great",)), (("bad", "terrible"), ("good",)),
         "label 'positive': word 'great' reads as token {great} ('great') after 'it was', but its token id is {good}"),
        ((("bad",), ("splendid",)), (("bad",), ("[UNK]",)),
         "label 'positive': word 'splendid' is not in the vocabulary: its token id {unk} is the unknown token '[UNK]'"),
        ((("bad",), ("good fun",)), (("bad",), ("good",)), "word 'good fun' reads as 2 tokens [{good}, {fun}] ['good', 'fun']"),
    ],
)
def test_label_words_must_be_the_tokens_their_ids_score(lm, tmp_path, words, ids, message):
    # QA: an uploaded verbalizer whose words were not its ids loaded and served: the bundle and
    # GET /v1/tasks showed one word, the LM head scored another.
    from service.methods.verbalizer import VerbalizerWeights

    kind, _, engine = lm
    tok = engine.backbone.tokenizer
    vocab = tok.get_vocab()
    w = VerbalizerWeights(words=words, token_ids=tuple(tuple(vocab[t] for t in row) for row in ids))
    template = "{text} it was {mask}" + (" ." if kind == "mlm" else "")
    cfg = {"labels": ["negative", "positive"], "input_kind": "single", "max_length": 24, "template": template,
           "backbone": {"fingerprint": engine.backbone.fingerprint}}
    v = write_bundle(tmp_path, "words", cfg, {"verbalizer": w})
    if message is None:
        assert engine.load_task(tmp_path / "words" / v, TaskKey("words", v)).weights["verbalizer"].words == words
        return
    with pytest.raises(BundleError, match="the verbalizer's 'label_words' and 'token_ids' disagree") as err:
        engine.load_task(tmp_path / "words" / v, TaskKey("words", v))
    assert message.format_map({**vocab, "unk": tok.unk_token_id}) in str(err.value), str(err.value)


def test_label_words_that_are_not_strings_are_refused(lm, tmp_path):
    kind, _, engine = lm
    good = engine.backbone.tokenizer.convert_tokens_to_ids("good")
    cfg = {"labels": ["negative", "positive"], "max_length": 24, "template": "{text} it was {mask}" + (" ." if kind == "mlm" else ""),
           "backbone": {"fingerprint": engine.backbone.fingerprint}, "format": "adaptserve/1",
           "methods": {"verbalizer": {"label_words": [[7], [" "]], "token_ids": [[good - 1], [good]]}}}
    from service.engine.bundle import parse

    with pytest.raises(BundleError, match=r"label words \[7, ' '\] are not words: each must be a non-empty string"):
        parse(cfg, {}, engine.backbone.info, "t", engine.backbone.tokenizer)
