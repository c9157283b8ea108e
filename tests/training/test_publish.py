"""The HTTP publish client against a real server on a free loopback port (the service's upload
endpoint does not exist yet, so a stand-in records what it is sent and answers as configured)."""
from __future__ import annotations

import contextlib
import email.parser
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from service.engine.bundle import CONFIG, WEIGHTS, content_version
from training.publish import PublishError, probe, upload


@dataclass
class Stand:
    url: str
    status: int = 201
    body: dict | str = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    answer_after_s: float = 0.0  # read the whole upload, then wait this long before answering


@pytest.fixture
def stand() -> Iterator[Stand]:
    state = Stand(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            msg = email.parser.BytesParser().parsebytes(
                f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw
            )
            files = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True) for p in msg.get_payload()}
            state.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "files": files})
            time.sleep(state.answer_after_s)
            body = state.body if isinstance(state.body, str) else json.dumps(state.body)
            self.send_response(state.status)
            kind = "text/html" if isinstance(state.body, str) and state.body.startswith("<!DOCTYPE") else "text/plain"
            self.send_header("Content-Type", "application/json" if isinstance(state.body, dict) else kind)
            self.send_header("Content-Length", str(len(body.encode())))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


CFG, WTS = b'{"labels": ["a", "b"]}', b"\x00weights"


def test_upload_sends_both_files_with_the_token(stand, monkeypatch):
    monkeypatch.delenv("ADAPTSERVE_ADMIN_TOKEN", raising=False)
    stand.body = {"task": "sst2", "version": "abc123"}
    got = upload(stand.url + "/", "sst2", CFG, WTS, token="s3cret")
    assert got.version == "abc123" and got.url == f"{stand.url}/v1/tasks/sst2/versions"
    (req,) = stand.requests
    assert req["path"] == "/v1/tasks/sst2/versions" and req["auth"] == "Bearer s3cret"
    assert req["files"] == {CONFIG: CFG, WEIGHTS: WTS}


def test_upload_reads_the_token_from_the_environment(stand, monkeypatch):
    monkeypatch.setenv("ADAPTSERVE_ADMIN_TOKEN", "from-env")
    got = upload(stand.url, "sst2", CFG, WTS)
    assert stand.requests[0]["auth"] == "Bearer from-env"
    assert got.version == content_version(CFG, WTS)  # the server sent none: the local content hash


@pytest.mark.parametrize("status,body,token,expected", [
    (404, {"detail": "Not Found"}, "t", "the server has no task upload endpoint (404)"),
    (405, "", "t", "the server has no task upload endpoint (405)"),
    (404, {"error": "task 'x' is archived", "error_type": "task_archived"}, "t", "404 task 'x' is archived"),
    (401, {"error": "missing bearer token", "error_type": "unauthorized"}, None, "pass --token or set ADAPTSERVE_ADMIN_TOKEN"),
    (403, {"error": "bad token", "error_type": "forbidden"}, "t", "not authorised (403: bad token); check the admin token (it came from --token)"),
    (422, {"error": "task 'sst2': head has 3 outputs but 2 labels", "error_type": "invalid_bundle"}, "t",
     "refused the bundle (422: task 'sst2': head has 3 outputs but 2 labels)"),
    (500, "boom", "t", "refused the bundle (500: boom)"),
    (501, "<!DOCTYPE HTML>\n<html>\n<body>\n<h1>Error response</h1>\n</body>\n</html>\n", "t",
     "refused the bundle (501: Not Implemented, an HTML page: not an adaptserve answer)"),
    (500, "a traceback\n  line two\n" + "x" * 400, "t", "refused the bundle (500: a traceback line two xxx"),
], ids=["404-route", "405", "404-app", "401", "403", "422", "500", "501-html", "500-long-text"])
def test_upload_errors_are_one_clear_line(stand, monkeypatch, status, body, token, expected):
    monkeypatch.delenv("ADAPTSERVE_ADMIN_TOKEN", raising=False)
    stand.status, stand.body = status, body
    with pytest.raises(PublishError) as err:
        upload(stand.url, "sst2", CFG, WTS, token=token)
    assert expected in str(err.value) and "\n" not in str(err.value)


