"""The app under a real uvicorn on a free loopback port, spoken to over real HTTP and sockets."""
from __future__ import annotations

import gc
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.server import uvicorn_config
from service.settings import Settings
from tests.fakes import FakeEngine, write_task
from tests.service.api.harness import server_timing


class Served(NamedTuple):
    url: str
    app: FastAPI
    engine: FakeEngine


def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path)


def _serve(tmp_path: Path, log_level: str = "warning", **settings) -> Iterator[Served]:
    write_task(tmp_path, "sentiment", "v1")
    engine = FakeEngine()
    config = Settings(store=tmp_path, **{"max_body_bytes": 4096, "max_batch_size": 1, **settings})
    app = create_app(config, engine=engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, config, log_level=log_level))  # as `adaptserve serve` runs it
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    eventually(ready, timeout_s=10)
    yield Served(url, app, engine)
    if engine.gate is not None:
        engine.gate.set()
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_the_access_log_never_writes_a_token_sent_in_the_query(tmp_path: Path) -> None:
    # uvicorn's access logger does not propagate: listen on it directly, as its own handler writes.
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    access = logging.getLogger("uvicorn.access")
    serving = _serve(tmp_path, log_level="info", admin_tokens="admin-secret-7d1c", inference_tokens="reader-secret-52aa")
    served = next(serving)
    access.addHandler(handler)
    try:
        got = httpx.get(f"{served.url}/v1/tasks?access_token=reader-secret-52aa&limit=5&API_KEY=k-9f2e")
        assert got.status_code == 401
        # A configured token is masked under any name, with none, percent-encoded, and in the path.
        for path in ("/v1/tasks?t=admin-secret-7d1c&limit=5", "/v1/tasks?admin-secret-7d1c",
                     "/v1/tasks?q=admin%2Dsecret%2D7d1c", "/v1/tasks/admin-secret-7d1c/versions"):
            assert httpx.get(f"{served.url}{path}").status_code == 401
        eventually(lambda: sum("/v1/tasks" in line for line in lines) == 5)
    finally:
        access.removeHandler(handler)
        next(serving, None)
    assert not [line for line in lines if "secret" in line or "k-9f2e" in line]
    assert sorted(line.split('"')[1] for line in lines if "/v1/tasks" in line) == [
        "GET /v1/tasks/***/versions HTTP/1.1", "GET /v1/tasks?*** HTTP/1.1", "GET /v1/tasks?*** HTTP/1.1",
        "GET /v1/tasks?access_token=***&limit=5&API_KEY=*** HTTP/1.1", "GET /v1/tasks?t=***&limit=5 HTTP/1.1"]


@pytest.mark.parametrize(("path", "logged"), [
    # a name is judged as the server decodes it: percent-encoding one of its letters kept the token
    ("/v1/tasks?tok%65n=s-1&limit=5", "/v1/tasks?tok%65n=***&limit=5"),
    ("/v1/tasks?%61ccess_token=s-2", "/v1/tasks?%61ccess_token=***"),
    ("/v1/tasks?jwt=s-3&Bearer=s-4", "/v1/tasks?jwt=***&Bearer=***"),
    ("/v1/tasks?access_token=s-5&limit=5&API_KEY=s-6", "/v1/tasks?access_token=***&limit=5&API_KEY=***"),
    ("/v1/tasks?limit=5&token", "/v1/tasks?limit=5&token"),
])
def test_the_access_log_masks_credentials_by_their_decoded_name(path: str, logged: str) -> None:
    from service.server import RedactQueryCredentials

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", path, "1.1", 401), None)
    assert RedactQueryCredentials().filter(record)
    assert record.getMessage() == f'127.0.0.1:5000 - "GET {logged} HTTP/1.1" 401'


