"""Real PEFT adapters (what PEFT's save_pretrained writes) uploaded through the app: a config PEFT
itself would refuse is refused, and one already stored keeps serving; an adapter that names another
base model than the backbone is stored with a warning, or refused where the settings say so."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from peft import PeftConfig

from service.engine.backbone import load_backbone
from service.engine.bundle import content_version
from service.engine.engine import Engine
from service.engine.model_id import BUNDLED_MODEL_ID
from service.engine.peft_import import PEFT_METHODS
from service.upload.intake import PEFT_TYPES
from tests.factories import save_tiny_backbone
from tests.hotswap.bundles import CONFIG, WEIGHTS, tree_hash
from tests.hotswap.conftest import AUTH_READER
from tests.hotswap.servers import RedisServer, eventually
from tests.hotswap.test_versions_api import upload
from tests.peft_fixtures import make_peft_bundle

# Where the Hugging Face cache keeps a hub model: the backbone folder's path names its hub id.
HUB_CACHE = "hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/8b3219a92973c328a8e22fadcfa821b5dc75636a"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The tiny BERT, loaded from a Hugging Face cache snapshot of all-MiniLM-L6-v2 (as far as its path says)."""
    backbone_dir = save_tiny_backbone("bert", tmp_path_factory.mktemp("cache") / HUB_CACHE)
    return Engine(load_backbone(backbone_dir, device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """method -> a PEFT adapter directory, made for a BERT shaped like the hot-swap tests' tiny one."""
    out = tmp_path_factory.mktemp("peft")
    return {method: make_peft_bundle(method, out / method, num_labels=2)[1] for method in ("lora", "prompt")}


def peft_bundle(adapter: Path, **config: object) -> tuple[bytes, bytes]:
    """The adapter's two files, `config` merged into its adapter_config.json."""
    cfg = json.loads((adapter / CONFIG).read_text()) | config
    return json.dumps(cfg).encode(), (adapter / WEIGHTS).read_bytes()


def test_the_upload_check_knows_the_types_the_engine_serves() -> None:
    assert set(PEFT_TYPES) == set(PEFT_METHODS)


@pytest.mark.parametrize("method, spelling", [("lora", "lora"), ("lora", "Lora"), ("prompt", "prompt_tuning")])
def test_a_peft_type_peft_refuses_is_refused_naming_its_spelling(make_client, adapters, store: Path, tmp_path: Path,
                                                                 method: str, spelling: str) -> None:
    config, weights = peft_bundle(adapters[method], peft_type=spelling)
    (tmp_path / CONFIG).write_bytes(config)
    with pytest.raises(KeyError):  # PEFT itself cannot load it
        PeftConfig.from_pretrained(str(tmp_path))
    client = make_client()
    before = tree_hash(store)
    response = upload(client, "peft-task", (config, weights))
    assert response.status_code == 422, response.text
    assert response.json()["problems"] == [
        f'{CONFIG} has "peft_type": "{spelling}", a spelling PEFT itself refuses (it reads only its upper-case type '
        f'names): write "peft_type": "{spelling.upper()}", as save_pretrained does']
    assert tree_hash(store) == before
    assert upload(client, "peft-task", peft_bundle(adapters[method])).status_code == 201  # as PEFT wrote it


def test_a_stored_bundle_spelled_in_lower_case_still_serves(make_client, adapters, store: Path) -> None:
    """Uploads spelled "lora" were accepted before they were refused: a version stored then serves
    as it did, rather than fail at its next load."""
    config, weights = peft_bundle(adapters["lora"], peft_type="lora")
    version = content_version(config, weights)
    (store / "legacy" / version).mkdir(parents=True)
    (store / "legacy" / version / CONFIG).write_bytes(config)
    (store / "legacy" / version / WEIGHTS).write_bytes(weights)
    response = make_client().post("/v1/tasks/legacy/classify", json={"inputs": ["great fun"]}, headers=AUTH_READER)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == version


def test_the_backbone_is_known_by_the_hub_id_its_cache_path_holds(engine: Engine) -> None:
    assert engine.backbone.model_id == BUNDLED_MODEL_ID


def other_model(base: str) -> str:
    return (f"the adapter's base_model_name_or_path is {base!r}, but this server's backbone is "
            f"'{BUNDLED_MODEL_ID}': an adapter trained on another model can fit this backbone's shapes and still "
            f"answer wrong scores. Train it on '{BUNDLED_MODEL_ID}'; if it was, set base_model_name_or_path to "
            f"'{BUNDLED_MODEL_ID}' in adapter_config.json")


OTHER_MODELS = [
    "sentence-transformers/paraphrase-MiniLM-L6-v2",  # 6 layers, 384 wide: the same shapes
    "sentence-transformers/all-MiniLM-L12-v2",
    "/root/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L12-v2/snapshots/c004d8e",
    "bert-base-uncased",  # a legacy hub id has no owner
]
SAME_OR_UNKNOWN = [
    BUNDLED_MODEL_ID,
    "all-MiniLM-L6-v2",
    "Xenova/all-minilm-l6-v2",  # another owner's copy of the same model, in its own case
    r"C:\Users\me\.cache\huggingface\hub\models--sentence-transformers--all-MiniLM-L6-v2\snapshots\8b3219a",
    "/home/me/models/all-MiniLM-L12-v2",  # a local folder: its name is whatever the trainer called it
    "./checkpoint-500",
    "",
    None,
]


@pytest.mark.parametrize("base", OTHER_MODELS)
def test_an_adapter_for_another_base_model_is_stored_with_a_warning(make_client, adapters, base: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="service.hotswap")
    client = make_client()
    response = upload(client, "peft-task", peft_bundle(adapters["lora"], base_model_name_or_path=base))
    assert response.status_code == 201, response.text
    assert response.json()["warnings"] == [other_model(base)]
    version = response.json()["version"]
    logged = [r.getMessage() for r in caplog.records if r.name == "service.hotswap"]
    assert logged == [f"task peft-task: version {version}: {other_model(base)}"]
    served = client.post("/v1/tasks/peft-task/classify", json={"inputs": ["great fun"]}, headers=AUTH_READER)
    assert served.status_code == 200 and served.json()["version"] == version


@pytest.mark.parametrize("registry", ["local", "redis"])
def test_the_versions_listing_keeps_each_versions_upload_warnings(make_client, adapters, tmp_path: Path,
                                                                  registry: str) -> None:
    redis = RedisServer(tmp_path / "redis").start() if registry == "redis" else None
    try:
        client = make_client(**({"redis_url": redis.url} if redis else {}))
        eventually(lambda: client.get("/readyz").json()["registry"]["connected"])  # admin writes wait for it
        other = OTHER_MODELS[0]
        uploads = [upload(client, "peft-task", peft_bundle(adapters["lora"], base_model_name_or_path=base))
                   for base in (other, BUNDLED_MODEL_ID)]
        assert [u.status_code for u in uploads] == [201, 201], [u.text for u in uploads]
        warned, fine = (u.json() for u in uploads)
        assert warned["warnings"] and fine["warnings"] == []
        listed = client.get("/v1/tasks/peft-task/versions", headers=AUTH_READER)
        assert listed.status_code == 200, listed.text
        rows = {row["version"]: row["warnings"] for row in listed.json()["versions"]}
        assert rows == {warned["version"]: [other_model(other)], fine["version"]: []}
    finally:
        if redis:
            redis.kill()


@pytest.mark.parametrize("base", SAME_OR_UNKNOWN)
def test_an_adapter_for_this_backbone_or_a_local_path_has_no_warning(make_client, adapters, base: str | None) -> None:
    response = upload(make_client(upload_refuse_other_base_model=True), "peft-task",
                      peft_bundle(adapters["lora"], base_model_name_or_path=base))
    assert response.status_code == 201, response.text
    assert response.json()["warnings"] == []


def test_as_peft_wrote_it_the_base_is_a_local_path_and_not_compared(make_client, adapters) -> None:
    assert Path(json.loads((adapters["lora"] / CONFIG).read_text())["base_model_name_or_path"]).is_absolute()
    response = upload(make_client(upload_refuse_other_base_model=True), "peft-task", peft_bundle(adapters["lora"]))
    assert response.status_code == 201 and response.json()["warnings"] == [], response.text


@pytest.mark.parametrize("base", OTHER_MODELS[:2])
def test_the_setting_refuses_an_adapter_for_another_base_model(make_client, adapters, store: Path, base: str) -> None:
    client = make_client(upload_refuse_other_base_model=True)
    before = tree_hash(store)
    response = upload(client, "peft-task", peft_bundle(adapters["lora"], base_model_name_or_path=base))
    assert response.status_code == 422, response.text
    assert response.json()["problems"] == [f"{other_model(base)} (this server refuses adapters for another base model: "
                                           "ADAPTSERVE_UPLOAD_REFUSE_OTHER_BASE_MODEL)"]
    assert tree_hash(store) == before
