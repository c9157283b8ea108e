"""Limits that are per task or per replica: a task's token overflow policy (`"overflow"` in its
adapter_config.json: truncate, the default, or refuse with 413) and the concurrent-upload cap."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.backbone import load_backbone
from service.engine.bundle import bundle_bytes, read_bundle, write_bundle
from service.engine.engine import Engine
from service.engine.types import ClassifyItem, Encoded, TaskKey
from service.errors import BundleError
from service.settings import Settings
from tests.aio import async_test, wait_until
from tests.factories import random_head, random_lora, save_tiny_backbone, save_tiny_lm, verbalizer_task
from tests.fakes import FakeEngine, write_task
from tests.service.api.harness import admin_actions, make_app, wait_ready

TEN_WORDS = "the movie was great fun and the plot was good"  # 10 word-level tokens + [CLS], [SEP]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(load_backbone(save_tiny_backbone("bert", tmp_path_factory.mktemp("limits") / "backbone"),
                                device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> Path:
    info = engine.backbone.info
    store = tmp_path_factory.mktemp("limits-store")
    g = torch.Generator().manual_seed(0)
    for name, kind, overflow in (("cut", "single", None), ("strict", "single", "refuse"), ("strict-pairs", "pair", "refuse")):
        weights = {"lora": random_lora(info, g), "head": random_head(info, g)}
        cfg = {"labels": ["neg", "pos"], "input_kind": kind, "max_length": 8, "backbone": {"fingerprint": info.fingerprint}}
        if overflow:
            cfg["overflow"] = overflow
        write_bundle(store, name, cfg, weights)
    return store


@pytest.fixture(scope="module")
def client(store: Path, engine: Engine):
    with TestClient(create_app(Settings(store=store, max_wait_ms=1.0), engine=engine)) as client:
        wait_ready(client)
        yield client


def test_a_truncating_task_answers_over_long_inputs(client: TestClient) -> None:
    response = client.post("/v1/tasks/cut/classify", json={"inputs": [TEN_WORDS]})
    assert response.status_code == 200, response.text
    assert client.get("/v1/tasks/cut").json()["overflow"] == "truncate"  # the default, stated


@pytest.mark.parametrize(
    "task, inputs, fragment",
    [
        ("strict", ["fun", TEN_WORDS], "inputs[1] is 12 tokens; task 'strict' takes at most 8"),
        ("strict-pairs", [["good movie", "bad plot and boring acting"]], "inputs[0] is 10 tokens; task 'strict-pairs' takes at most 8"),
    ],
)
def test_a_refusing_task_answers_413_naming_the_count_and_its_max_length(client: TestClient, task: str, inputs: list,
                                                                         fragment: str) -> None:
    response = client.post(f"/v1/tasks/{task}/classify", json={"inputs": inputs})
    assert response.status_code == 413, response.text
    assert response.json()["error_type"] == "payload_too_large" and fragment in response.json()["error"]
    assert "'refuse'" in response.json()["error"]


def test_a_refusing_task_answers_inputs_within_its_max_length(client: TestClient) -> None:
    exactly = " ".join(TEN_WORDS.split()[:6])  # 6 words + 2 specials = 8 tokens: at the limit, not over
    response = client.post("/v1/tasks/strict/classify", json={"inputs": [exactly, "fun"]})
    assert response.status_code == 200, response.text
    assert client.get("/v1/tasks/strict").json()["overflow"] == "refuse"


@pytest.mark.parametrize("kind, own", [("causal", 3), ("mlm", 6)])  # [CLS] it was (| [MASK] . [SEP])
def test_a_refusing_prompt_task_says_its_count_includes_the_template(tmp_path: Path, kind: str, own: int) -> None:
    # QA: a prompt task's count includes its template's tokens, and the 413 said only "N tokens;
    # takes at most M": the user could not tell how long the input itself may be.
    engine = Engine(load_backbone(save_tiny_lm(kind, tmp_path / "lm"), device="cpu", dtype="float32"))
    cfg = {"labels": ["neg", "pos"], "max_length": 10, "overflow": "refuse", "backbone": {"fingerprint": engine.backbone.fingerprint},
           "template": "{text} it was {mask}" + (" ." if kind == "mlm" else "")}
    verbalizer = verbalizer_task(engine.backbone.tokenizer, {"neg": ["bad"], "pos": ["good"]})
    write_bundle(tmp_path / "store", "prompt", cfg, {"verbalizer": verbalizer})
    words = TEN_WORDS.split()
    with TestClient(create_app(Settings(store=tmp_path / "store", max_wait_ms=1.0), engine=engine)) as client:
        wait_ready(client)
        response = client.post("/v1/tasks/prompt/classify", json={"inputs": [TEN_WORDS]})
        assert response.status_code == 413, response.text
        assert response.json()["error"] == (
            f"inputs[0] is {10 + own} tokens with the task's prompt template, whose text and special tokens are {own} of "
            f"them; task 'prompt' takes at most 10 (its overflow policy is 'refuse': shorten the input to at most {10 - own} tokens)")
        # ... which is exact: that many words are answered, one more is refused
        assert client.post("/v1/tasks/prompt/classify", json={"inputs": [" ".join(words[: 10 - own])]}).status_code == 200
        assert client.post("/v1/tasks/prompt/classify", json={"inputs": [" ".join(words[: 11 - own])]}).status_code == 413


def test_a_refused_request_never_reaches_a_batch(store: Path, engine: Engine) -> None:
    batches: list[int] = []
    app = create_app(Settings(store=store, max_wait_ms=1.0), engine=engine)
    app.state.service.metrics.observe_batch = lambda rows, seconds: batches.append(rows)
    with TestClient(app) as client:
        wait_ready(client)
        assert client.post("/v1/tasks/strict/classify", json={"inputs": [TEN_WORDS]}).status_code == 413
        assert batches == []


def test_token_counts_are_the_tokenizers_untruncated_lengths(engine: Engine, store: Path) -> None:
    version = (store / "strict-pairs" / "ACTIVE").read_text().strip()
    pairs = engine.load_task(store / "strict-pairs" / version, TaskKey("strict-pairs", version))
    items = [ClassifyItem(pairs, TEN_WORDS, "fun"), ClassifyItem(pairs, "a", "b")]
    tok = engine.backbone.tokenizer
    assert engine.token_counts(items) == [len(tok(i.text, i.text_pair)["input_ids"]) for i in items] == [14, 5]


def test_token_counts_take_a_row_tokenised_under_the_limit_as_it_is(engine: Engine, store: Path) -> None:
    # A request to a refuse task is tokenised once: rows that came out of `pretokenize` shorter
    # than max_length were not cut, so their length is their count; only a row at the limit is
    # tokenised again, uncut. (Encodings that disagree with the text show which was used.)
    version = (store / "strict" / "ACTIVE").read_text().strip()
    strict = engine.load_task(store / "strict" / version, TaskKey("strict", version))
    under, at_limit = Encoded([101, 7, 102], None, 0), Encoded(list(range(8)), None, 0)
    items = [ClassifyItem(strict, TEN_WORDS, encoded=under), ClassifyItem(strict, TEN_WORDS, encoded=at_limit),
             ClassifyItem(strict, TEN_WORDS)]
    assert engine.token_counts(items) == [3, 12, 12]
    tokenised = engine.pretokenize([ClassifyItem(strict, "fun"), ClassifyItem(strict, TEN_WORDS)])
    assert [len(it.encoded.ids) for it in tokenised] == [3, 8]  # cut at 8 ...
    assert engine.token_counts(tokenised) == [3, 12]  # ... and counted uncut


def test_an_unknown_overflow_policy_is_a_bundle_error(engine: Engine, tmp_path: Path) -> None:
    info = engine.backbone.info
    g = torch.Generator().manual_seed(1)
    cfg = {"labels": ["neg", "pos"], "overflow": "clip", "backbone": {"fingerprint": info.fingerprint}}
    config, weights = bundle_bytes(cfg, {"lora": random_lora(info, g), "head": random_head(info, g)})
    (tmp_path / "adapter_config.json").write_bytes(config)
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(BundleError, match=r"'overflow' must be one of \('truncate', 'refuse'\), got 'clip'"):
        read_bundle(tmp_path, info, "t")


# -- concurrent uploads ----------------------------------------------------------------------------
@async_test
async def test_uploads_beyond_the_concurrent_cap_get_429_before_their_body_is_read(tmp_path: Path) -> None:
    write_task(tmp_path, "sentiment", "v1")
    app = make_app(tmp_path, FakeEngine(), max_concurrent_uploads=1)
    release = asyncio.Event()
    sent_first_chunk = asyncio.Event()

    async def slow_body():  # an upload that is still arriving: it holds the only slot
        yield b"--x\r\nContent-Disposition: form-data; name=\"activate\"\r\n\r\n"
        sent_first_chunk.set()
        await release.wait()
        yield b"true\r\n--x--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=x"}
    async with app.router.lifespan_context(app):
        await wait_until(lambda: app.state.service.ready)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            first = asyncio.ensure_future(client.post("/v1/tasks/sentiment/versions", content=slow_body(), headers=headers))
            await asyncio.wait_for(sent_first_chunk.wait(), 5)
            await asyncio.sleep(0.05)  # the route is now reading the first body inside its slot
            second = await client.post("/v1/tasks/sentiment/versions", content=b"--x--\r\n", headers=headers)
            assert second.status_code == 429, second.text
            assert second.headers["retry-after"] == "2" and second.json()["error_type"] == "overloaded"
            assert "1 uploads are already in progress" in second.json()["error"]
            release.set()
            assert (await first).status_code == 422  # no files: refused, but it was read
            third = await client.post("/v1/tasks/sentiment/versions", content=b"--x--\r\n", headers=headers)
            assert third.status_code == 422  # the slot was given back
            # Each counted once, as what it is: the upload slot's 429 a refusal, the two empty forms invalid.
            counted = admin_actions((await client.get("/metrics")).text)
            assert counted == {("upload", "refused"): 1, ("upload", "invalid"): 2}


def test_the_upload_cap_is_a_setting() -> None:
    assert Settings.model_fields["max_concurrent_uploads"].default == 2
    assert json.dumps(Settings(store="/", max_concurrent_uploads=5).max_concurrent_uploads) == "5"


def test_a_task_larger_than_the_whole_cache_is_a_503_without_retry_after_naming_the_flag(tmp_path: Path) -> None:
    """It can never serve until the server restarts with a larger budget: 503 task_unavailable (the
    request is fine, the server cannot serve that task), with no Retry-After to retry on, naming the
    budget as the command line gave it."""
    write_task(tmp_path, "big", "v1")
    app = create_app(Settings(store=tmp_path, cache_max_bytes=999, max_wait_ms=1.0), engine=FakeEngine(task_nbytes=1000),
                     flags={"cache_max_bytes": "--cache-max-bytes"})
    with TestClient(app) as client:
        wait_ready(client)
        for _ in range(2):
            refused = client.post("/v1/tasks/big/classify", json={"inputs": ["x"]})
            assert (refused.status_code, refused.json()["error_type"]) == (503, "task_unavailable"), refused.text
            assert "Retry-After" not in refused.headers
            assert "until --cache-max-bytes is raised" in refused.json()["error"]