def test_real_server_round_trip(served: Served) -> None:
    with httpx.Client(base_url=served.url) as client:
        response = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["hello"]})
        assert response.status_code == 200 and response.json()["predictions"][0]["version"] == "v1"
        too_big = client.post("/v1/tasks/sentiment/classify", content=b"x" * 10_000, headers={"content-type": "application/json"})
        assert too_big.status_code == 413 and too_big.json()["error_type"] == "payload_too_large"
        assert 'adaptserve_requests_total{status="200",task="sentiment"} 1.0' in client.get("/metrics").text


def test_server_timing_is_finer_than_the_event_loops_clock(served: Served) -> None:
    """uvloop's loop.time() counts whole milliseconds: spans timed with it would all be integers and
    could add up to more than the total."""
    with httpx.Client(base_url=served.url) as client:
        timings = [client.post("/v1/tasks/sentiment/classify", json={"inputs": ["hello"]}).headers["server-timing"]
                   for _ in range(5)]
    spans = [{name: ms for name, (ms, _) in server_timing(t).items()} for t in timings]
    assert any(not span["total"].is_integer() for span in spans), timings
    for span in spans:
        assert span["task"] + span["tokenize"] + span["queue"] + span["forward"] <= span["total"] + 0.3  # rounding


def test_a_closed_connection_drops_the_request_before_its_forward(served: Served) -> None:
    engine, state = served.engine, served.app.state.service
    with httpx.Client(base_url=served.url, timeout=10) as client:
        client.post("/v1/tasks/sentiment/classify", json={"inputs": ["warm"]})  # load the task first
        engine.gate = threading.Event()
        engine.in_forward.clear()
        first: list[httpx.Response] = []
        holder = threading.Thread(
            target=lambda: first.append(client.post("/v1/tasks/sentiment/classify", json={"inputs": ["first"]}))
        )
        holder.start()
        eventually(engine.in_forward.is_set)

        body = b'{"inputs": ["gone"]}'
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(
                b"POST /v1/tasks/sentiment/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            eventually(lambda: state.runtime.scheduler.queue_depth == 1)
        # The socket is closed: uvicorn reports http.disconnect and the route cancels its work.
        eventually(lambda: 'status="499"' in client.get("/metrics").text)
        engine.gate.set()
        holder.join(timeout=10)
        assert first[0].status_code == 200
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["after"]}).status_code == 200
    assert "gone" not in engine.seen_texts()


def test_a_client_gone_mid_body_is_counted_as_a_499_not_a_500(served: Served) -> None:
    """The body limit reads a classify body before the route and answers nobody when its client
    leaves half-way: the metrics counted that as a 500 (the server's fault) for alerts to fire on."""
    host, port = served.url.removeprefix("http://").split(":")
    for task in ("sentiment", "no-such-task"):
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(f"POST /v1/tasks/{task}/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                        "Content-Length: 100\r\n\r\n".encode() + b'{"inputs": [')
    with httpx.Client(base_url=served.url) as client:
        eventually(lambda: client.get("/metrics").text.count('adaptserve_requests_total{status="499"') == 2)
        text = client.get("/metrics").text
    assert 'adaptserve_requests_total{status="499",task="sentiment"} 1.0' in text
    assert 'adaptserve_requests_total{status="499",task="_unknown"} 1.0' in text
    assert 'status="500"' not in text


@pytest.mark.parametrize("route", ["classify", "upload"])
def test_a_client_gone_mid_body_is_a_499_logged_at_info_without_a_traceback(served: Served, route: str, caplog) -> None:
    """As `timeout 2 curl --limit-rate 20k -F ...` does: the body stops half-way and the socket closes.
    A classify body is read whole before the route: a client gone then was counted a 500."""
    caplog.set_level(logging.INFO)
    if route == "classify":
        path, media, length, first_part = "/v1/tasks/sentiment/classify", "application/json", 4000, b'{"inputs": ["a'
    else:
        boundary = "adaptserve-test-boundary"
        path, media, length = "/v1/tasks/sentiment/versions", f"multipart/form-data; boundary={boundary}", 200000
        first_part = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"; filename=\"w.st\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode() + b"\0" * 20_000
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {media}\r\nContent-Length: {length}\r\n\r\n".encode()
            + first_part
        )
    eventually(lambda: any("client_closed_request" in record.getMessage() for record in caplog.records))
    closed = [record for record in caplog.records if "client_closed_request" in record.getMessage()]
    assert [(record.levelname, record.name) for record in closed] == [("INFO", "service.api.errors")]
    assert f"POST {path} -> 499" in closed[0].getMessage()
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    with httpx.Client(base_url=served.url) as client:  # the server is none the worse
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["hello"]}).status_code == 200
        if route == "classify":  # request metrics count classify requests only
            metrics = client.get("/metrics").text
            assert 'adaptserve_requests_total{status="499",task="sentiment"} 1.0' in metrics
            assert 'status="500"' not in metrics


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[Served]:
    """A server that waits at most 0.5 s for the next piece of a body, with one upload slot."""
    yield from _serve(tmp_path, body_read_timeout_s=0.5, max_concurrent_uploads=1)


