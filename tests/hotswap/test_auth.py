"""Bearer tokens: admin routes need an admin token, read routes an inference (or admin) token,
probes need none; tokens never reach the logs; no tokens at all, or k8s/base/secrets.env.example's
CHANGE-ME placeholders, is a loud warning."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.app import create_app
from service.auth import Scope, Tokens, check, warn_if_disabled
from service.errors import Forbidden, Unauthorized
from service.settings import Settings
from tests.hotswap.bundles import files, make_bundle
from tests.hotswap.conftest import ADMIN, AUTH_ADMIN, AUTH_READER, READER
from tests.service.api.harness import wait_ready

ADMIN_ROUTES = [
    ("POST", "/v1/tasks/sentiment/versions"),
    ("POST", "/v1/tasks/sentiment/versions/0123456789abcdef/activate"),
    ("POST", "/v1/tasks/sentiment/rollback"),
    ("DELETE", "/v1/tasks/sentiment/versions/0123456789abcdef"),
    ("DELETE", "/v1/tasks/sentiment"),
]
READ_ROUTES = [
    ("POST", "/v1/tasks/sentiment/classify"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/tasks/sentiment"),
    ("GET", "/v1/tasks/sentiment/versions"),
    ("GET", "/v1/token"),
]
BAD_HEADERS = {
    "missing": {},
    "not bearer": {"Authorization": f"Basic {ADMIN}"},
    "empty bearer": {"Authorization": "Bearer "},
    "two words": {"Authorization": f"Bearer {ADMIN} extra"},
    "wrong token": {"Authorization": "Bearer not-a-configured-token"},
    "admin token prefix": {"Authorization": f"Bearer {ADMIN[:-1]}"},
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, engine, info) -> Iterator[TestClient]:
    """One app for the whole table (the refused calls change nothing, which a test checks)."""
    store = tmp_path_factory.mktemp("auth-store")
    settings = Settings(store=store, admin_tokens=ADMIN, inference_tokens=READER, max_wait_ms=1.0)
    with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as client:
        wait_ready(client)
        response = client.post("/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=1)), headers=AUTH_ADMIN)
        assert response.status_code == 201
        yield client


def _call(client: TestClient, method: str, path: str, headers: dict[str, str]):
    body = {"json": {"inputs": ["fun"]}} if path.endswith("classify") else {}
    return client.request(method, path, headers=headers, **body)


@pytest.mark.parametrize("method, path", ADMIN_ROUTES + READ_ROUTES)
@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_missing_malformed_and_wrong_tokens_are_401(client: TestClient, method: str, path: str, case: str) -> None:
    response = _call(client, method, path, BAD_HEADERS[case])
    assert response.status_code == 401 and response.json()["error_type"] == "unauthorized"
    # RFC 6750 section 3: an error code where a token was sent, none where nothing was
    code = {"missing": None, "not bearer": None, "wrong token": "invalid_token",
            "admin token prefix": "invalid_token"}.get(case, "invalid_request")  # 3.1: another scheme gets no code
    assert response.headers["www-authenticate"] == 'Bearer realm="adaptserve"' + (f', error="{code}"' if code else "")


@pytest.mark.parametrize("method, path", [("POST", "/v1/tasks/sentiment/classify"), ("GET", "/v1/tasks")])
@pytest.mark.parametrize("order", ["valid first", "valid last"])
def test_two_authorization_headers_are_401(client: TestClient, method: str, path: str, order: str) -> None:
    """Whichever one is valid: the middleware and the route would otherwise each read another."""
    good, bad = AUTH_ADMIN["Authorization"], "Bearer not-a-token"
    pair = [("Authorization", good), ("Authorization", bad)][:: 1 if order == "valid first" else -1]
    body = {"json": {"inputs": ["fun"]}} if path.endswith("classify") else {}
    response = client.request(method, path, headers=pair, **body)
    assert response.status_code == 401 and "2 Authorization headers" in response.json()["error"], response.text


@pytest.mark.parametrize("method, path", ADMIN_ROUTES)
def test_an_inference_token_on_admin_routes_is_403(client: TestClient, method: str, path: str) -> None:
    response = _call(client, method, path, AUTH_READER)
    assert response.status_code == 403 and response.json()["error_type"] == "forbidden"
    assert response.headers["www-authenticate"] == 'Bearer realm="adaptserve", error="insufficient_scope"'


def test_the_refused_admin_calls_changed_nothing(client: TestClient) -> None:
    before = client.get("/v1/tasks/sentiment/versions", headers=AUTH_READER).json()
    for method, path in ADMIN_ROUTES:
        for headers in (AUTH_READER, *BAD_HEADERS.values()):
            _call(client, method, path, headers)
    assert client.get("/v1/tasks/sentiment/versions", headers=AUTH_READER).json() == before


@pytest.mark.parametrize("method, path", READ_ROUTES)
@pytest.mark.parametrize("headers", [AUTH_READER, AUTH_ADMIN], ids=["inference", "admin"])
def test_inference_and_admin_tokens_read_and_classify(client: TestClient, method: str, path: str, headers: dict) -> None:
    assert _call(client, method, path, headers).status_code == 200


@pytest.mark.parametrize("path", [path for method, path in READ_ROUTES if method == "GET"] + ["/metrics"])
@pytest.mark.parametrize("headers", [AUTH_READER, {}], ids=["inference", "no token"])
def test_every_get_route_answers_head_as_it_answers_get(client: TestClient, path: str, headers: dict) -> None:
    get, head = client.get(path, headers=headers), client.head(path, headers=headers)
    assert get.status_code == (401 if not headers and path != "/metrics" else 200)
    assert (head.status_code, head.headers["content-type"], head.content) == (get.status_code, get.headers["content-type"], b"")


@pytest.mark.parametrize("headers, scope", [(AUTH_ADMIN, "admin"), (AUTH_READER, "inference")], ids=["admin", "inference"])
def test_the_token_route_says_what_the_token_may_do(client: TestClient, headers: dict, scope: str) -> None:
    """`adaptserve train --publish` asks it before training: a read-only token used to be found
    only when the upload after the training was refused."""
    assert client.get("/v1/token", headers=headers).json() == {"scope": scope, "auth_enabled": True}


@pytest.mark.parametrize("case", ["no token", "bad content type", "not JSON", "over the limit"])
def test_a_classify_body_is_not_read_without_a_token(client: TestClient, case: str) -> None:
    """The token is checked before the body is read, buffered or judged: 401 whatever the body."""
    body = {"no token": b'{"inputs": ["fun"]}', "bad content type": b"fun", "not JSON": b"{inputs",
            "over the limit": b'{"inputs": ["' + b"x" * 10_000_000 + b'"]}'}[case]
    headers = {"content-type": "text/plain" if case == "bad content type" else "application/json"}

    def body_read():  # a streamed body: this runs only when the server pulls it
        read.append(True)
        yield body

    read: list[bool] = []
    response = client.post("/v1/tasks/sentiment/classify", content=body_read(), headers=headers)
    assert response.status_code == 401 and response.json()["error_type"] == "unauthorized", response.text
    assert read == []  # the server never pulled the body


def test_probes_and_metrics_need_no_token(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200


def test_tokens_never_reach_the_logs(make_client, info, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client()
    client.post("/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=2)), headers=AUTH_ADMIN)
    for headers in (AUTH_ADMIN, AUTH_READER, BAD_HEADERS["admin token prefix"], {"Authorization": f"Basic {READER}"}):
        for method, path in ADMIN_ROUTES + READ_ROUTES:
            _call(client, method, path, headers)
    text = caplog.text + "".join(repr(record.args) for record in caplog.records)
    assert "auth enabled" in text  # the capture did see the app's records
    assert ADMIN not in text and READER not in text and ADMIN[:-1] not in text


def test_settings_read_comma_separated_tokens_and_secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "admin-tokens"
    secret.write_text("from-file-1\nfrom-file-2, shared\n")
    monkeypatch.setenv("ADAPTSERVE_ADMIN_TOKENS", " shared , from-env ")
    monkeypatch.setenv("ADAPTSERVE_ADMIN_TOKENS_FILE", str(secret))
    monkeypatch.setenv("ADAPTSERVE_INFERENCE_TOKENS", "reader")
    settings = Settings(store=tmp_path)
    assert [t.get_secret_value() for t in settings.admin_tokens] == ["shared", "from-env", "from-file-1", "from-file-2"]
    assert "from-env" not in repr(settings) and "from-file-1" not in repr(settings)
    tokens = Tokens.from_secrets(settings.admin_tokens, settings.inference_tokens)
    assert "from-env" not in repr(tokens)
    check(tokens, "Bearer from-file-2", Scope.admin)
    check(tokens, "bearer reader", Scope.inference)
    with pytest.raises(Forbidden):
        check(tokens, "Bearer reader", Scope.admin)
    with pytest.raises(Unauthorized):
        check(tokens, "Bearer from-file", Scope.inference)


def test_no_tokens_means_auth_off_and_a_loud_warning(make_client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    client = make_client(admin_tokens="", inference_tokens="")
    assert client.get("/v1/tasks").status_code == 200
    assert client.post("/v1/tasks/sentiment/rollback").status_code == 404  # reached the route: no auth
    assert client.get("/v1/token").json() == {"scope": "admin", "auth_enabled": False}  # anyone may change tasks
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "AUTH IS DISABLED" in r.getMessage()]
    assert len(warnings) == 1


def test_placeholder_tokens_are_warned_about_by_position(caplog: pytest.LogCaptureFixture) -> None:
    """A server started with k8s/base/secrets.env.example's `CHANGE-ME-...` tokens has auth on, with tokens
    anyone who read this repository knows: it used to say only "auth enabled"."""
    caplog.set_level(logging.INFO, logger="service.auth")
    warn_if_disabled(Tokens(admin=(b"real-admin-0123456789", b"CHANGE-ME-admin-token"),
                            inference=(b"change-me-inference-token",)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PLACEHOLDER TOKENS" in warnings[0]
    assert "admin token 2, inference token 1 still start with CHANGE-ME" in warnings[0] and "admin token 1" not in warnings[0]
    assert "admin-token" not in warnings[0] and "real-admin" not in warnings[0]
    caplog.clear()
    warn_if_disabled(Tokens(admin=(b"CHANGE-ME-admin-token",)))
    assert "admin token 1 still starts with CHANGE-ME" in caplog.records[-1].getMessage()


def test_real_tokens_get_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.auth")
    warn_if_disabled(Tokens(admin=(b"real-admin-0123456789",), inference=(b"real-inference-0123456789",)))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("tokens, warning", [
    (Tokens(), "AUTH IS DISABLED"),
    (Tokens(admin=(b"CHANGE-ME-admin-token",)), "PLACEHOLDER TOKENS"),
], ids=["auth off", "placeholder tokens"])
def test_the_auth_warnings_survive_a_quiet_log_level(capsys: pytest.CaptureFixture, tokens: Tokens, warning: str) -> None:
    """--log-level error hides warnings; not these."""
    logger = logging.getLogger("service.auth")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        warn_if_disabled(tokens)
    finally:
        logger.setLevel(level)
    assert warning in capsys.readouterr().err


def test_every_configured_token_is_compared() -> None:
    tokens = Tokens(admin=(b"a" * 20, b"b" * 20), inference=(b"c" * 20,))
    assert tokens.scope_of(b"b" * 20) is Scope.admin
    assert tokens.scope_of(b"c" * 20) is Scope.inference
    assert tokens.scope_of(b"a" * 19) is None
    both = Tokens(admin=(b"t" * 20,), inference=(b"t" * 20,))
    assert both.scope_of(b"t" * 20) is Scope.admin
    assert Tokens.from_secrets([SecretStr("x")], []).enabled and not Tokens().enabled
