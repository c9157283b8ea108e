"""Bearer-token auth with two scopes: `inference` (classify, read listings) and `admin` (upload,
activate, roll back, delete; admin tokens may also do everything inference tokens may).

Tokens come from settings (`ADAPTSERVE_ADMIN_TOKENS`, `ADAPTSERVE_INFERENCE_TOKENS` or their
`*_FILE` variants). A presented token is compared with `hmac.compare_digest` against *every*
configured token, without stopping at a match, so the time taken says nothing about which
token (or how much of one) matched. With no token configured at all, auth is off and the app
says so with a WARNING at start-up. Tokens are never logged: error messages never quote them, and
the access log masks credential-like query parameters and any configured token in a URL
(`service.server.RedactQueryCredentials`).

401: no token, a malformed Authorization header, or an unknown token. 403: a known token
whose scope does not cover the route.
"""
from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Awaitable, Callable, Sequence

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.errors import Forbidden, Unauthorized
from service.logs import warn_always

log = logging.getLogger(__name__)


class Scope(str, Enum):
    inference = "inference"
    admin = "admin"


@dataclass(frozen=True)
class Tokens:
    admin: tuple[bytes, ...] = ()
    inference: tuple[bytes, ...] = ()

    @classmethod
    def from_secrets(cls, admin: Sequence[SecretStr], inference: Sequence[SecretStr]) -> "Tokens":
        return cls(
            admin=tuple(t.get_secret_value().encode() for t in admin),
            inference=tuple(t.get_secret_value().encode() for t in inference),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.admin or self.inference)

    def __repr__(self) -> str:  # never print the tokens themselves
        return f"Tokens(admin={len(self.admin)}, inference={len(self.inference)})"

    def scope_of(self, presented: bytes) -> Scope | None:
        """The widest scope `presented` grants, or None. Every configured token is compared."""
        is_admin = False
        is_inference = False
        for token in self.admin:
            is_admin |= hmac.compare_digest(token, presented)
        for token in self.inference:
            is_inference |= hmac.compare_digest(token, presented)
        if is_admin:
            return Scope.admin
        return Scope.inference if is_inference else None


def bearer_token(header: str | None) -> bytes:
    """The token of an `Authorization: Bearer <token>` header, or Unauthorized."""
    if not header:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'", error=None)
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer":  # another scheme (Basic, ...): no error code (RFC 6750 section 3.1)
        raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'", error=None)
    if not value or any(c.isspace() for c in value):
        raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'", error="invalid_request")
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise Unauthorized("malformed Authorization header: the token must be ASCII", error="invalid_request") from None


def authorization(values: list[str]) -> str | None:
    """The request's one Authorization header (None if it has none). Two are refused: proxies and
    frameworks disagree on which one counts (Starlette reads the first, a dict of the raw headers
    the last), so a request must not get to choose."""
    if len(values) > 1:
        raise Unauthorized(f"{len(values)} Authorization headers: send exactly one ('Authorization: Bearer <token>')",
                           error="invalid_request")
    return values[0] if values else None


def granted(tokens: Tokens, header: str | None) -> Scope:
    """The scope `header` grants, or Unauthorized. With auth off, admin: anyone may change tasks."""
    if not tokens.enabled:
        return Scope.admin
    scope = tokens.scope_of(bearer_token(header))
    if scope is None:
        raise Unauthorized("invalid bearer token")
    return scope


def check(tokens: Tokens, header: str | None, needed: Scope) -> None:
    """Raise Unauthorized / Forbidden unless `header` grants `needed` (no-op when auth is off)."""
    scope = granted(tokens, header)  # every route needs a known token, whatever its scope
    if needed is Scope.admin and scope is not Scope.admin:
        raise Forbidden("this token may classify and read tasks, not change them: use an admin token")


# auto_error=False: never answers by itself (FastAPI's own 403 for a missing header would bypass
# `check`); it only declares the scheme.
_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="`Authorization: Bearer <token>`; required on /v1 routes when tokens are configured.")


def require(needed: Scope) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency: `dependencies=[Depends(require(Scope.admin))]`."""

    async def dependency(request: Request, _declared: HTTPAuthorizationCredentials | None = Security(_BEARER)) -> None:
        # `_declared` only puts the bearer scheme into the OpenAPI document; the header is judged
        # here, whole, so that a malformed one is a 401 with our own message. `async`, though it
        # never awaits: FastAPI runs a plain `def` dependency in its thread pool, a hand-off to a
        # worker thread and back on every request for a few microseconds of comparisons (it cost
        # ~0.2 ms of CPU per request: docs/reliability.md).
        check(request.app.state.service.tokens, authorization(request.headers.getlist("authorization")), needed)

    dependency.__name__ = f"require_{needed.value}"
    return dependency


require_inference = require(Scope.inference)
require_admin = require(Scope.admin)


def warn_if_disabled(tokens: Tokens) -> None:
    if not tokens.enabled:
        message = ("AUTH IS DISABLED: no ADAPTSERVE_ADMIN_TOKENS or ADAPTSERVE_INFERENCE_TOKENS configured. "
                   "Anyone who can reach this port can classify AND upload, activate, roll back and delete "
                   "tasks. Configure tokens before exposing this server beyond a trusted network.")
        warn_always(log, message)
    else:
        log.info("auth enabled: %d admin token(s), %d inference token(s)", len(tokens.admin), len(tokens.inference))
        placeholders = [f"{scope} token {n}" for scope, configured in (("admin", tokens.admin), ("inference", tokens.inference))
                        for n, token in enumerate(configured, 1) if token.upper().startswith(PLACEHOLDER_PREFIX)]
        if placeholders:
            # k8s/base/secrets.env.example holds CHANGE-ME-... tokens: auth is on, but with tokens anyone
            # can read in this repository. Named by position, never by value.
            verb = "still starts" if len(placeholders) == 1 else "still start"
            warn_always(log, "AUTH USES PLACEHOLDER TOKENS: " + ", ".join(placeholders) + f" {verb} with "
                        "CHANGE-ME (k8s/base/secrets.env.example's publicly known values); anyone who has read this "
                        "repository can use them. Replace them with real secrets (docs/deploy.md, \"Secrets\").")


PLACEHOLDER_PREFIX = b"CHANGE-ME"