def _send_head(url: str, head: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    raw = socket.create_connection((host, int(port)), timeout=10)
    raw.sendall(head)
    return raw


def _read_response(raw: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := raw.recv(65536):  # the server closes the connection after a 408
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("route", ["classify", "upload"])
def test_a_body_that_stops_arriving_gets_408_and_frees_the_upload_slot(impatient: Served, route: str) -> None:
    if route == "classify":
        head = (b"POST /v1/tasks/sentiment/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"inputs\": [")
    else:
        head = (b"POST /v1/tasks/sentiment/versions HTTP/1.1\r\nHost: test\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
    started = time.monotonic()
    with _send_head(impatient.url, head) as raw:
        status, body = _read_response(raw)
    assert status == 408 and b"request_timeout" in body and b"stopped arriving" in body
    assert time.monotonic() - started < 5
    with httpx.Client(base_url=impatient.url) as client:
        # the slot is free again: a (bad) upload gets its own answer, not 429
        upload = client.post("/v1/tasks/sentiment/versions", files={"x.dat": ("x.dat", b"junk")})
        assert upload.status_code == 422, upload.text
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["hi"]}).status_code == 200
        if route == "classify":  # request metrics count classify requests only
            assert 'adaptserve_requests_total{status="408",task="sentiment"} 1.0' in client.get("/metrics").text


def test_a_slow_body_that_keeps_coming_is_read(impatient: Served) -> None:
    body = b'{"inputs": ["slow but steady"]}'
    head = (b"POST /v1/tasks/sentiment/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
    with _send_head(impatient.url, head) as raw:
        for i in range(0, len(body), 8):  # 4 pieces 0.3 s apart: 0.9 s in all, each gap under 0.5 s
            time.sleep(0.3)
            raw.sendall(body[i : i + 8])
        status, answer = _read_response(raw)
    assert status == 200, answer


@pytest.fixture
def strict_heads(tmp_path: Path) -> Iterator[Served]:
    """A server that gives each request 0.5 s to finish its line and headers."""
    yield from _serve(tmp_path, header_read_timeout_s=0.5)


HEAD = b"POST /v1/tasks/sentiment/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"


def _request(close: bool = True) -> bytes:
    body = b'{"inputs": ["hi"]}'
    return HEAD + b"Content-Length: %d\r\n" % len(body) + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body


def test_headers_that_never_finish_get_408_and_the_connection_closed(strict_heads: Served) -> None:
    started = time.monotonic()
    with _send_head(strict_heads.url, HEAD) as raw:  # a slowloris: the blank line never comes
        status, body = _read_response(raw)
    assert status == 408 and b"request_timeout" in body and b"headers not complete within 0.5 s" in body
    assert time.monotonic() - started < 5


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(strict_heads: Served) -> None:
    with _send_head(strict_heads.url, b"") as raw:
        assert raw.recv(65536) == b""  # closed, no unsolicited 408 for a request never made


def test_a_kept_alive_connection_gets_the_same_deadline_for_its_next_request(strict_heads: Served) -> None:
    with _send_head(strict_heads.url, _request(close=False)) as raw:
        data = b""
        while b"predictions" not in data:
            data += raw.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")
        raw.sendall(HEAD)  # the second request stalls in its headers
        status, body = _read_response(raw)
    assert status == 408 and b"request_timeout" in body


def test_a_stray_crlf_after_an_answer_does_not_hold_the_connection_open(strict_heads: Served) -> None:
    """A bare CRLF begins no request but stops uvicorn's idle timer; the head deadline still runs."""
    with _send_head(strict_heads.url, _request(close=False)) as raw:
        data = b""
        while b"predictions" not in data:
            data += raw.recv(65536)
        started = time.monotonic()
        raw.sendall(b"\r\n")
        assert raw.recv(65536) == b""  # closed, silently: no request had begun
    assert time.monotonic() - started < 5


def test_a_pipelined_head_that_stalls_waits_for_the_answer_before_it(strict_heads: Served) -> None:
    """HTTP answers go in order: the request in flight is answered first, then the connection
    closes; a 408 sent ahead would read as the answer to that request."""
    # a forward that outlasts the 0.5 s head deadline
    _assert_answered_then_closed(_behind_a_slow_request(strict_heads.url, 1.0, b"GET /healthz HTTP/1.1\r\nHo"))


def _behind_a_slow_request(url: str, seconds: float, after: bytes) -> bytes:
    """Everything the server sends on a connection that pipelines `after` behind a classify whose
    forward takes `seconds`, until it closes."""
    body = b'{"inputs": ["sleep:%g"]}' % seconds
    with _send_head(url, HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body + after) as raw:
        data = b""
        while chunk := raw.recv(65536):
            data += chunk
    return data


def _assert_answered_then_closed(data: bytes) -> None:
    """The classify in flight got its answer, and nothing else came before the close."""
    assert data.startswith(b"HTTP/1.1 200") and b"predictions" in data
    assert data.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize("head", ["one huge header", "many headers", "a huge request line"])
def test_a_head_over_the_size_cap_gets_431(tmp_path: Path, head: str) -> None:
    served = next(_serve(tmp_path, max_header_bytes=4096))
    filler = {"one huge header": b"X-Big: " + b"a" * 8000 + b"\r\n",
              "many headers": b"".join(b"X-%d: v\r\n" % i for i in range(1000)),
              "a huge request line": b""}[head]
    line = b"GET /healthz?" + b"q" * 8000 + b" HTTP/1.1\r\n" if head == "a huge request line" else b"GET /healthz HTTP/1.1\r\n"
    with _send_head(served.url, b"") as raw:
        for i in range(0, len(line + filler), 1000):  # in pieces, as a client streaming it would
            raw.sendall((line + filler)[i:i + 1000])
        status, body = _read_response(raw)
    assert status == 431 and b"headers_too_large" in body and b"over 4096 bytes" in body
    with httpx.Client(base_url=served.url) as client:
        assert client.get("/healthz", headers={"X-Fine": "v" * 2000}).status_code == 200  # under the cap


@pytest.fixture
def small_heads(tmp_path: Path) -> Iterator[Served]:
    """A server that takes heads of at most 1024 bytes."""
    yield from _serve(tmp_path, max_header_bytes=1024)


def _head_of(size: int) -> bytes:
    """A GET head of exactly `size` bytes."""
    start, end = b"GET /healthz HTTP/1.1\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("size, status", [(1024, 200), (1025, 431), (60_000, 431)])
def test_the_head_cap_holds_whatever_the_packets(small_heads: Served, size: int, status: int) -> None:
    with _send_head(small_heads.url, _head_of(size)) as raw:  # one write: the head completes in one read
        assert _read_response(raw)[0] == status


def test_a_pipelined_head_is_not_charged_for_the_body_before_it(small_heads: Served, caplog) -> None:
    """A read holding a request's 3 KB body and the start of the next head must not count the body
    against the next head's 1 KiB. (uvicorn itself does not answer a request pipelined behind a
    POST, so the test reads the server's log, not a second answer.)"""
    caplog.set_level(logging.INFO, logger="service.server")
    body = b'{"inputs": ["' + b"a" * 3000 + b'"]}'
    with _send_head(small_heads.url, HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
                    + b"GET /healthz HTTP/1.1\r\nHost: t\r\n") as raw:
        assert raw.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
    assert "over 1024 bytes" not in caplog.text


def test_trailers_count_against_the_head_cap(small_heads: Served) -> None:
    """A chunked body's trailer fields are never kept; past the cap the connection is dropped."""
    chunk = b'{"inputs": ["good"]}'
    head = HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + b"%x\r\n" % len(chunk) + chunk + b"\r\n0\r\n"
    with _send_head(small_heads.url, head + b"X-T: small\r\n\r\n") as raw:
        assert _read_response(raw)[0] == 200  # a few trailer bytes: fine
    with _send_head(small_heads.url, head) as raw:
        try:
            for _ in range(100):
                raw.sendall(b"X-T: " + b"a" * 100 + b"\r\n")
            received = raw.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            received = b""
    assert received == b""  # closed, unanswered: the client is treated as gone
    with httpx.Client(base_url=small_heads.url) as client:
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["fine"]}).status_code == 200


