"""Every way a client can get a request wrong, and the status and error_type it gets back.

Nothing a client sends may produce a 500; every error body has the same two fields.
"""
from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

CLASSIFY = "/v1/tasks/sentiment/classify"
NLI = "/v1/tasks/nli/classify"
JSON = {"content-type": "application/json"}

CASES: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    # id, method, path, request kwargs, status, error_type
    ("unknown task", "POST", "/v1/tasks/nope/classify", {"json": {"inputs": ["x"]}}, 404, "task_not_found"),
    ("unsafe task name", "POST", "/v1/tasks/Bad!/classify", {"json": {"inputs": ["x"]}}, 422, "invalid_task_name"),
    ("dot-dot task name", "POST", "/v1/tasks/%2E%2E/classify", {"json": {"inputs": ["x"]}}, 422, "invalid_task_name"),
    ("task info unknown", "GET", "/v1/tasks/nope", {}, 404, "task_not_found"),
    ("task info unsafe", "GET", "/v1/tasks/UPPER", {}, 422, "invalid_task_name"),
    ("empty inputs", "POST", CLASSIFY, {"json": {"inputs": []}}, 422, "validation_error"),
    ("missing inputs", "POST", CLASSIFY, {"json": {}}, 422, "validation_error"),
    ("inputs not a list", "POST", CLASSIFY, {"json": {"inputs": "text"}}, 422, "validation_error"),
    ("input is a number", "POST", CLASSIFY, {"json": {"inputs": [3]}}, 422, "validation_error"),
    ("input is null", "POST", CLASSIFY, {"json": {"inputs": [None]}}, 422, "validation_error"),
    ("triple instead of pair", "POST", NLI, {"json": {"inputs": [["a", "b", "c"]]}}, 422, "validation_error"),
    ("one-element pair", "POST", NLI, {"json": {"inputs": [["a"]]}}, 422, "validation_error"),
    ("unknown field", "POST", CLASSIFY, {"json": {"inputs": ["x"], "input": ["x"]}}, 422, "validation_error"),
    ("zero timeout", "POST", CLASSIFY, {"json": {"inputs": ["x"], "timeout_ms": 0}}, 422, "validation_error"),
    ("negative timeout", "POST", CLASSIFY, {"json": {"inputs": ["x"], "timeout_ms": -5}}, 422, "validation_error"),
    ("timeout not a number", "POST", CLASSIFY, {"json": {"inputs": ["x"], "timeout_ms": "soon"}}, 422, "validation_error"),
    ("timeout a numeric string", "POST", CLASSIFY, {"json": {"inputs": ["x"], "timeout_ms": "100"}}, 422, "validation_error"),
    ("timeout true (not 1 ms)", "POST", CLASSIFY, {"json": {"inputs": ["x"], "timeout_ms": True}}, 422, "validation_error"),
    ("timeout beyond any integer", "POST", CLASSIFY, {"json": {"inputs": ["x"], "timeout_ms": 1e308}}, 422, "validation_error"),
    ("timeout a fraction of a ms", "POST", CLASSIFY, {"json": {"inputs": ["x"], "timeout_ms": 1000.5}}, 422, "validation_error"),
    ("body is a list", "POST", CLASSIFY, {"json": ["x"]}, 422, "validation_error"),
    ("no body", "POST", CLASSIFY, {}, 422, "validation_error"),
    ("lone surrogate", "POST", CLASSIFY, {"content": b'{"inputs": ["\\ud800"]}', "headers": JSON}, 422, "validation_error"),
    ("not JSON", "POST", CLASSIFY, {"content": b"{inputs: [", "headers": JSON}, 400, "bad_request"),
    ("JSON typed as plain text", "POST", CLASSIFY, {"content": b'{"inputs": ["x"]}', "headers": {"content-type": "text/plain"}},
     415, "unsupported_media_type"),
    ("typed twice, plain text first", "POST", CLASSIFY,  # the app reads the first: so must the check
     {"content": b'{"inputs": ["x"]}', "headers": [("content-type", "text/plain"), ("content-type", "application/json")]},
     415, "unsupported_media_type"),
    ("compressed, then said identity", "POST", CLASSIFY,
     {"content": b'{"inputs": ["x"]}', "headers": [*JSON.items(), ("content-encoding", "gzip"), ("content-encoding", "identity")]},
     415, "unsupported_media_type"),
    ("pair for a single-text task", "POST", CLASSIFY, {"json": {"inputs": [["a", "b"]]}}, 422, "invalid_input"),
    ("string for a pair task", "POST", NLI, {"json": {"inputs": [["a", "b"], "c"]}}, 422, "invalid_input"),
    ("too many inputs", "POST", CLASSIFY, {"json": {"inputs": ["x"] * 5}}, 413, "payload_too_large"),
    ("over-long text", "POST", CLASSIFY, {"json": {"inputs": ["ok", "x" * 51]}}, 413, "payload_too_large"),
    ("over-long second text", "POST", NLI, {"json": {"inputs": [["ok", "x" * 51]]}}, 413, "payload_too_large"),
    ("body over the limit", "POST", CLASSIFY, {"json": {"inputs": ["x" * 5000]}}, 413, "payload_too_large"),
    ("chunked body over the limit", "POST", CLASSIFY, {"content": iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]), "headers": JSON}, 413, "payload_too_large"),
    ("bundle is not JSON", "POST", "/v1/tasks/broken/classify", {"json": {"inputs": ["x"]}}, 503, "task_unavailable"),
    ("no active version", "POST", "/v1/tasks/ambiguous/classify", {"json": {"inputs": ["x"]}}, 503, "task_unavailable"),
    ("task info of a broken bundle", "GET", "/v1/tasks/broken", {}, 503, "task_unavailable"),
    ("a bundle the engine trips on", "POST", "/v1/tasks/buggy/classify", {"json": {"inputs": ["x"]}}, 503, "task_unavailable"),
    ("task info of a bundle the engine trips on", "GET", "/v1/tasks/buggy", {}, 503, "task_unavailable"),
    ("unknown route", "GET", "/v2/whatever", {}, 404, "not_found"),
    ("wrong method", "GET", CLASSIFY, {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(
    "method, path, kwargs, status, error_type", [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_bad_request(client: TestClient, method: str, path: str, kwargs: dict, status: int, error_type: str) -> None:
    response = client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == error_type
    assert body["error"]


@pytest.mark.parametrize("content, headers, status, fragment", [
    (b'{"inputs": ["caf\xe9"]}', JSON, 400, "cannot be read as JSON: it is not UTF-8 (byte 0xe9 at offset 16)"),
    (b'{"inputs": ' + b"[" * 2000 + b"]" * 2000 + b"}", JSON, 400, "nests arrays or objects too deeply"),
    ('{"inputs": ["x"]}'.encode("utf-16"), {"content-type": "application/json; charset=utf-16"}, 415,
     "UTF-8 JSON, not utf-16"),
    # JSON is UTF-8 (RFC 8259): UTF-16 or UTF-32 is refused whether a charset names it or not
    ('{"inputs": ["x"]}'.encode("utf-16"), JSON, 415, "UTF-8 JSON, not utf-16: encode it as UTF-8"),
    ('{"inputs": ["x"]}'.encode("utf-16-le"), {}, 415, "UTF-8 JSON, not utf-16-le"),
    ('{"inputs": ["x"]}'.encode("utf-32"), JSON, 415, "UTF-8 JSON, not utf-32"),
    (b'{"inputs": ["x"]}', {"content-type": 'application/json; charset="UTF-8"'}, 200, None),
    ('{"inputs": ["x"]}'.encode("utf-8-sig"), JSON, 200, None),  # a UTF-8 byte order mark, which a reader may ignore
    (b"\x1f\x8b...", {**JSON, "content-encoding": "gzip"}, 415, "sent uncompressed, not with Content-Encoding 'gzip'"),
])
def test_a_body_that_cannot_be_read_says_why(client: TestClient, content: bytes, headers: dict, status: int,
                                             fragment: str | None) -> None:
    response = client.post(CLASSIFY, content=content, headers=headers)
    assert response.status_code == status, response.text
    if fragment is not None:
        assert fragment in response.json()["error"]
    if "content-encoding" in headers:
        assert response.headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("method, path, allowed", [
    ("OPTIONS", "/v1/tasks/sentiment", "DELETE, GET, HEAD"),  # two routes share the path
    ("PUT", "/v1/tasks/sentiment/versions", "GET, HEAD, POST"),
    ("POST", "/v1/tasks", "GET, HEAD"),
    ("POST", "/metrics", "GET, HEAD"),
    ("GET", CLASSIFY, "POST"),
])
def test_a_405_allows_every_method_the_path_serves(client: TestClient, method: str, path: str, allowed: str) -> None:
    response = client.request(method, path)
    assert (response.status_code, response.headers["allow"]) == (405, allowed)
    for other in {"GET", "HEAD"} & set(allowed.split(", ")):  # the harmless ones it names are served
        assert client.request(other, path).status_code == 200


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        (CLASSIFY, {"inputs": [["a", "b"]]}, "task 'sentiment' classifies single texts: inputs[0] must be a string"),
        (NLI, {"inputs": [["a", "b"], "c"]}, "task 'nli' classifies text pairs: inputs[1] must be [text, text_pair]"),
        (CLASSIFY, {"inputs": ["x"] * 5}, "5 inputs in one request; the limit is 4"),
        (CLASSIFY, {"inputs": ["ok", "x" * 51]}, "inputs[1] has 51 characters; the limit is 50"),
        (NLI, {"inputs": [["a", "b"], ["ok", "x" * 51]]}, "inputs[1][1] (the text pair) has 51 characters; the limit is 50"),
        (CLASSIFY, {"inputs": []}, "body.inputs"),
        ("/v1/tasks/ambiguous/classify", {"inputs": ["x"]}, "no ACTIVE file"),
        ("/v1/tasks/broken/classify", {"inputs": ["x"]}, "cannot read adapter_config.json"),
    ],
)
def test_error_messages_say_what_to_fix(client: TestClient, path: str, body: dict, fragment: str) -> None:
    assert fragment in client.post(path, json=body).json()["error"]


def test_an_unknown_key_is_named_shortened_not_sent_back_whole(client: TestClient) -> None:
    # Within the body limit, a key can be megabytes long: the message named it whole, once per problem.
    keys = [f"{i}" + "k" * 600 for i in range(4)]
    response = client.post(CLASSIFY, json={"inputs": ["x"], **dict.fromkeys(keys, 1)})
    assert response.status_code == 422, response.text
    message = response.json()["error"]
    assert message.count("Extra inputs are not permitted") == 4 and len(message) < 800, message
    assert f"body.{keys[0][:60]}... (601 characters): Extra inputs are not permitted" in message


@pytest.mark.parametrize("method, path", [("POST", "/v1/tasks/buggy/classify"), ("GET", "/v1/tasks/buggy")])
def test_a_task_whose_load_raises_fails_alone_with_its_traceback_logged_once(client: TestClient, caplog, method: str,
                                                                              path: str) -> None:
    """The fake engine raises a plain ValueError loading `buggy` (what a malformed config can
    provoke in a parser): that task is unavailable, not the server broken."""
    response = client.request(method, path, json={"inputs": ["x"]} if method == "POST" else None)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "task buggy@v1 cannot be loaded: ValueError: a bug in the engine"
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert [record.levelname for record in tracebacks] == ["WARNING"]
    assert not any("unhandled error" in record.message for record in caplog.records)
    assert client.post(CLASSIFY, json={"inputs": ["fine"]}).status_code == 200  # the others keep serving


def test_a_genuine_bug_is_a_logged_500_with_the_same_body_shape(client: TestClient, caplog, monkeypatch) -> None:
    async def broken_listing() -> list:
        raise RuntimeError("a bug in the registry")

    monkeypatch.setattr(client.app.state.service.registry, "list_tasks", broken_listing)
    response = client.get("/v1/tasks")
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error", "error_type": "internal_error"}
    assert any("unhandled error" in record.message for record in caplog.records)


def test_a_failing_forward_is_inference_failed(client: TestClient) -> None:
    response = client.post(CLASSIFY, json={"inputs": ["boom"]})
    assert response.status_code == 500 and response.json()["error_type"] == "inference_failed"
    assert client.post(CLASSIFY, json={"inputs": ["fine"]}).status_code == 200  # the server survived


def test_a_number_past_pythons_digit_limit_is_named() -> None:
    """Over 4300 digits, int() refuses (CPython's guard against quadratic conversions); the test
    app's 4 KiB body limit is too small to send one, so the message is checked on the error."""
    from service.api.errors import _unreadable

    with pytest.raises(ValueError) as err:
        int("9" * 5000)
    assert _unreadable(err.value) == "it holds an integer of more than 4300 digits"


def test_a_client_cannot_flood_the_warning_log(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    """timeout_ms: 1 (a 504 of the client's own choosing) logs at INFO; a broken task answering
    every request with one 503 is a WARNING once, not once per request."""
    import logging

    from service.api import errors

    errors._LAST_LOGGED.clear()
    caplog.set_level(logging.INFO, logger="service.api.errors")
    statuses = [client.post(CLASSIFY, json={"inputs": ["x"], "timeout_ms": 1}).status_code for _ in range(5)]
    statuses += [client.post("/v1/tasks/broken/classify", json={"inputs": ["x"]}).status_code for _ in range(5)]
    assert statuses.count(503) == 5 and 504 in statuses
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.api.errors" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "broken" in warnings[0], warnings


VERSION_FORM = "(not a valid version id: use 1-128 characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit)"


@pytest.mark.parametrize("method, route", [("POST", "/v1/tasks/sentiment/versions/{}/activate"),
                                           ("DELETE", "/v1/tasks/sentiment/versions/{}")], ids=["activate", "delete"])
@pytest.mark.parametrize("version, shown, well_formed", [
    ("%2e%2e", "'..'", False),
    ("-x", "'-x'", False),
    (".hidden", "'.hidden'", False),
    ("a%20b", "'a b'", False),
    ("v" * 129, repr("v" * 80 + "..."), False),  # too long, and shown cut short
    ("ZZZ", "'ZZZ'", True),  # the form allows hand-made ids (`v3`): this one is simply not stored
    ("0123456789abcdef", "'0123456789abcdef'", True),
])
def test_a_version_id_is_judged_by_its_form_in_one_place(client: TestClient, method: str, route: str, version: str,
                                                          shown: str, well_formed: bool) -> None:
    response = client.request(method, route.format(version))
    assert (response.status_code, response.json()["error_type"]) == (404, "version_not_found"), response.text
    expected = f"task 'sentiment' has no version {shown}" + ("" if well_formed else f" {VERSION_FORM}")
    assert response.json()["error"] == expected
