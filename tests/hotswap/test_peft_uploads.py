"""Real PEFT adapters (what PEFT's save_pretrained writes) uploaded through the app: a config PEFT
itself would refuse is refused, and one already stored keeps serving."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftConfig

from service.engine.bundle import content_version
from service.engine.peft_import import PEFT_METHODS
from service.upload.intake import PEFT_TYPES
from tests.hotswap.bundles import CONFIG, WEIGHTS, tree_hash
from tests.hotswap.conftest import AUTH_READER
from tests.hotswap.test_versions_api import upload
from tests.peft_fixtures import make_peft_bundle


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