def test_an_oversized_head_behind_a_request_in_flight_closes_after_its_answer(small_heads: Served) -> None:
    body = b'{"inputs": ["sleep:0.5"]}'
    slow = HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
    with _send_head(small_heads.url, slow + b"GET /healthz HTTP/1.1\r\n") as raw:
        for _ in range(20):
            raw.sendall(b"X-A: " + b"a" * 100 + b"\r\n")
        data = b""
        while chunk := raw.recv(65536):  # a clean end (FIN), not a reset
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize(("request_bytes", "reason"), [
    (b"get /healthz HTTP/1.1\r\nHost: test\r\n\r\n", "Invalid method encountered"),
    (HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n{}", "Duplicate Content-Length"),
    (b"CONNECT test:443 HTTP/1.1\r\nHost: test\r\n\r\n", "invalid url"),  # uvicorn's callback fails on it
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "Invalid character in chunk size"),  # in the body
], ids=["lowercase method", "two lengths", "CONNECT", "bad chunk"])
def test_a_malformed_request_gets_400_in_the_error_format_and_no_warning(served: Served, request_bytes: bytes,
                                                                       reason: str) -> None:
    # uvicorn answered these in plain text ("Invalid HTTP request received.") with a WARNING each
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(handler)  # it does not propagate
    try:
        with _send_head(served.url, request_bytes) as raw:
            status, body = _read_response(raw)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert status == 400, body
    answer = json.loads(body)
    assert answer["error_type"] == "bad_request" and answer["error"].startswith("malformed HTTP request: ")
    assert reason in answer["error"] and not warnings


