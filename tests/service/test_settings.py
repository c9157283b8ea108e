from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, bundled_backbone_path, default_store_dir, describe_validation_error


def test_env_vars_use_the_adaptserve_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADAPTSERVE_STORE", str(tmp_path))
    monkeypatch.setenv("ADAPTSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("ADAPTSERVE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("ADAPTSERVE_BACKBONE", "")  # empty means unset, not "."
    settings = Settings()
    assert (settings.store, settings.max_batch_size, settings.log_level) == (tmp_path, 8, "debug")
    assert settings.backbone is None


def test_arguments_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_PORT", "9000")
    assert Settings(port=9100).port == 9100


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"port": 70000}, "ADAPTSERVE_PORT: Input should be less than or equal to 65535"),
        ({"device": "tpu"}, "ADAPTSERVE_DEVICE: device must be auto, cpu, cuda or cuda:N"),
        ({"dtype": "int8"}, "ADAPTSERVE_DTYPE: Input should be 'auto', 'float32', 'float16' or 'bfloat16'"),
        ({"max_batch_size": 0}, "ADAPTSERVE_MAX_BATCH_SIZE: Input should be greater than or equal to 1"),
        ({"small_batch_tokens": -1}, "ADAPTSERVE_SMALL_BATCH_TOKENS: Input should be greater than or equal to 0"),
        ({"max_queue": 10}, "max_queue (10) is smaller than max_inputs_per_request (64)"),
        ({"request_timeout_s": 0}, "ADAPTSERVE_REQUEST_TIMEOUT_S: Input should be greater than 0"),
        ({"unknown_knob": 1}, "ADAPTSERVE_UNKNOWN_KNOB: Extra inputs are not permitted"),
        ({"store_backend": "s3"}, "store_backend=s3 needs ADAPTSERVE_S3_BUCKET"),
        ({"store_backend": "gcs"}, "ADAPTSERVE_STORE_BACKEND: Input should be 'local' or 's3'"),
        ({"redis_prefix": "a b"}, "ADAPTSERVE_REDIS_PREFIX: String should match pattern"),
        ({"redis_reconnect_min_s": 9}, "redis_reconnect_min_s is larger than redis_reconnect_max_s"),
        ({"upload_max_compression_ratio": 0.5}, "ADAPTSERVE_UPLOAD_MAX_COMPRESSION_RATIO"),
    ],
)
def test_invalid_settings_say_which_variable_to_fix(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        Settings(**overrides)
    assert message in describe_validation_error(error.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", " CUDA:0 "])
def test_devices(device: str) -> None:
    assert Settings(device=device).device == device.strip().lower()


def test_body_limit_is_derived_from_the_input_limits_unless_set() -> None:
    derived = Settings(max_inputs_per_request=2, max_chars_per_input=10).body_limit_bytes
    assert derived == 2 * 2 * 10 * 12 + 64 * 1024
    assert Settings(max_body_bytes=5000).body_limit_bytes == 5000


def test_default_store_is_the_repo_adapters_store_or_the_working_directory() -> None:
    repo_store = Path(__file__).resolve().parents[2] / "adapters_store"
    expected = repo_store if repo_store.is_dir() else Path.cwd() / "adapters_store"
    assert default_store_dir() == expected


def test_bundled_backbone_is_the_packaged_minilm() -> None:
    path = bundled_backbone_path()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def test_upload_limits_are_derived_from_the_file_limits_unless_set() -> None:
    settings = Settings(upload_max_weights_bytes=4096, upload_max_config_bytes=2048)
    assert settings.upload_limit_bytes == settings.upload_uncompressed_limit_bytes == 4096 + 2048 + 1024 * 1024
    assert Settings(upload_max_bytes=5000).upload_limit_bytes == 5000


def test_s3_prefix_is_normalised_and_tokens_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_INFERENCE_TOKENS", "tok-a,tok-b")
    settings = Settings(s3_prefix="/tenants/a/", store_backend="s3", s3_bucket="b")
    assert settings.s3_prefix == "tenants/a/" and Settings().s3_prefix == ""
    assert settings.auth_enabled and len(settings.inference_tokens) == 2
    assert "tok-a" not in repr(settings) and "tok-a" not in str(settings.model_dump())
