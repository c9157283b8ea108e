"""Probes and metrics: GET /healthz (alive), GET /readyz (ready to classify), GET /metrics (a
token only with ADAPTSERVE_METRICS_REQUIRE_TOKEN: its per-task series name the store's tasks)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.api.deps import service_state
from service.api.schemas import Health, Readiness
from service.auth import Scope, authorization, check, granted
from service.errors import Unauthorized

router = APIRouter()
# What the probes say instead of a reason to a caller without a token, where tokens are configured:
# a reason can name internal hosts and paths (Redis's address, the store's folder, a model path).
HIDDEN = "the reason is shown to a caller with a bearer token"


# HEAD too (load balancers probe with it), left out of the OpenAPI document: the same answer, no body.
# Every GET route of the service answers HEAD so.
@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", response_model=Health, responses={503: {"model": Health}}, summary="Liveness")
async def healthz(request: Request) -> Any:
    state = service_state(request)
    if state.startup_error is not None:  # the server will never get ready: let the orchestrator restart it
        error = state.startup_error if _holds_a_token(state, request) else HIDDEN
        return JSONResponse(Health(status="failed", error=error).model_dump(), status_code=503)
    return Health(status="ok")


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, summary="Readiness")
async def readyz(request: Request) -> Any:
    state = service_state(request)
    registry = state.registry.status()
    shown = _holds_a_token(state, request)
    if not shown and "error" in registry:
        registry["error"] = HIDDEN
    if state.ready:
        backbone = _describe_backbone(state.runtime.engine.backbone)  # type: ignore[union-attr]
        # A store that cannot be read is no reason to leave the Service: the tasks this replica
        # holds keep serving their versions (the registry keeps the pointers it last read), and
        # only what must read the store gets a 503. The log says so once per outage.
        return Readiness(status="ready", backbone=backbone, registry=registry)
    if state.stopping:
        status, error = "stopping", None
    elif state.startup_error is not None:
        status, error = "failed", state.startup_error if shown else HIDDEN
    else:
        status, error = "starting", None
    return JSONResponse(Readiness(status=status, error=error, registry=registry).model_dump(), status_code=503)


def _holds_a_token(state: Any, request: Request) -> bool:
    """Whether the caller may read reasons: auth is off, or it sent a known token (any scope)."""
    try:
        granted(state.tokens, authorization(request.headers.getlist("authorization")))
    except Unauthorized:
        return False
    return True


def _describe_backbone(backbone: Any) -> dict[str, Any]:
    described = {}
    for field in ("name", "fingerprint", "num_params", "device", "dtype"):
        value = getattr(backbone, field, None)
        # torch.device / torch.dtype are not JSON: show them as `cuda:0`, `torch.float16`.
        described[field] = value if value is None or isinstance(value, (str, int, float)) else str(value)
    return described


@router.head("/metrics", include_in_schema=False)
@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = service_state(request)
    if state.settings.metrics_require_token:
        check(state.tokens, authorization(request.headers.getlist("authorization")), Scope.inference)
    text, content_type = state.metrics.render()
    return Response(content=text, media_type=content_type)
