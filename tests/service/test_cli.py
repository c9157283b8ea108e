from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest

from service import cli
from service.server import HeaderTimeoutProtocol


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """(uvicorn.Config, sockets) of every server `serve` would run; the sockets are closed."""
    import uvicorn

    calls: list[tuple] = []

    def run(server, sockets=None) -> None:
        calls.append((server.config, [s.getsockname() for s in sockets or []]))
        for sock in sockets or []:
            sock.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    return calls


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_flags_override_env_and_run_one_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, uvicorn_calls: list
) -> None:
    monkeypatch.setenv("ADAPTSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("ADAPTSERVE_MAX_QUEUE", "500")
    monkeypatch.setenv("ADAPTSERVE_HEADER_READ_TIMEOUT_S", "7")
    port = _free_port()
    code = cli.main(["serve", "--store", str(tmp_path), "--max-batch-size", "16", "--host", "127.0.0.1", "--port", str(port)])
    assert code == 0
    (config, sockets), = uvicorn_calls
    settings = config.app.state.service.settings
    assert (settings.store, settings.max_batch_size, settings.max_queue) == (tmp_path, 16, 500)
    assert (config.port, config.workers, sockets) == (port, 1, [("127.0.0.1", port)])
    assert issubclass(config.http, HeaderTimeoutProtocol) and config.http.header_timeout_s == 7.0  # slowloris deadline
    assert config.http.metrics is config.app.state.service.metrics  # it counts the requests it refuses


@pytest.mark.parametrize("case", ["port in use", "host that does not resolve", "host not of this machine"])
def test_serve_refuses_a_place_it_cannot_listen_on_before_loading_anything(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture, uvicorn_calls: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import service.app

    monkeypatch.setattr(service.app, "create_app", lambda *a, **k: pytest.fail("the app was built"))
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    host, expected = {"port in use": ("127.0.0.1", f"--port: port {port} on 127.0.0.1 is already in use"),
                      "host that does not resolve": ("no-such-host.invalid", "--host: cannot resolve 'no-such-host.invalid'"),
                      "host not of this machine": ("192.0.2.1", "--host: 192.0.2.1 is not an address of this machine")}[case]
    try:
        code = cli.main(["serve", "--store", str(tmp_path), "--host", host, "--port", str(port if case == "port in use" else _free_port())])
    finally:
        held.close()
    assert code == 2 and expected in capsys.readouterr().err and uvicorn_calls == []


def test_serve_names_a_port_from_the_environment_by_its_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture, uvicorn_calls: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    monkeypatch.setenv("ADAPTSERVE_PORT", str(port))
    try:
        code = cli.main(["serve", "--store", str(tmp_path), "--host", "127.0.0.1"])
    finally:
        held.close()
    assert code == 2 and f"adaptserve serve: ADAPTSERVE_PORT: port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, env, name",
    [
        ({"port": "--port"}, {}, "--port"),
        ({"port": "--port"}, {"ADAPTSERVE_PORT": "9000"}, "--port"),  # the flag overrides the variable
        ({}, {"ADAPTSERVE_PORT": "9000"}, "ADAPTSERVE_PORT"),
        ({}, {"adaptserve_port": "9000"}, "ADAPTSERVE_PORT"),  # pydantic-settings reads names in any case
        ({}, {}, "--port / ADAPTSERVE_PORT"),  # the default: both places it could be changed
    ],
)
def test_a_serve_setting_is_named_where_it_was_set(
    flags: dict, env: dict, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("ADAPTSERVE_PORT", "adaptserve_port"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    assert cli._named("port", flags) == name


@pytest.mark.parametrize(
    "argv, env, message",
    [
        # a value the command line gave is named by its flag ...
        (["serve", "--port", "70000"], {}, "--port: Input should be less than or equal to 65535 (got 70000)"),
        (["serve", "--max-batch-size", "0"], {}, "--max-batch-size: Input should be greater than or equal to 1 (got 0)"),
        (["serve", "--device", "gpu"], {}, "--device: device must be auto, cpu, cuda or cuda:N (got 'gpu')"),
        (["serve", "--store", "/no/such/dir"], {}, "--store: task store '/no/such/dir' is not a directory; create it"),
        (["serve", "--backbone", "/no/such/model"], {}, "--backbone: '/no/such/model' is not a directory"),
        (["serve", "--backbone", "/no/such/model.gguf"], {}, "--backbone: no GGUF file"),
        (["serve", "--redis-url", "localhost:6379"], {}, "--redis-url: must start with redis://"),
        (["serve", "--max-queue", "10"], {}, "--max-queue (10) is smaller than ADAPTSERVE_MAX_INPUTS_PER_REQUEST (64)"),
        # ... one the environment gave, by its variable (a flag overrides it: the flag's value is the one refused)
        (["serve"], {"ADAPTSERVE_MAX_BATCH_SIZE": "0"}, "ADAPTSERVE_MAX_BATCH_SIZE: Input should be greater than or equal to 1 (got '0')"),
        (["serve"], {"ADAPTSERVE_BACKBONE": "/no/such/model"}, "ADAPTSERVE_BACKBONE: '/no/such/model' is not a directory"),
        (["serve"], {"ADAPTSERVE_STORE": "/no/such/dir"}, "ADAPTSERVE_STORE: task store '/no/such/dir' is not a directory"),
        (["serve", "--max-inputs-per-request", "20"], {"ADAPTSERVE_MAX_QUEUE": "10"},
         "ADAPTSERVE_MAX_QUEUE (10) is smaller than --max-inputs-per-request (20)"),
        (["serve", "--max-batch-size", "0"], {"ADAPTSERVE_MAX_BATCH_SIZE": "8"}, "--max-batch-size: Input should be greater"),
    ],
)
def test_serve_refuses_bad_settings_naming_them_as_given(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture, uvicorn_calls: list,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    # A typed flag is never reported as its variable, nor a variable as a flag.
    for flag in (a for a in argv if a.startswith("--")):
        assert f"ADAPTSERVE_{flag[2:].replace('-', '_').upper()}" not in err
    for variable in env:
        flag = "--" + variable.removeprefix("ADAPTSERVE_").lower().replace("_", "-")
        if flag not in argv:
            assert f"{flag}:" not in err and f"with {flag}" not in err
    assert uvicorn_calls == []


@pytest.mark.parametrize("argv, env, message", [
    (["--store-backend", "s3"], {}, "adaptserve serve: --store-backend=s3 needs boto3: pip install 'adaptserve[s3]'"),
    ([], {"ADAPTSERVE_STORE_BACKEND": "s3"}, "adaptserve serve: ADAPTSERVE_STORE_BACKEND=s3 needs boto3"),
])
def test_the_s3_store_set_up_names_the_setting_as_given(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture, uvicorn_calls: list,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # an install without the s3 extra
    monkeypatch.setenv("ADAPTSERVE_S3_BUCKET", "tasks")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve", *argv, "--host", "127.0.0.1", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert message in err and ("ADAPTSERVE_STORE_BACKEND" in err) == bool(env) and uvicorn_calls == []


def test_serve_refuses_a_model_folder_without_config(tmp_path: Path, capsys: pytest.CaptureFixture, uvicorn_calls: list) -> None:
    assert cli.main(["serve", "--store", str(tmp_path), "--backbone", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err and uvicorn_calls == []


def test_serve_refuses_cuda_where_there_is_none(tmp_path: Path, capsys: pytest.CaptureFixture, uvicorn_calls: list) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert cli.main(["serve", "--store", str(tmp_path), "--device", "cuda"]) == 2
    assert "PyTorch sees no CUDA device" in capsys.readouterr().err and uvicorn_calls == []


def test_serve_warns_about_unknown_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, uvicorn_calls: list, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ADAPTSERVE_MAX_BATCHSIZE", "8")  # the typo of ADAPTSERVE_MAX_BATCH_SIZE
    assert cli.main(["serve", "--store", str(tmp_path)]) == 0
    assert "ADAPTSERVE_MAX_BATCHSIZE: no such setting" in caplog.text or "ignoring ADAPTSERVE_MAX_BATCHSIZE" in caplog.text


def test_the_unknown_variable_warning_survives_a_quiet_log_level(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, uvicorn_calls: list, capsys: pytest.CaptureFixture
) -> None:
    """--log-level error hides warnings; not a mistyped setting's (the service would run without it)."""
    monkeypatch.setenv("ADAPTSERVE_MAX_BATCHSIZE", "8")
    logger = logging.getLogger("service")
    monkeypatch.setattr(logger, "level", logging.ERROR)  # what basicConfig(level=ERROR) does outside pytest
    assert cli.main(["serve", "--store", str(tmp_path), "--log-level", "error"]) == 0
    assert "WARNING ignoring ADAPTSERVE_MAX_BATCHSIZE: no such setting" in capsys.readouterr().err


@pytest.mark.parametrize("command, function", [("train", "main"), ("evaluate", "evaluate_main")])
def test_train_and_evaluate_are_handed_to_training_cli(
    monkeypatch: pytest.MonkeyPatch, command: str, function: str
) -> None:
    received: list[list[str]] = []
    fake = types.ModuleType("training.cli")
    setattr(fake, function, lambda argv: received.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "training.cli", fake)
    assert cli.main([command, "--task", "sst2", "--help"]) == 0
    assert received == [["--task", "sst2", "--help"]]


def test_a_missing_training_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "train", ("no_such_training_pkg.cli", "main", ""))
    assert cli.main(["train"]) == 2
    assert "not available" in capsys.readouterr().err


def test_a_broken_import_inside_training_is_not_hidden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    package = tmp_path / "broken_training_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "train", ("broken_training_pkg.cli", "main", ""))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        cli.main(["train"])


def test_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in ("serve", "train", "evaluate"))


def test_debug_logging_keeps_the_aws_sdk_quiet(tmp_path: Path, uvicorn_calls: list) -> None:
    """botocore's debug records hold signed request headers: never in adaptserve's log."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)  # what basicConfig(level=DEBUG) does where no handler was set up before
    try:
        assert cli.main(["serve", "--store", str(tmp_path), "--log-level", "debug", "--host", "127.0.0.1",
                         "--port", str(_free_port())]) == 0
        for name in ("botocore", "boto3", "s3transfer", "urllib3"):
            assert logging.getLogger(name).getEffectiveLevel() >= logging.INFO, name
    finally:
        root.setLevel(level)
        for name in ("botocore", "boto3", "s3transfer", "urllib3"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def _config_that_builds_no_model(folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": "x"}')


def _weights_without_the_tokenizer(folder: Path) -> None:
    # config.json and the weights copied alone: transformers still gave a tokenizer of only the 5
    # special tokens, and the server went ready reading every text as [UNK]
    from tests.factories import save_tiny_backbone

    save_tiny_backbone("bert", folder)
    for path in folder.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            path.unlink()


@pytest.mark.parametrize("broken, cause", [
    (_config_that_builds_no_model, ("hidden_size",)),
    (_weights_without_the_tokenizer, ("has no tokenizer", "special tokens")),
], ids=["config that builds no model", "weights without the tokenizer"])
def test_serve_exits_1_when_the_backbone_fails_to_load(tmp_path: Path, broken, cause: tuple[str, ...]) -> None:
    # A real `adaptserve serve` process on a model folder that passes the pre-start check but fails
    # in the background load: the server stops with exit 1 and the cause (so an orchestrator
    # restarts it at once), not alive and never ready.
    import os
    import subprocess

    broken(tmp_path / "bb")
    (tmp_path / "store").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(_free_port()),
         "--store", str(tmp_path / "store"), "--backbone", str(tmp_path / "bb")],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    _, said, told = done.stderr.rpartition("adaptserve serve: startup failed: ")
    assert said and all(part in told for part in cause), done.stderr[-3000:]


@pytest.mark.parametrize("flag", [flag for flag, _, _, _ in cli._SERVE_FLAGS])
def test_serve_refuses_a_flag_given_blank(flag: str, capsys: pytest.CaptureFixture, uvicorn_calls: list) -> None:
    # `--redis-url "$REDIS_URL"` with the variable unset: not the default (a replica on its own
    # local registry, quietly), an error naming the flag. (A blank *variable* still means unset.)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", flag, " "])
    assert exit_.value.code == 2 and uvicorn_calls == []
    assert f"argument {flag}: an empty value; give one, or leave the flag out" in capsys.readouterr().err