def test_a_malformed_chunk_is_counted_as_the_400_it_got_not_a_499(served: Served) -> None:
    """The server answers a malformed chunk in the body the app is reading and closes: the app saw
    its client gone and the metrics counted a 499 (client gone) for a request told 400."""
    upload = b"POST /v1/tasks/sentiment/versions HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    for head in (HEAD, upload):
        with _send_head(served.url, head + b"Transfer-Encoding: chunked\r\n\r\n5\r\n--b\r\n\r\nzz\r\n") as raw:
            assert _read_response(raw)[0] == 400
    with httpx.Client(base_url=served.url) as client:
        eventually(lambda: "adaptserve_admin_actions_total{" in client.get("/metrics").text)
        text = client.get("/metrics").text
    assert 'adaptserve_requests_total{status="400",task="sentiment"} 1.0' in text
    assert 'adaptserve_admin_actions_total{action="upload",outcome="invalid"} 1.0' in text
    assert 'status="499"' not in text and "client_gone" not in text


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[Served]:
    """A server that takes heads of at most 1024 bytes, each within 0.5 s."""
    yield from _serve(tmp_path, max_header_bytes=1024, header_read_timeout_s=0.5)


TRAILERS = HEAD + CHUNKED + b"\r\n2\r\n{}\r\n0\r\nX-T: " + b"a" * 2000 + b"\r\nX-U: b\r\n"  # a field is parsed once the next begins


