"""Pure ASGI middleware: trailing slashes, the request body's size and read-timeout limits,
and per-task request metrics.

Pure ASGI (not BaseHTTPMiddleware) so neither adds a task per request nor hides the
`http.disconnect` message that the classify route listens for.
"""
from __future__ import annotations

import asyncio
import json
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import SERVER_ANSWER, adaptserve_error_response, error_response
from service.auth import Scope as Grant
from service.auth import Tokens, authorization, check
from service.errors import AdaptserveError, BodyTimeout, ClientDisconnected, PayloadTooLarge
from service.metrics import UNKNOWN_TASK
from service.state import ServiceState

# No trailing slash: TrailingSlashMiddleware, the outermost, strips it before these see the path.
CLASSIFY_PATH = re.compile(r"^/v1/tasks/(?P<task>[^/]+)/classify$")
CHARSET = re.compile(rb"charset\s*=\s*\"?([^\";\s]+)", re.IGNORECASE)
UPLOAD_PATH = re.compile(r"^/v1/tasks/[^/]+/versions$")


class TrailingSlashMiddleware:
    """`/v1/tasks/x/classify/` is `/v1/tasks/x/classify`: the path is served without its trailing
    slashes instead of redirected. A redirect (Starlette's default) answered before the token
    check, built its Location from the Host header, and, with an encoded `%2e%2e/` in the path,
    sent clients that resolve `..` to another route (a version's DELETE became the task's)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
            raw = scope.get("raw_path")
            if raw:
                scope["raw_path"] = raw.rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over its limit, judged by Content-Length and by the bytes actually read;
    408 for a body that stops arriving (no piece of it for `read_timeout_s`).

    JSON bodies (limit `max_bytes`) are read here in full and replayed to the app, so an over-long
    chunked body is refused before any of it is parsed. Uploads (POST .../versions, limit
    `upload_max_bytes`) are far larger: they stream through to the route, which checks the
    caller's token before reading them, and the count stops them at the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int | None = None,
                 read_timeout_s: float | None = None, tokens: Tokens | None = None) -> None:
        self.app = app
        self.tokens = tokens  # checked before a classify body is read (the route checks again)
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes if upload_max_bytes is not None else max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope.get("method") == "POST" and UPLOAD_PATH.match(scope.get("path", "")) is not None
        limit = self.upload_max_bytes if upload else self.max_bytes
        # A repeated header: the first, as the app reads it (Starlette's `Headers.get`). The last,
        # as a dict keeps it, let `text/plain` then `application/json` past the check below to a
        # route that read the body as text, and a puzzling 422.
        headers = dict(reversed(scope["headers"]))
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                await error_response(400, "invalid Content-Length header", "bad_request")(scope, receive, send)
                return
            if declared_bytes > limit:
                await self._too_large(scope, receive, send, limit)
                return
        if upload:
            await self.app(scope, _counting(receive, limit, self.read_timeout_s), send)
            return
        classify = scope.get("method") == "POST" and CLASSIFY_PATH.match(scope.get("path", "")) is not None
        if classify:
            if self.tokens is not None:  # nobody without a token gets a body of theirs read and buffered
                try:
                    check(self.tokens, authorization([v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"]),
                          Grant.inference)
                except AdaptserveError as err:
                    await _answer(scope, receive, send, err)
                    return
            media, _, params = headers.get(b"content-type", b"").partition(b";")
            media = media.strip().lower()
            charset = CHARSET.search(params)
            # Content-Encoding is a list, which repeated headers extend (RFC 9110 5.3)
            coding = b", ".join(v for k, v in scope["headers"] if k == b"content-encoding").strip().lower()
            compressed = any(c.strip() not in (b"", b"identity") for c in coding.split(b","))
            refusal = None
            if media and not (media == b"application/json" or media.endswith(b"+json")):
                refusal = (f"a classify body is JSON: send it with Content-Type: application/json, "
                           f"not {media[:60].decode('latin-1')!r}")
            elif charset is not None and charset.group(1).lower() not in (b"utf-8", b"utf8"):
                refusal = _not_utf8(charset.group(1)[:30].decode("latin-1"))
            elif compressed:
                refusal = f"a classify body is sent uncompressed, not with Content-Encoding {coding[:30].decode('latin-1')!r}"
            if refusal is not None:
                accept = {"Accept-Encoding": "identity"} if compressed else None  # RFC 7694
                await error_response(415, refusal, "unsupported_media_type", accept)(scope, receive, send)
                return
            if not media:  # untyped: the body is JSON by the API's contract, so read it as such
                scope = dict(scope, headers=[*scope["headers"], (b"content-type", b"application/json")])
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await _within(receive, self.read_timeout_s)
            except asyncio.TimeoutError:
                await _answer(scope, receive, send, _stalled(self.read_timeout_s, size))
                return
            if message["type"] == "http.disconnect":
                # The client left mid-body. Nobody reads the answer, but the request metrics and the
                # log count it as what it is, a 499, as they do a client that leaves later (with no
                # answer at all, the metrics counted a server error, 500).
                await _answer(scope, receive, send, ClientDisconnected(
                    f"client disconnected after {size} bytes of its request body"))
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, self.max_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # JSON is UTF-8 (RFC 8259 8.1), but the JSON reader takes a body whose first bytes hold zeros
        # for UTF-16 or UTF-32 (RFC 4627's guess) and read it so: refused as its charset is. (A
        # UTF-8 byte order mark, which RFC 8259 lets a reader ignore, is read.)
        if classify and (encoding := json.detect_encoding(body)) not in ("utf-8", "utf-8-sig"):
            await error_response(415, _not_utf8(encoding), "unsupported_media_type")(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for http.disconnect as usual

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_response(
            413, f"request body larger than {limit} bytes", "payload_too_large", {"Connection": "close"}
        )
        await response(scope, receive, send)


def _not_utf8(encoding: str) -> str:
    return f"a classify body is UTF-8 JSON, not {encoding}: encode it as UTF-8"


async def _answer(scope: Scope, receive: Receive, send: Send, err: AdaptserveError) -> None:
    """Answer `err` as the app's error handlers would (the routes, and with them the handlers, are
    inside this middleware)."""
    await adaptserve_error_response(scope, err)(scope, receive, send)


def _counting(receive: Receive, limit: int, timeout_s: float | None = None) -> Receive:
    """`receive` that raises PayloadTooLarge (413 via the error handlers) once the body passes
    `limit`, and BodyTimeout (408) when the next piece of the body takes over `timeout_s`."""
    size, done = 0, False

    async def counted() -> Message:
        nonlocal size, done
        if done:  # the body is in: what follows is the wait for http.disconnect, which has no limit
            return await receive()
        try:
            message = await _within(receive, timeout_s)
        except asyncio.TimeoutError:
            raise _stalled(timeout_s, size) from None
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise PayloadTooLarge(f"request body larger than {limit} bytes")
            done = not message.get("more_body", False)
        return message

    return counted


_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11: no task per call, unlike wait_for


async def _within(receive: Receive, timeout_s: float | None) -> Message:
    """`receive()`, or asyncio.TimeoutError after `timeout_s` (None: no limit)."""
    if timeout_s is None:
        return await receive()
    if _timeout is not None:
        async with _timeout(timeout_s):
            return await receive()
    return await asyncio.wait_for(receive(), timeout_s)


def _stalled(timeout_s: float | None, size: int) -> BodyTimeout:
    return BodyTimeout(f"the request body stopped arriving: nothing for {timeout_s:g} s after {size} bytes "
                       "(ADAPTSERVE_BODY_READ_TIMEOUT_S); send the whole body without pausing")


# The admin routes (service.api.admin), as `adaptserve_admin_actions_total` names their actions.
ADMIN_ACTIONS = (
    ("POST", UPLOAD_PATH, "upload"),
    ("POST", re.compile(r"^/v1/tasks/[^/]+/versions/[^/]+/activate$"), "activate"),
    ("POST", re.compile(r"^/v1/tasks/[^/]+/rollback$"), "rollback"),
    ("DELETE", re.compile(r"^/v1/tasks/[^/]+/versions/[^/]+$"), "delete_version"),
    ("DELETE", re.compile(r"^/v1/tasks/[^/]+$"), "delete_task"),
)


def _admin_action(method: str, path: str) -> str | None:
    return next((action for m, pattern, action in ADMIN_ACTIONS if m == method and pattern.match(path)), None)


class RequestMetricsMiddleware:
    """Counts classify requests by task name and status and times them, and admin requests by
    action and outcome, whatever answered them (route, validation, body limit, token check, error
    handler). A client gone mid-body gets its 499 from the body limit (`BodyLimitMiddleware`), as
    one gone later gets it from the route: a request nothing answered is a failure, a 500. A
    request the server answered itself (`SERVER_ANSWER`) counts as that answer."""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        match = CLASSIFY_PATH.match(path)
        action = None if match is not None else _admin_action(scope.get("method", ""), path)
        if match is None and action is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts, the request failed

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            status = scope.get("extensions", {}).get(SERVER_ANSWER, {}).get("status", status)
            if action is not None:
                self.state.metrics.observe_admin(action, status)
            else:
                assert match is not None
                name = match["task"]
                # Only names that exist in the store become labels: clients cannot add series. A
                # method the route does not serve (405) never reached the task: no series of its own.
                reached = scope.get("method") == "POST" and self.state.registry.known(name)
                label = name if reached else UNKNOWN_TASK
                self.state.metrics.observe_request(label, status, time.perf_counter() - started)