@contextlib.contextmanager
def _stand_in(handler) -> Iterator[str]:
    """Another HTTP server on a free loopback port, answering with `handler`: its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_the_probe_finds_a_server_that_is_not_adaptserve_before_training(tmp_path):
    """Another HTTP server at the URL (its /healthz a 404 page) is named before any training."""
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    with _stand_in(lambda *a: Quiet(*a, directory=str(tmp_path))) as url:
        with pytest.raises(PublishError, match=r"no adaptserve service answers there \(GET /healthz: 404, a text/html body\)"):
            probe(url, "t")


def test_upload_needs_an_http_url():
    with pytest.raises(PublishError, match="http:// or https://"):
        upload("localhost:8000", "sst2", CFG, WTS)


def test_publish_to_the_real_service_then_classify(tiny_dir, tiny, csvs, tmp_path, monkeypatch, capsys):
    """Train, upload to the real app under uvicorn on a free loopback port, and classify over
    HTTP: the service answers with the trainer's own probabilities."""
    import socket
    import time

    import httpx
    import torch
    import uvicorn

    from service.app import create_app
    from service.settings import Settings
    from training.data import load_splits
    from training.publish import SERVER_TOKENS_ENV, TOKEN_ENV, probe, publish_http
    from training.trainer import train
    from tests.training.conftest import tiny_config

    (tmp_path / "store").mkdir()
    app = create_app(Settings(store=tmp_path / "store", backbone=tiny_dir, admin_tokens="adm1n", inference_tokens="r3ad",
                              device="cpu", dtype="float32"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        give_up = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < give_up, "server did not start"
            time.sleep(0.02)
        monkeypatch.delenv(TOKEN_ENV, raising=False)  # the probe before training finds a missing or wrong token
        monkeypatch.delenv(SERVER_TOKENS_ENV, raising=False)
        with pytest.raises(PublishError, match=r"refused the token \(401: .*\); pass --token or set ADAPTSERVE_ADMIN_TOKEN"):
            probe(url)
        with pytest.raises(PublishError, match=r"refused the token \(401: .*\); check the admin token \(it came from --token\)"):
            probe(url, "wrong")
        probe(url, "adm1n")
        with pytest.raises(PublishError, match=r"the token from --token may classify and read tasks but not publish them \(its scope is "
                           r"'inference', GET /v1/token\); pass an admin token .* with --token or ADAPTSERVE_ADMIN_TOKEN"):
            probe(url, "r3ad")  # a read-only token: found before training, not at the upload after it
        from training.cli import main

        capsys.readouterr()
        assert main(["--task", "t", "--method", "head", "--data", str(csvs["train"]), "--dev", str(csvs["dev"]),
                     "--backbone", str(tiny_dir), "--epochs", "1", "--no-progress", "--publish", url, "--token", "r3ad"]) == 1
        err = capsys.readouterr().err
        assert "not publish them" in err and "(checked before training)" in err and "epoch 1" not in err
        monkeypatch.setenv(SERVER_TOKENS_ENV, " ,adm1n, other")  # the server's own list: its first token
        probe(url)
        monkeypatch.setenv(TOKEN_ENV, "wrong")  # the trainer's own variable comes first
        with pytest.raises(PublishError, match="check the admin token \\(it came from ADAPTSERVE_ADMIN_TOKEN\\)"):
            probe(url)
        monkeypatch.delenv(TOKEN_ENV)
        monkeypatch.delenv(SERVER_TOKENS_ENV)
        result = train(load_splits(csvs["train"], csvs["dev"]), tiny_config("lora"), name="via-http", backbone=tiny,
                       progress=False)
        with pytest.raises(PublishError, match="not authorised"):
            publish_http(result, url, token="wrong")
        sent = publish_http(result, url, token="adm1n")
        assert sent.response["active"] is True
        again = publish_http(result, url, token="adm1n")  # what a timed-out upload's message calls safe
        assert (again.version, again.response["created"], again.response["active"]) == (sent.version, False, True)
        texts = ["good movie", "the plot was boring"]
        resp = httpx.post(f"{url}/v1/tasks/via-http/classify", json={"inputs": texts},
                          headers={"Authorization": "Bearer adm1n"}, timeout=30)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["version"] == sent.version
        served = torch.tensor([[p["scores"][lab] for lab in ("neg", "pos")] for p in body["predictions"]])
        torch.testing.assert_close(served, result.logits(texts).softmax(-1), atol=1e-5, rtol=0)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("how", ["store", "http", "zeroshot store", "zeroshot http"])
def test_weights_with_nan_or_inf_are_never_published(how, tiny, csvs, tmp_path, stand):
    """Every tensor of a bundle is checked when the service loads it, so NaN / Inf weights would be an
    active version that never loads: refused before anything is written or sent."""
    import torch

    from training.data import load_splits
    from training.publish import publish_http, save_to_store
    from training.trainer import train
    from training.zeroshot import description_task, publish_zeroshot_http, save_zeroshot
    from tests.training.conftest import tiny_config

    if how.startswith("zeroshot"):
        made = description_task("zs", "neg=a bad movie;pos=a good movie", tiny, max_length=24)
        tensor = made.weights["head"].out_w
        publish = {"zeroshot store": lambda: save_zeroshot(made, tmp_path / "store"),
                   "zeroshot http": lambda: publish_zeroshot_http(made, stand.url)}[how]
    else:
        made = train(load_splits(csvs["train"], csvs["dev"]), tiny_config("lora", max_steps=1), name="t", backbone=tiny,
                     progress=False)
        tensor = made.weights["head"].tensors()["head.out.weight"]
        publish = {"store": lambda: save_to_store(made, tmp_path / "store"),
                   "http": lambda: publish_http(made, stand.url)}[how]
    with torch.no_grad():
        tensor[0, 0] = float("inf")
    with pytest.raises(PublishError, match=r"was not published: its weights hold NaN or Inf \(head\.out\.weight\)"):
        publish()
    assert not (tmp_path / "store").exists() and stand.requests == []


def test_a_bundle_the_service_would_not_load_is_never_written_to_a_store(tiny, csvs, tmp_path):
    """A store write has no server to refuse it: the bundle is read back as the service reads it
    first, and a version that would not load is not published (nor made active)."""
    from training.data import load_splits
    from training.publish import require_loadable, save_to_store
    from training.trainer import train
    from tests.training.conftest import tiny_config

    result = train(load_splits(csvs["train"], csvs["dev"]), tiny_config("head", max_steps=1), name="t", backbone=tiny,
                   progress=False)
    require_loadable(result.name, result.bundle_config(), result.weights, result.engine.backbone)  # as trained: fine
    bad = {**result.bundle_config(), "labels": ["a", "b", "c"]}  # the head has two outputs
    with pytest.raises(PublishError, match=r"would not load in the service \(.*head has 2 outputs but 3 labels.*nothing was published"):
        require_loadable(result.name, bad, result.weights, result.engine.backbone)
    result.bundle_config = lambda: bad  # type: ignore[method-assign]
    with pytest.raises(PublishError, match="would not load"):
        save_to_store(result, tmp_path / "store")
    assert not (tmp_path / "store" / "t").exists()


def _one_step_head(tiny, csvs):
    from training.data import load_splits
    from training.trainer import train
    from tests.training.conftest import tiny_config

    return train(load_splits(csvs["train"], csvs["dev"]), tiny_config("head", max_steps=1), name="t", backbone=tiny,
                 progress=False)


@pytest.mark.parametrize("case", ["new store", "empty store", "second version"])
def test_a_failed_activation_leaves_nothing_half_written_in_the_store(case, tiny, csvs, tmp_path, monkeypatch):
    """`ACTIVE` is replaced last; if that fails (root passes any mode bit, so the replace itself is
    made to fail), its temporary file and the new version go, and the task serves what it did. A
    store this publish made (and the folder above it it made) goes too; one that was there stays."""
    import errno
    import os

    import torch

    from training.publish import save_to_store

    result = _one_step_head(tiny, csvs)
    store = tmp_path / "new" / "store" if case == "new store" else tmp_path / "store"
    before = history = None
    if case == "empty store":
        store.mkdir()
    if case == "second version":
        before = save_to_store(result, store)
        history = (store / "t" / "HISTORY.json").read_text()
        with torch.no_grad():  # other weights: another version
            result.weights["head"].tensors()["head.out.weight"].add_(0.01)
    real = os.replace

    def refuse_active(src, dst, *args, **kwargs):
        if Path(dst).name == "ACTIVE":
            raise PermissionError(errno.EACCES, "Permission denied", str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse_active)
    with pytest.raises(OSError, match=r"cannot make t@\w+ active \(.*ACTIVE: Permission denied\); the store was left") as err:
        save_to_store(result, store)
    assert f"t@{before} " not in str(err.value)  # a new version was written, and then removed
    if case == "new store":
        assert os.listdir(tmp_path) == []  # no empty store, nor the folder made to hold it
    elif case == "empty store":
        assert os.listdir(store) == []
    else:
        assert sorted(p.name for p in (store / "t").iterdir()) == sorted(["ACTIVE", "HISTORY.json", before])
        assert (store / "t" / "ACTIVE").read_text() == before + "\n"
        assert (store / "t" / "HISTORY.json").read_text() == history  # no activation recorded


def test_a_failed_bundle_write_into_a_new_store_leaves_no_store_behind(tiny, csvs, tmp_path, monkeypatch):
    """A full disk at the bundle's write: the task directory went already (write_bundle_files); the
    store directory the publish made for it goes too."""
    import errno
    import os

    import service.engine.bundle as bundle
    from training.publish import save_to_store

    result = _one_step_head(tiny, csvs)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle.os, "fsync", full)
    with pytest.raises(OSError, match=r"cannot write the bundle .*/store/t/\w+: No space left on device"):
        save_to_store(result, tmp_path / "store")
    assert os.listdir(tmp_path) == []


def test_the_token_loses_a_secret_files_newline_and_nothing_else(monkeypatch):
    from training.publish import SERVER_TOKENS_ENV, TOKEN_ENV, _bearer

    monkeypatch.delenv(SERVER_TOKENS_ENV, raising=False)
    monkeypatch.setenv(TOKEN_ENV, "adm-secret\n")
    assert _bearer(None) == ("adm-secret", {"Authorization": "Bearer adm-secret"}, TOKEN_ENV)
    monkeypatch.setenv(TOKEN_ENV, "adm\x01secret")
    with pytest.raises(PublishError, match=f"{TOKEN_ENV}: the admin token holds a space, a control"):
        _bearer(None)
    assert _bearer(" t0k ") == ("t0k", {"Authorization": "Bearer t0k"}, "--token")
    monkeypatch.delenv(TOKEN_ENV)
    monkeypatch.setenv(SERVER_TOKENS_ENV, " ,adm1n, other")  # beside the server: its own first admin token
    assert _bearer(None) == ("adm1n", {"Authorization": "Bearer adm1n"}, SERVER_TOKENS_ENV)


@pytest.mark.parametrize("status", [404, 403, 502])
def test_the_probe_needs_the_v1_routes_to_answer_too(status):
    """A proxy that answers /healthz but refuses or misroutes /v1 used to pass the probe: only a
    401 there counted, and the upload then failed after training."""

    class Half(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            code, body = (200, b'{"status": "ok"}') if self.path == "/healthz" else (status, b"<html>no</html>")
            self.send_response(code)
            self.send_header("Content-Type", "application/json" if code == 200 else "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    with _stand_in(Half) as url:
        with pytest.raises(PublishError, match=rf"GET /v1/tasks answered {status} \(.*an HTML page.*\); the upload goes to /v1"):
            probe(url, "t")


def test_the_probe_says_when_the_server_cannot_tell_the_tokens_scope(caplog):
    """A server of a release before GET /v1/token answers it 404: the probe passes (an admin token
    publishes as before), and says that a read-only token would be found only at the upload."""

    class Earlier(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            code, body = {"/healthz": (200, b'{"status": "ok"}'), "/v1/tasks": (200, b'{"tasks": []}')}.get(
                self.path, (404, b'{"error": "not found", "error_type": "not_found"}'))
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    with _stand_in(Earlier) as url, caplog.at_level("WARNING", logger="training.publish"):
        probe(url, "t")
    assert "has no GET /v1/token (an earlier adaptserve release)" in caplog.text
    assert "known only at the upload, after training" in caplog.text


def test_upload_to_nothing_listening_keeps_the_bundle_and_says_how_to_send_it():
    """The upload comes after the training: a service that went down mid-run used to cost the run."""
    import re
    import shutil
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PublishError) as err:
        upload(f"http://127.0.0.1:{port}/", "sst2", CFG, WTS, token="t", timeout=5)
    message = str(err.value)
    assert message.startswith(f"cannot reach http://127.0.0.1:{port}") and "\n" not in message
    kept = Path(re.search(r"the bundle is kept in (\S+):", message).group(1))
    try:
        assert (kept / CONFIG).read_bytes() == CFG and (kept / WEIGHTS).read_bytes() == WTS
        assert f"-F {CONFIG}=@{kept / CONFIG} -F {WEIGHTS}=@{kept / WEIGHTS} http://127.0.0.1:{port}/v1/tasks/sst2/versions" in message
    finally:
        shutil.rmtree(kept)


def test_store_publishes_are_in_the_history_a_rollback_goes_by(tiny, csvs, tmp_path):
    """Two `--store` publishes, then the service's rollback goes back to the first. Only `ACTIVE`
    was written, so the service's history never heard of the first version: the versions listing
    had no history and no `rollback_to`, and a rollback answered 409 "no earlier version"."""
    import torch
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.engine.engine import Engine
    from service.settings import Settings
    from tests.service.api.harness import wait_ready
    from training.publish import save_to_store

    result = _one_step_head(tiny, csvs)
    store = tmp_path / "store"
    first = save_to_store(result, store)
    with torch.no_grad():  # other weights: another version
        result.weights["head"].tensors()["head.out.weight"].add_(0.01)
    second = save_to_store(result, store)
    assert save_to_store(result, store) == second  # the same bundle again: nothing new to record
    auth = {"Authorization": "Bearer adm1n"}
    app = create_app(Settings(store=store, admin_tokens="adm1n", max_wait_ms=1.0), engine=Engine(tiny))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        listing = client.get("/v1/tasks/t/versions", headers=auth).json()
        assert listing["active"] == second and listing["rollback_to"] == first
        assert [(h["action"], h["version"], h["from"]) for h in listing["history"]] == [
            ("upload", first, None), ("activate", first, None), ("upload", second, first), ("activate", second, first)]
        assert {v["version"]: v["source"] for v in listing["versions"]} == {first: "store", second: "store"}
        assert all(v["problem"] is None for v in listing["versions"])  # the recorded sizes are the stored ones
        resp = client.post("/v1/tasks/t/rollback", headers=auth)
        assert resp.status_code == 200, resp.text
        assert resp.json()["active"] == first == client.post("/v1/tasks/t/classify", json={"inputs": ["good"]},
                                                              headers=auth).json()["version"]


def test_an_upload_left_unanswered_says_it_may_be_stored_how_to_check_and_that_a_resend_is_safe(stand):
    """A timeout after the whole upload was sent used to read like any failure ("no answer within
    N s; ... send it with curl"): nothing said the server may have stored and activated it."""
    import re
    import shutil

    stand.answer_after_s = 3.0
    with pytest.raises(PublishError) as err:
        upload(stand.url, "sst2", CFG, WTS, token="t", timeout=0.3)
    message, version = str(err.value), content_version(CFG, WTS)
    assert len(stand.requests) == 1 and "\n" not in message  # it was sent, in full
    assert f"the server may have stored (and activated) sst2@{version} anyway" in message
    assert f"check with curl -H 'Authorization: Bearer <token>' {stand.url}/v1/tasks/sst2/versions (is {version}" in message
    assert "sending it again is safe, since the version id is the content hash" in message
    kept = Path(re.search(r"The bundle is kept in (\S+);", message).group(1))
    try:
        assert (kept / CONFIG).read_bytes() == CFG and (kept / WEIGHTS).read_bytes() == WTS
    finally:
        shutil.rmtree(kept)


def test_the_curl_command_for_a_kept_bundle_survives_a_space_in_its_path(tmp_path, monkeypatch):
    """The command is meant to be pasted into a shell: a temporary folder under a path with a
    space (TMPDIR) split it into words curl could not read."""
    import shlex
    import socket
    import tempfile

    (tmp_path / "my tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "my tmp"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PublishError) as err:
        upload(f"http://127.0.0.1:{port}", "sst2", CFG, WTS, token="t", timeout=5)
    words = shlex.split(str(err.value).split("send it with ", 1)[1])
    assert words[:4] == ["curl", "--fail-with-body", "-H", "Authorization: Bearer <admin token>"]
    parts = dict(w.split("=@", 1) for w in words[5:8:2])
    assert Path(parts[CONFIG]).read_bytes() == CFG and Path(parts[WEIGHTS]).read_bytes() == WTS
    assert words[8:] == [f"http://127.0.0.1:{port}/v1/tasks/sst2/versions"]
