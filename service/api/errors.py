"""The one place errors become HTTP responses: `{"error": message, "error_type": type}`.

AdaptserveError carries its own status; FastAPI's validation errors become 422 (400 when the body
is not JSON at all); Starlette's routing errors keep their status. Anything else is a bug: logged
with its traceback and answered with a bare 500.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from service.errors import AdaptserveError, ClientDisconnected, DeadlineExceeded

log = logging.getLogger(__name__)

# The scope extension in which the server (`service.server`) records an answer it wrote itself to a
# request the app is serving (`status`, `error_type`, `error`): a malformed chunk in the body the app
# is reading gets the server's 400, and the app sees its client gone. The server adds the (empty)
# dict before the app gets the scope, so that every copy of the scope shares it.
SERVER_ANSWER = "adaptserve.server_answer"

_HTTP_ERROR_TYPES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
# Problems listed in a validation error message: a body with 64 bad inputs should not produce a
# 64-line message (upload problems are listed in full under "problems").
_MAX_LISTED_PROBLEMS = 5
# A field name a message repeats: a client's unknown key can be as long as the body (megabytes), and
# was sent back whole, once per problem listed.
_MAX_SHOWN_NAME_CHARS = 60


def error_response(
    status: int, message: str, error_type: str, headers: dict[str, str] | None = None, extra: dict | None = None
) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type, **(extra or {})}, status_code=status, headers=headers)


async def _adaptserve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AdaptserveError)
    return adaptserve_error_response(request.scope, exc)


def adaptserve_error_response(scope: Scope, exc: AdaptserveError) -> JSONResponse:
    """`exc` as its response to the request of `scope`, logged as the handler logs it (middleware
    that answers before the routes, and so before the handlers, uses this too)."""
    line = ("%s %s -> %d %s: %s", scope["method"], scope["path"], exc.status_code, exc.error_type, exc.message)
    answered = scope.get("extensions", {}).get(SERVER_ANSWER, {})
    if isinstance(exc, ClientDisconnected) and "status" in answered:
        # The client is not gone: the server answered it and ended the request, which is how the app
        # learnt of it. Logged as that answer (nobody reads this one: the server's went out).
        log.info("%s %s -> %d %s: %s (answered by the server)", scope["method"], scope["path"], answered["status"],
                 answered["error_type"], answered["error"])
    elif isinstance(exc, (ClientDisconnected, DeadlineExceeded)):
        # Routine, and the client's own choice (it went away, or asked for timeout_ms: 1): a line at
        # INFO, never a WARNING per request that any client could flood the log with.
        log.info(*line)
    elif exc.status_code >= 500 and _first_in_a_while(exc.error_type, exc.message):
        log.warning(*line)  # a broken task answers every request with one message: it is logged once a minute
    return error_response(exc.status_code, exc.message, exc.error_type, exc.headers, exc.body())


_LAST_LOGGED: dict[tuple[str, str], float] = {}
_REPEAT_S = 60.0


def _first_in_a_while(error_type: str, message: str) -> bool:
    """True once per `_REPEAT_S` for each distinct (error type, message)."""
    now = time.monotonic()
    key = (error_type, message)
    if now - _LAST_LOGGED.get(key, float("-inf")) < _REPEAT_S:
        return False
    if len(_LAST_LOGGED) > 1024:  # messages name tasks and versions: keep the table bounded
        _LAST_LOGGED.clear()
    _LAST_LOGGED[key] = now
    return True


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = list(exc.errors())
    for problem in problems:
        if problem.get("type") == "json_invalid":
            detail = (problem.get("ctx") or {}).get("error", "")
            return error_response(400, f"request body is not valid JSON: {detail}".rstrip(": "), "bad_request")
    lines = [_describe(problem) for problem in problems[:_MAX_LISTED_PROBLEMS]]
    if len(problems) > _MAX_LISTED_PROBLEMS:
        lines.append(f"and {len(problems) - _MAX_LISTED_PROBLEMS} more problems")
    return error_response(422, "; ".join(lines) or "invalid request", "validation_error")


def _describe(problem: dict) -> str:
    """`body.inputs.0: Input should be a valid string`, with pydantic's own wording."""
    where = ".".join(_shown(str(part)) for part in problem.get("loc", ()))
    message = str(problem.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _shown(name: str) -> str:
    return name if len(name) <= _MAX_SHOWN_NAME_CHARS else f"{name[:_MAX_SHOWN_NAME_CHARS]}... ({len(name)} characters)"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    detail = str(exc.detail)
    if exc.status_code == 400 and exc.__cause__ is not None and detail == _FASTAPI_BODY_ERROR:
        detail = f"request body cannot be read as JSON: {_unreadable(exc.__cause__)}"
    return error_response(exc.status_code, detail, error_type, headers)


# What FastAPI says when reading a JSON body raised anything but a JSON syntax error.
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


def _unreadable(cause: BaseException) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
    if isinstance(cause, RecursionError):
        return "it nests arrays or objects too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "it holds an integer of more than 4300 digits"
    return f"{type(cause).__name__}: {str(cause)[:200]}"


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: Starlette's 405 names only the first route
    that matched the path (`GET /v1/tasks/{task}` but not `DELETE`, nor a `HEAD` beside it)."""
    scope = {**request.scope, "method": "GET"}
    methods = {m for route in _routes(request.app.router.routes) if route.matches(scope)[0] is not Match.NONE
               for m in route.methods or ()}
    return ", ".join(sorted(methods))


def _routes(routes: Iterable[BaseRoute]) -> Iterator[Route]:
    for route in routes:
        nested = getattr(route, "original_router", None)  # FastAPI keeps an included router whole
        if nested is not None:
            yield from _routes(nested.routes)
        elif isinstance(route, Route):
            yield route


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AdaptserveError, _adaptserve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