@pytest.mark.parametrize(("sent", "status", "reason"), [
    (_head_of(2000), 431, "headers_too_large"),
    (TRAILERS, None, "headers_too_large"),  # a body's trailer fields over the cap: dropped unanswered
    (b"get /healthz HTTP/1.1\r\nHost: test\r\n\r\n", 400, "malformed"),  # the request line
    (HEAD + b"Content-Length: 12a\r\n\r\n", 400, "malformed"),
    (HEAD + CHUNKED + b"\r\nzz\r\n", 400, "malformed"),  # in the body the app is reading
    (HEAD, 408, "header_timeout"),  # a slowloris: the blank line never comes
    (b"", None, None),  # nothing sent: no request, closed silently and not counted
], ids=["head over the cap", "trailers over the cap", "bad request line", "bad Content-Length", "bad chunk",
        "head too slow", "nothing sent"])
def test_each_request_the_server_refuses_is_counted_by_its_reason(strict: Served, sent: bytes, status: int | None,
                                                                    reason: str | None) -> None:
    """The server answers (or drops) these before the app sees them, or instead of it: nothing counted them."""
    with _send_head(strict.url, sent) as raw:
        data = b""
        try:
            while chunk := raw.recv(65536):
                data += chunk
        except ConnectionResetError:  # trailers: closed with the client's bytes unread
            pass
    assert (int(data.split()[1]) if data else None) == status, data[:200]
    counts = {r: 1.0 if r == reason else 0.0 for r in ("headers_too_large", "malformed", "header_timeout")}
    with httpx.Client(base_url=strict.url) as client:
        eventually(lambda: all(f'adaptserve_connection_refusals_total{{reason="{r}"}} {n}' in client.get("/metrics").text
                               for r, n in counts.items()))


def test_a_head_refused_before_bytes_the_parser_rejects_is_answered_once(strict: Served, caplog) -> None:
    """The parser reads on past a refused head's callbacks: a bad byte later in the same read made
    a second refusal, whose answer (written after the first's end) raised a traceback logged as an
    ERROR, and which counted the request twice."""
    caplog.set_level(logging.INFO)
    sent = b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 2000 + b"\r\nX-B: b\r\n\x01bad\r\n\r\n"
    with _send_head(strict.url, sent) as raw:
        assert _read_response(raw)[0] == 431
    with httpx.Client(base_url=strict.url) as client:
        eventually(lambda: 'adaptserve_connection_refusals_total{reason="headers_too_large"} 1.0' in client.get("/metrics").text)
        assert 'adaptserve_connection_refusals_total{reason="malformed"} 0.0' in client.get("/metrics").text
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
    assert len([record for record in caplog.records if "closed the connection" in record.getMessage()]) == 1


