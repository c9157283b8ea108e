from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, bundled_backbone_path, default_store_dir, describe_validation_error, unknown_variables


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
        ({"max_queue": 10}, "ADAPTSERVE_MAX_QUEUE (10) is smaller than ADAPTSERVE_MAX_INPUTS_PER_REQUEST (64)"),
        ({"request_timeout_s": 0}, "ADAPTSERVE_REQUEST_TIMEOUT_S: Input should be greater than 0"),
        ({"unknown_knob": 1}, "ADAPTSERVE_UNKNOWN_KNOB: Extra inputs are not permitted"),
        ({"store_backend": "s3"}, "ADAPTSERVE_STORE_BACKEND=s3 needs ADAPTSERVE_S3_BUCKET"),
        # with no token auth is off: /metrics would stay open, which the setting says it is not
        ({"metrics_require_token": True}, "ADAPTSERVE_METRICS_REQUIRE_TOKEN needs a token to require"),
        ({"store_backend": "gcs"}, "ADAPTSERVE_STORE_BACKEND: Input should be 'local' or 's3'"),
        ({"redis_prefix": "a b"}, "ADAPTSERVE_REDIS_PREFIX: String should match pattern"),
        ({"redis_reconnect_min_s": 9}, "ADAPTSERVE_REDIS_RECONNECT_MIN_S (9 s) is larger than ADAPTSERVE_REDIS_RECONNECT_MAX_S (5 s)"),
        ({"redis_timeout_s": "inf"}, "ADAPTSERVE_REDIS_TIMEOUT_S: Input should be a finite number"),
        ({"max_wait_ms": "nan"}, "ADAPTSERVE_MAX_WAIT_MS: Input should be a finite number"),
        ({"redis_url": "localhost:6379"}, "ADAPTSERVE_REDIS_URL: must start with redis://, rediss:// or unix://"),
        ({"redis_url": "redis://redis:99999/0"}, "ADAPTSERVE_REDIS_URL: has an invalid port"),
        ({"redis_url": "redis://redis:6379/zero"}, "ADAPTSERVE_REDIS_URL: database must be a number"),
        ({"redis_url": "redis://:pw@[::1"}, "ADAPTSERVE_REDIS_URL: is not a URL"),
        ({"upload_max_compression_ratio": 0.5}, "ADAPTSERVE_UPLOAD_MAX_COMPRESSION_RATIO"),
        ({"upload_max_bytes": 5000}, "ADAPTSERVE_UPLOAD_MAX_BYTES (5000) is smaller than ADAPTSERVE_UPLOAD_MAX_WEIGHTS_BYTES"),
        ({"upload_max_weights_bytes": 4096, "upload_max_config_bytes": 2048, "upload_max_uncompressed_bytes": 6000},
         "ADAPTSERVE_UPLOAD_MAX_UNCOMPRESSED_BYTES (6000) is smaller than"),
    ],
)
def test_invalid_settings_say_which_variable_to_fix(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        Settings(**overrides)
    assert message in describe_validation_error(error.value)


@pytest.mark.parametrize(
    "overrides, flags, message",
    [
        ({"max_batch_size": 0}, {"max_batch_size": "--max-batch-size"}, "--max-batch-size: Input should be greater than or equal to 1 (got 0)"),
        # a cross-field check names each setting as it was given: here one flag, one default
        ({"max_queue": 10}, {"max_queue": "--max-queue"}, "settings: --max-queue (10) is smaller than ADAPTSERVE_MAX_INPUTS_PER_REQUEST (64)"),
        ({"max_queue": 10, "max_inputs_per_request": 20}, {"max_inputs_per_request": "--max-inputs-per-request"},
         "settings: ADAPTSERVE_MAX_QUEUE (10) is smaller than --max-inputs-per-request (20)"),
        ({"store_backend": "s3"}, {"store_backend": "--store-backend"}, "settings: --store-backend=s3 needs ADAPTSERVE_S3_BUCKET"),
        # a field not in `flags` keeps its variable's name, even when another field is a flag
        ({"port": 70000, "max_batch_size": 0}, {"port": "--port"}, "ADAPTSERVE_MAX_BATCH_SIZE: Input should be greater"),
    ],
)
def test_invalid_settings_from_flags_are_named_by_their_flag(overrides: dict, flags: dict, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        Settings(**overrides)
    described = describe_validation_error(error.value, flags)
    assert message in described
    for field in flags:  # the user typed the flag and never set the variable
        assert f"ADAPTSERVE_{field.upper()}" not in described


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
    set_ = Settings(upload_max_weights_bytes=2048, upload_max_config_bytes=1024, upload_max_bytes=5000)
    assert set_.upload_limit_bytes == 5000


def test_s3_prefix_is_normalised_and_tokens_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_INFERENCE_TOKENS", "tok-a,tok-b")
    settings = Settings(s3_prefix="/tenants/a/", store_backend="s3", s3_bucket="b")
    assert settings.s3_prefix == "tenants/a/" and Settings().s3_prefix == ""
    assert settings.auth_enabled and len(settings.inference_tokens) == 2
    assert "tok-a" not in repr(settings) and "tok-a" not in str(settings.model_dump())


def test_an_empty_host_or_store_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not uvicorn's "" (every interface) nor Path("") (the working directory).
    monkeypatch.setenv("ADAPTSERVE_HOST", "")
    monkeypatch.setenv("ADAPTSERVE_STORE", " ")
    settings = Settings()
    assert (settings.host, settings.store) == ("127.0.0.1", default_store_dir())


def test_an_empty_variable_means_unset_for_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # An env file written from .env.example leaves blank lines like `ADAPTSERVE_PORT=`: they mean
    # "unset" for numbers and choices as they do for paths, not "refuse to start".
    for name in ("PORT", "MAX_BATCH_SIZE", "MAX_WAIT_MS", "LOG_LEVEL", "DEVICE", "ADMIN_TOKENS"):
        monkeypatch.setenv(f"ADAPTSERVE_{name}", "")
    settings = Settings()
    defaults = {name: Settings.model_fields[name].get_default(call_default_factory=True)
                for name in ("port", "max_batch_size", "max_wait_ms", "log_level", "device")}
    assert {name: getattr(settings, name) for name in defaults} == defaults
    assert settings.admin_tokens == []


def test_a_blank_token_variable_still_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_ADMIN_TOKENS", "  ")
    assert Settings().admin_tokens == []
    monkeypatch.setenv("ADAPTSERVE_ADMIN_TOKENS", "tok-1, ,tok-2,")
    assert len(Settings().admin_tokens) == 2


def test_an_empty_token_file_is_refused_not_an_open_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "admin-tokens"
    empty.write_text("\n , \n")
    monkeypatch.setenv("ADAPTSERVE_ADMIN_TOKENS_FILE", str(empty))
    with pytest.raises(ValidationError) as error:
        Settings()
    assert "ADAPTSERVE_ADMIN_TOKENS_FILE: the token file holds no tokens" in describe_validation_error(error.value)
    empty.write_text("tok-1\ntok-2\n")
    assert len(Settings().admin_tokens) == 2
    empty.write_bytes(b"\xef\xbb\xbftok-1\r\n")  # saved by a Windows editor: a BOM, CRLF
    assert [t.get_secret_value() for t in Settings().admin_tokens] == ["tok-1"]


TOKEN_FILE_PROBLEMS = {  # the file's content (None: no file there) -> what is wrong and what to do
    "missing": (None, "the token file cannot be read (No such file or directory); create it or mount the secret "
                "there, or unset this setting"),
    "not UTF-8": (b"caf\xe9-s3cr3t", "the token file is not UTF-8 text; save it as UTF-8"),
    "empty": (b"\n , \n", "the token file holds no tokens; put at least one token in it (comma- or newline-separated), "
              "or unset this setting"),
    "a token no client could send": (b"ok-1\n[\"bad-s3cr3t\"]\n", "token 2 of the token file has characters a bearer "
                                     "token cannot hold (allowed: letters, digits and -._~+/ with trailing =); separate "
                                     "tokens with commas or newlines, not a JSON list"),
}


@pytest.mark.parametrize("field", ["admin_tokens_file", "inference_tokens_file"])
@pytest.mark.parametrize("problem", list(TOKEN_FILE_PROBLEMS), ids=list(TOKEN_FILE_PROBLEMS))
def test_a_token_file_problem_names_the_setting_and_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             field: str, problem: str) -> None:
    """Read like any setting's error: the setting, what is wrong and what to do, the file as its
    value; never the file's contents (before: `settings: ADAPTSERVE_..._FILE '...' cannot be read`)."""
    content, message = TOKEN_FILE_PROBLEMS[problem]
    path = tmp_path / "tokens"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv(f"ADAPTSERVE_{field.upper()}", str(path))
    with pytest.raises(ValidationError) as error:
        Settings(store=tmp_path)
    assert describe_validation_error(error.value) == f"ADAPTSERVE_{field.upper()}: {message} (got {str(path)!r})"
    assert "s3cr3t" not in str(error.value)


@pytest.mark.parametrize("name", ["ADMIN_TOKENS", "INFERENCE_TOKENS"])
@pytest.mark.parametrize("value", [",", " , ", ",,\n,"])
def test_a_token_variable_of_only_commas_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """Set but naming no token (what `${A},${B}` becomes with both unset): refused like an empty
    token file, not a server with auth off."""
    monkeypatch.setenv(f"ADAPTSERVE_{name}", value)
    with pytest.raises(ValidationError) as error:
        Settings()
    message = describe_validation_error(error.value)
    assert message.startswith(f"ADAPTSERVE_{name}: holds no tokens"), message


@pytest.mark.parametrize("tokens", ['["secret-a","secret-b"]', "secret a", "secret-a,'secret-b'"])
def test_tokens_no_client_could_send_are_refused_without_echoing_them(
    monkeypatch: pytest.MonkeyPatch, tokens: str
) -> None:
    monkeypatch.setenv("ADAPTSERVE_INFERENCE_TOKENS", tokens)
    with pytest.raises(ValidationError) as error:
        Settings()
    message = describe_validation_error(error.value)
    assert message.startswith("ADAPTSERVE_INFERENCE_TOKENS: token ") and "cannot hold" in message
    assert "secret" not in message


@pytest.mark.parametrize(("url", "says"), [
    ("redis://:pw-SECRET@redis:6379/x", "database must be a number"),
    # query options and socket paths are checked as the registry's redis-py client will read them,
    # not left to a traceback at start-up or a feed that fails on every reconnect
    ("unix://:pw-SECRET@/tmp/redis.sock?db=q", "Invalid value for 'db'"),
    ("redis://:pw-SECRET@redis:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
    ("redis://:pw-SECRET@redis:6379/0?health_check_interval=x", "Invalid value for 'health_check_interval'"),
    ("redis://:pw-SECRET@redis:6379/0?foo=bar", "option(s) foo"),
    ("redis://:pw-SECRET@redis:6379/0?ssl_cert_reqs=none", "option(s) ssl_cert_reqs"),
    ("unix://", "names no socket path"),
    # values redis-py parses but no connection works with: the feed failed on every reconnect
    ("redis://:pw-SECRET@redis:6379/0?protocol=9", "protocol must be 2 or 3 (got 9)"),
    ("redis://:pw-SECRET@redis:6379/0?socket_timeout=-1", "socket_timeout must be a number of seconds above 0 (got -1)"),
    ("redis://:pw-SECRET@redis:6379/0?socket_connect_timeout=0", "socket_connect_timeout must be a number of seconds above 0"),
    ("unix://:pw-SECRET@/tmp/redis.sock?health_check_interval=-5", "health_check_interval must be 0 (off) or more"),
    ("redis://:pw-SECRET@redis:6379/0?max_connections=-1", "max_connections must be 0 (no limit) or more"),
])
def test_a_redis_url_the_client_cannot_use_is_refused_by_name_without_its_password(url: str, says: str) -> None:
    with pytest.raises(ValidationError) as error:
        Settings(redis_url=url)
    message = describe_validation_error(error.value, {"redis_url": "--redis-url"})
    assert message.startswith("--redis-url: ") and says in message, message
    for described in (message, describe_validation_error(error.value)):
        assert "SECRET" not in described


@pytest.mark.parametrize("url", [
    "redis://redis:6379/0",
    "rediss://user:pw@cache.example.com:6380",
    "unix:///run/redis.sock",
    "redis://redis:6379/0?socket_timeout=2&health_check_interval=10",
    "rediss://user:pw@cache.example.com:6380/0?ssl_cert_reqs=none",
    "unix:///run/redis.sock?db=1",
    "redis://redis:6379/0?max_connections=20&client_name=adaptserve",
    "redis://redis:6379/0?protocol=3&socket_connect_timeout=0.5&health_check_interval=0&max_connections=0",
])
def test_redis_urls_redis_py_accepts_are_accepted(url: str) -> None:
    assert Settings(redis_url=url).redis_url == url


def test_unknown_adaptserve_variables_are_named() -> None:
    environ = {"ADAPTSERVE_MAX_BATCHSIZE": "8", "ADAPTSERVE_PORT": "1", "ADAPTSERVE_ADMIN_TOKEN": "t", "HOME": "/"}
    assert unknown_variables(environ) == ["ADAPTSERVE_MAX_BATCHSIZE"]
