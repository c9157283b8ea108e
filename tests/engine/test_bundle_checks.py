"""Bundle checks that need the backbone itself: a template that leaves no room for the input, a
prefix bundle on a causal LM, and a task trained on another backbone reported briefly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.backbone import load_backbone
from service.engine.bundle import CONFIG, WEIGHTS, write_bundle
from service.engine.engine import Engine
from service.engine.template import Template, TemplateError
from service.engine.types import TaskKey
from service.errors import BundleError
from service.methods.demos import Demo
from service.settings import Settings
from tests.factories import random_head, random_lora, random_prefix, save_tiny_backbone, save_tiny_lm, verbalizer_task
from tests.service.api.harness import wait_ready

WORDS = {"negative": ["bad"], "positive": ["good"]}
LONG = "{text} it was a very good and fun movie it was {mask}"  # 10 template words


@pytest.fixture(scope="module", params=["mlm", "causal"])
def lm(request, tmp_path_factory) -> tuple[str, Path, Engine]:
    path = save_tiny_lm(request.param, tmp_path_factory.mktemp(request.param) / "lm")
    return request.param, path, Engine(load_backbone(path, device="cpu", dtype="float32"))


def _template(kind: str, source: str = LONG) -> str:
    return source if kind == "causal" else source + " ."


def _raises(fn) -> bool:
    try:
        fn()
    except TemplateError:
        return True
    return False


@pytest.mark.parametrize("demos", [0, 2])
def test_template_fit_check_agrees_with_encode(lm, demos):
    """`check_fits` refuses exactly the max_lengths at which encoding any input fails."""
    kind, _, engine = lm
    tok, causal = engine.backbone.tokenizer, kind == "causal"
    t = Template.parse(_template(kind), pair=False, needs_mask=True, causal=causal)
    shown = [Demo("bad plot", None, tok.convert_tokens_to_ids("bad")), Demo("fun", None, tok.convert_tokens_to_ids("good"))]
    verdicts = []
    for max_length in range(2, 50):
        encode = lambda: t.encode_with_demos(tok, "good", None, shown[:demos], max_length, causal)  # noqa: E731
        check = lambda: t.check_fits(tok, max_length, causal, demos)  # noqa: E731
        verdicts.append(_raises(check))
        assert _raises(check) == _raises(encode), max_length
    assert verdicts[0] and not verdicts[-1]  # the table crosses the boundary


def _prompt_bundle(engine: Engine, store: Path, name: str, max_length: int, kind: str) -> Path:
    cfg = {"labels": list(WORDS), "input_kind": "single", "max_length": max_length, "template": _template(kind),
           "backbone": {"fingerprint": engine.backbone.fingerprint}}
    version = write_bundle(store, name, cfg, {"verbalizer": verbalizer_task(engine.backbone.tokenizer, WORDS)})
    return store / name / version


def test_template_that_cannot_fit_max_length_is_a_bundle_error(lm, tmp_path):
    kind, _, engine = lm
    engine.load_task(_prompt_bundle(engine, tmp_path, "roomy", 24, kind), TaskKey("roomy", "v"))  # fits: loads
    tight = _prompt_bundle(engine, tmp_path, "tight", 8, kind)
    taken = 12 if kind == "causal" else 14  # [CLS] [SEP] + 10 words (+ [MASK] . for the masked LM)
    with pytest.raises(BundleError, match=rf"leaves no room for the input within max_length 8: its own tokens .* take {taken};"):
        engine.load_task(tight, TaskKey("tight", "v"))


def test_template_that_cannot_fit_fails_to_load_and_is_refused_at_upload(tmp_path):
    """Served: the stored task is 503 task_unavailable while the others answer; uploaded: 422."""
    path = save_tiny_lm("causal", tmp_path / "lm")
    engine = Engine(load_backbone(path, device="cpu", dtype="float32"))
    store = tmp_path / "store"
    _prompt_bundle(engine, store, "roomy", 24, "causal")
    tight = _prompt_bundle(engine, store, "tight", 8, "causal")
    admin, reader = "admin-token-template-fit-0123456789", "reader-token-template-fit-0123456789"
    app = create_app(Settings(store=store, admin_tokens=admin, inference_tokens=reader, max_wait_ms=1.0), engine=engine)
    read = {"Authorization": f"Bearer {reader}"}
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.post("/v1/tasks/roomy/classify", json={"inputs": ["good fun"]}, headers=read).status_code == 200
        served = client.post("/v1/tasks/tight/classify", json={"inputs": ["good fun"]}, headers=read)
        assert served.status_code == 503 and served.json()["error_type"] == "task_unavailable", served.text
        files = {name: (name, (tight / name).read_bytes()) for name in (CONFIG, WEIGHTS)}
        upload = client.post("/v1/tasks/other/versions", files=files, headers={"Authorization": f"Bearer {admin}"})
        assert upload.status_code == 422 and "leaves no room for the input" in upload.json()["error"], upload.text
        assert client.post("/v1/tasks/roomy/classify", json={"inputs": ["bad"]}, headers=read).status_code == 200


def test_an_upload_whose_label_words_are_not_its_token_ids_is_422(tmp_path):
    """The verbalizer shows 'bad' for a label whose LM-head score is 'good''s: refused at upload,
    naming the label, the word and both ids; the same words with their own ids are stored."""
    from service.methods.verbalizer import VerbalizerWeights

    engine = Engine(load_backbone(save_tiny_lm("causal", tmp_path / "lm"), device="cpu", dtype="float32"))
    bad, good = engine.backbone.tokenizer.convert_tokens_to_ids(["bad", "good"])
    cfg = {"labels": list(WORDS), "input_kind": "single", "max_length": 24, "template": "{text} it was {mask}",
           "backbone": {"fingerprint": engine.backbone.fingerprint}}
    admin = "admin-token-label-words-0123456789"
    (tmp_path / "store").mkdir()
    app = create_app(Settings(store=tmp_path / "store", admin_tokens=admin, max_wait_ms=1.0), engine=engine)

    def upload(client, ids):
        w = VerbalizerWeights(words=(("bad",), ("good",)), token_ids=ids)
        bundle = tmp_path / "up" / "sent" / write_bundle(tmp_path / "up", "sent", cfg, {"verbalizer": w})
        files = {name: (name, (bundle / name).read_bytes()) for name in (CONFIG, WEIGHTS)}
        return client.post("/v1/tasks/sent/versions", files=files, headers={"Authorization": f"Bearer {admin}"})

    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        swapped = upload(client, ((good,), (bad,)))
        assert swapped.status_code == 422, swapped.text
        assert (f"label 'negative': word 'bad' reads as token {bad} ('bad') after 'it was', but its token id is {good} ('good'); "
                f"label 'positive': word 'good' reads as token {good} ('good') after 'it was', but its token id is {bad} ('bad')"
                in swapped.json()["error"]), swapped.text
        assert upload(client, ((bad,), (good,))).status_code == 201


def test_prefix_bundle_on_a_causal_lm_is_refused(tmp_path):
    engine = Engine(load_backbone(save_tiny_lm("causal", tmp_path / "lm"), device="cpu", dtype="float32"))
    info, g = engine.backbone.info, torch.Generator().manual_seed(0)
    cfg = {"labels": ["a", "b"], "max_length": 16, "backbone": {"fingerprint": info.fingerprint}}
    version = write_bundle(tmp_path / "s", "px", cfg, {"prefix": random_prefix(info, g), "head": random_head(info, g)})
    with pytest.raises(BundleError, match="prefix tuning is not supported on causal-LM backbones"):
        engine.load_task(tmp_path / "s" / "px" / version, TaskKey("px", version))


def test_another_backbones_task_is_reported_briefly(tmp_path):
    """A task of a deeper backbone: one short line naming both backbones, not a problem per tensor."""
    engine = Engine(load_backbone(save_tiny_backbone("bert", tmp_path / "bert"), device="cpu", dtype="float32"))
    info, g = engine.backbone.info, torch.Generator().manual_seed(0)
    weights = {"lora": random_lora(info, g, layers=range(30)), "head": random_head(info, g)}
    other = {"fingerprint": "sha256:" + "ab" * 32, "name": "SmolLM2-135M-Instruct", "model_type": "llama"}
    version = write_bundle(tmp_path / "s", "deep", {"labels": ["a", "b"], "max_length": 16, "backbone": other}, weights)
    with pytest.raises(BundleError) as err:
        engine.load_task(tmp_path / "s" / "deep" / version, TaskKey("deep", version))
    message = str(err.value)
    assert "trained on backbone sha256:abababababab... (SmolLM2-135M-Instruct)" in message
    assert "(bert, 2 layers)" in message and "--backbone" in message and "ADAPTSERVE_BACKBONE" in message
    assert "layer" not in message.split("layers)")[1] and len(message) < 400, message
    # without a fingerprint the per-tensor problems are listed, but capped
    cfg = json.loads((tmp_path / "s" / "deep" / version / CONFIG).read_text())
    del cfg["backbone"]
    (tmp_path / "s" / "deep" / version / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"; \.\.\. and \d+ more") as err:
        engine.load_task(tmp_path / "s" / "deep" / version, TaskKey("deep", version))
    assert len(str(err.value)) < 2000, str(err.value)
