from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from service import cli


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple, dict]]:
    import uvicorn

    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


def test_serve_flags_override_env_and_run_one_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, uvicorn_calls: list
) -> None:
    monkeypatch.setenv("ADAPTSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("ADAPTSERVE_MAX_QUEUE", "500")
    code = cli.main(["serve", "--store", str(tmp_path), "--max-batch-size", "16", "--port", "8123"])
    assert code == 0
    (app,), kwargs = uvicorn_calls[0]
    settings = app.state.service.settings
    assert (settings.store, settings.max_batch_size, settings.max_queue) == (tmp_path, 16, 500)
    assert (kwargs["port"], kwargs["workers"]) == (8123, 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--port", "70000"], "ADAPTSERVE_PORT"),
        (["serve", "--device", "gpu"], "ADAPTSERVE_DEVICE"),
        (["serve", "--store", "/no/such/dir"], "is not a directory"),
        (["serve", "--backbone", "/no/such/model"], "ADAPTSERVE_BACKBONE: '/no/such/model' is not a directory"),
        (["serve", "--backbone", "/no/such/model.gguf"], "ADAPTSERVE_BACKBONE: no GGUF file"),
        (["serve", "--redis-url", "localhost:6379"], "ADAPTSERVE_REDIS_URL: must start with redis://"),
    ],
)
def test_serve_refuses_bad_settings_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture, uvicorn_calls: list
) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert uvicorn_calls == []


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