@pytest.mark.parametrize("route", ["classify", "upload"])
def test_a_malformed_chunk_is_logged_as_the_servers_400_not_a_client_gone(served: Served, route: str, caplog) -> None:
    """The app learns of the server's 400 as its client gone: it logged `-> 499 client_closed_request`
    for a client that had not left, sending an operator after the wrong problem."""
    caplog.set_level(logging.INFO)
    path = "/v1/tasks/sentiment/classify" if route == "classify" else "/v1/tasks/sentiment/versions"
    head = (b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: " % path.encode()
            + (b"application/json" if route == "classify" else b"multipart/form-data; boundary=b") + b"\r\n")
    with _send_head(served.url, head + CHUNKED + b"\r\n5\r\n--b\r\n\r\nzz\r\n") as raw:
        assert _read_response(raw)[0] == 400
    eventually(lambda: any(record.name == "service.api.errors" for record in caplog.records))
    (line,) = [record.getMessage() for record in caplog.records if record.name == "service.api.errors"]
    assert line.startswith(f"POST {path} -> 400 bad_request: malformed HTTP request: Invalid character in chunk size")
    assert "answered by the server" in line and "-> 499" not in caplog.text and "client_closed_request" not in caplog.text


def test_an_upgrade_to_http2_is_ignored_without_a_warning(served: Served) -> None:
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:  # as `curl --http2 http://...` sends every request
        with _send_head(served.url, b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings, close\r\n"
                                    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n") as raw:
            status, body = _read_response(raw)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert not warnings


def test_a_malformed_request_behind_one_in_flight_waits_for_its_answer(served: Served) -> None:
    """A pipelined request the parser rejects: the request before it is answered, then the
    connection closes (uvicorn wrote its 400 at once, read as that request's answer, and the close
    cut the real one off)."""
    _assert_answered_then_closed(_behind_a_slow_request(served.url, 0.5, b"get /healthz HTTP/1.1\r\nHost: test\r\n\r\n"))


def test_headers_that_arrive_slowly_but_in_time_are_served(strict_heads: Served) -> None:
    request = _request()
    with _send_head(strict_heads.url, b"") as raw:
        for i in range(0, len(request), len(request) // 3 + 1):  # 3 pieces 0.1 s apart
            raw.sendall(request[i : i + len(request) // 3 + 1])
            time.sleep(0.1)
        status, answer = _read_response(raw)
    assert status == 200, answer


def test_trailing_slashes_are_served_not_redirected(served: Served) -> None:
    with httpx.Client(base_url=served.url) as client:
        answer = client.post("/v1/tasks/sentiment/classify/", json={"inputs": ["hello"]})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["version"] == "v1"
        assert client.get("/v1/tasks/").status_code == 200
        # an encoded '..' is a version name (refused), never a redirect a client would resolve to another route
        dots = client.delete("/v1/tasks/sentiment/versions/%2e%2e/")
        assert dots.status_code in (404, 422) and "location" not in dots.headers
        assert client.get("/v1/tasks/sentiment").status_code == 200
        assert client.get("/v1/tasks/sentiment//", headers={"host": "evil.example"}).status_code == 200


def test_a_classify_body_that_is_not_json_by_its_type_is_415_and_says_so(served: Served) -> None:
    with httpx.Client(base_url=served.url) as client:
        body = b'{"inputs": ["hello"]}'
        for media in ("text/plain", "application/x-www-form-urlencoded"):
            answer = client.post("/v1/tasks/sentiment/classify", content=body, headers={"content-type": media})
            assert answer.status_code == 415, answer.text
            assert answer.json()["error_type"] == "unsupported_media_type" and "application/json" in answer.json()["error"]
        for media in ("application/json; charset=utf-8", "application/vnd.api+json", None):  # JSON, or untyped: read
            headers = {"content-type": media} if media else {}
            answer = client.post("/v1/tasks/sentiment/classify", content=body, headers=headers)
            assert answer.status_code == 200, (media, answer.text)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Served]:
    """A server that takes classify requests with the inference token `good` only."""
    yield from _serve(tmp_path, inference_tokens="good")



MEGABYTE = b"x" * 1_000_000
GOOD_CHUNKS = b"%x\r\n%s\r\n0\r\n\r\n" % (len(MEGABYTE), MEGABYTE)


@pytest.mark.parametrize(("status", "headers", "body"), [
    (401, b"Authorization: Bearer wrong\r\nContent-Type: application/json\r\n" + CHUNKED, GOOD_CHUNKS),
    (413, b"Authorization: Bearer good\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n", MEGABYTE),
    (415, b"Authorization: Bearer good\r\nContent-Type: text/plain\r\n" + CHUNKED, GOOD_CHUNKS),
    (400, b"Authorization: Bearer good\r\nContent-Type: application/json\r\n" + CHUNKED, b"zz\r\n" + MEGABYTE),
], ids=["bad token", "too large", "not JSON", "malformed chunk"])
def test_a_refusal_before_the_body_is_read_reaches_a_client_still_sending_it(guarded: Served, status: int,
                                                                             headers: bytes, body: bytes) -> None:
    """Refused before its body was read, on a connection that ends after the answer, a request's
    body still coming was met by a reset (the server closed with its bytes unread): a client that
    sends its whole body before it reads lost the answer. The close lingers: the answer, then a
    clean end."""
    head = b"POST /v1/tasks/sentiment/classify HTTP/1.1\r\nHost: test\r\nConnection: close\r\n" + headers + b"\r\n"
    with _send_head(guarded.url, head) as raw:
        time.sleep(0.2)  # the answer is written (and, unfixed, the connection closed) before the body comes
        raw.sendall(body)
        answered, answer = _read_response(raw)  # to the end: a reset raises
    assert answered == status, answer
    assert json.loads(answer)["error_type"] == {401: "unauthorized", 413: "payload_too_large",
                                                415: "unsupported_media_type", 400: "bad_request"}[status]


def test_a_refused_body_that_never_ends_is_cut_off(guarded: Served) -> None:
    """The lingering close reads (and drops) what still comes for a bounded time only."""
    head = (b"POST /v1/tasks/sentiment/classify HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            b"Authorization: Bearer good\r\nContent-Type: text/plain\r\n" + CHUNKED + b"\r\n")
    with _send_head(guarded.url, head) as raw:
        assert raw.recv(65536).startswith(b"HTTP/1.1 415")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            give_up = time.monotonic() + 60  # LINGER_S is 2 s: this only stops a test that would hang
            while time.monotonic() < give_up:
                raw.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")


def test_a_file_sent_as_a_plain_form_field_is_told_how_to_send_it(served: Served) -> None:
    with httpx.Client(base_url=served.url) as client:  # curl -F 'bundle=<file' sends the bytes without a filename
        answer = client.post("/v1/tasks/sentiment/versions", files={"bundle": (None, b"x" * 5000)})
        assert answer.status_code == 400, answer.text
        assert "send each file as a file part with a filename" in answer.json()["error"]
        long = client.post("/v1/tasks/" + "A" * 5000 + "/classify", json={"inputs": ["x"]})
        assert long.status_code == 422 and len(long.text) < 600


def test_a_served_request_leaves_no_reference_cycle(served: Served) -> None:
    # Each request's objects (its cycle, scope, FastAPI's exit stacks) must go by reference counting
    # when it ends. Cycles among them waited for a full collection, which under load came every few
    # seconds and stopped the event loop and the forward thread for 20-50 ms (docs/reliability.md).
    gc.collect()
    gc.disable()
    try:
        for text in ("one", "two", "three", "four"):
            with httpx.Client(base_url=served.url) as client:  # a connection of its own, closed after
                assert client.post("/v1/tasks/sentiment/classify", json={"inputs": [text]}).status_code == 200
        time.sleep(0.2)  # the last request's task ends just after its answer
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection would free goes to gc.garbage instead
        gc.collect()
        cyclic = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not cyclic & {"RequestResponseCycle", "_AnswerTransport", "AsyncExitStack"}
