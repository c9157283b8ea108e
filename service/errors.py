"""The service's error hierarchy, mapped once to an HTTP status and a JSON body.

Every error a client can cause is an `AdaptserveError` with its own `status_code` and
`error_type`; `service.api.errors` turns them into `{"error": message, "error_type": type}`.
Anything else that escapes a request is a bug and becomes a logged 500.
"""
from __future__ import annotations

from typing import Any


class AdaptserveError(Exception):
    """Base class: a message for the client plus the HTTP status and a stable `error_type`."""

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """Fields added to `{"error", "error_type"}` in the response body."""
        return {}


def _bearer_challenge(error: str | None) -> dict[str, str]:
    """A `WWW-Authenticate` challenge (RFC 6750 section 3): with the error code where a token was
    sent (`invalid_request`: malformed; `invalid_token`: unknown; `insufficient_scope`), none where
    the request carried no credentials at all."""
    return {"WWW-Authenticate": 'Bearer realm="adaptserve"' + (f', error="{error}"' if error else "")}


class Unauthorized(AdaptserveError):
    """No bearer token, a malformed Authorization header, or a token the server does not know
    (`error`: RFC 6750's code for the challenge, None when no token was sent)."""

    status_code = 401
    error_type = "unauthorized"

    def __init__(self, message: str, error: str | None = "invalid_token") -> None:
        super().__init__(message, headers=_bearer_challenge(error))


class Forbidden(AdaptserveError):
    """A valid token whose scope does not cover the route (an inference token on an admin route)."""

    status_code = 403
    error_type = "forbidden"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=_bearer_challenge("insufficient_scope"))


class Conflict(AdaptserveError):
    """The request is valid but contradicts the task's state (delete the active version, roll
    back with nothing to roll back to)."""

    status_code = 409
    error_type = "conflict"


class UnsupportedMediaType(AdaptserveError):
    status_code = 415
    error_type = "unsupported_media_type"


class BadRequest(AdaptserveError):
    """The request cannot be parsed (for example, a body that is not JSON)."""

    status_code = 400
    error_type = "bad_request"


class InvalidInput(BadRequest):
    """The request parses but asks for something that cannot be done (e.g. a pair for a single-text task)."""

    status_code = 422
    error_type = "invalid_input"


class InvalidTaskName(InvalidInput):
    """A task name that does not match the safe pattern; such a name never reaches a path."""

    error_type = "invalid_task_name"


class TaskNotFound(AdaptserveError):
    status_code = 404
    error_type = "task_not_found"


class VersionNotFound(AdaptserveError):
    status_code = 404
    error_type = "version_not_found"


class PayloadTooLarge(AdaptserveError):
    """Body, number of inputs or length of one input over the server's limits."""

    status_code = 413
    error_type = "payload_too_large"


class BodyTimeout(AdaptserveError):
    """The client stopped sending its request body part way (ADAPTSERVE_BODY_READ_TIMEOUT_S)."""

    status_code = 408
    error_type = "request_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class Overloaded(AdaptserveError):
    """The scheduler's queue is full; the client should retry after `retry_after_s`."""

    status_code = 429
    error_type = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class DeadlineExceeded(AdaptserveError):
    status_code = 504
    error_type = "deadline_exceeded"


class ServiceUnavailable(AdaptserveError):
    """The server cannot take requests right now (still starting, or shutting down)."""

    status_code = 503
    error_type = "service_unavailable"


class NotReady(ServiceUnavailable):
    error_type = "not_ready"


class ShuttingDown(ServiceUnavailable):
    error_type = "shutting_down"


class TaskUnavailable(ServiceUnavailable):
    """A stored task exists but cannot be served: its bundle fails to load, or the store
    cannot tell which version is active. Terminal for this request; a later request retries."""

    error_type = "task_unavailable"


class TaskTooLarge(TaskUnavailable):
    """A task whose weights exceed the whole device tier (`cache_max_bytes`). Still the server's
    problem, not the request's (a 503, as other tasks that cannot load), but no retry can help
    until the server restarts with a larger budget or a smaller version is activated: no
    Retry-After."""


class RegistryUnavailable(ServiceUnavailable):
    """The registry of active versions (Redis) cannot be reached: reads keep serving what this
    replica knows, writes are refused until it is back."""

    error_type = "registry_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class StoreUnavailable(ServiceUnavailable):
    """The task store failed or cannot be reached: an S3 endpoint, or a local store whose directory
    is gone or unreadable (an unmounted volume). An outage to retry, so it says when: `Retry-After`,
    as the other 503s that pass (registry_unavailable, a remembered failed load)."""

    error_type = "store_unavailable"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1", **(headers or {})})


class InferenceFailed(AdaptserveError):
    """The batched forward raised. Every request in that batch gets this; other batches don't."""

    status_code = 500
    error_type = "inference_failed"


class BundleError(AdaptserveError):
    """A task bundle (adapter_config.json + weights) is malformed or does not fit the backbone.

    422 when the bundle is the thing being uploaded; a stored bundle that fails at request time
    is reported as `TaskUnavailable` (503) by the task cache instead.
    """

    status_code = 422
    error_type = "invalid_bundle"

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems else [message]  # each problem on its own


class UploadRejected(BundleError):
    """An uploaded bundle failed validation; `problems` names every problem found. 413 when any
    of them is a size limit, else 422. Nothing was stored."""

    error_type = "upload_rejected"

    def __init__(self, problems: list[str], *, too_large: bool = False) -> None:
        self.problems = list(problems)
        if too_large:
            self.status_code = 413
        count = len(self.problems)
        super().__init__(f"upload refused, {count} problem{'s' if count != 1 else ''}: " + "; ".join(self.problems),
                         problems=self.problems)

    def body(self) -> dict[str, Any]:
        return {"problems": self.problems}


class NoMatchingModuleError(BundleError):
    """An adapter names target modules the backbone does not have: an error, never a warning."""

    error_type = "no_matching_module"


class ConfigurationError(AdaptserveError):
    """The server is misconfigured (bad store directory, bad settings). Raised at startup."""

    error_type = "configuration_error"


class ClientDisconnected(AdaptserveError):
    """The client went away before its answer was ready (nginx's 499; nobody reads the body)."""

    status_code = 499
    error_type = "client_closed_request"
