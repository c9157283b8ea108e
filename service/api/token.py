"""GET /v1/token: the scope the presented token grants. Free of effects, so a client (the trainer's
`--publish`) can learn before any work whether its token may publish, not only after it."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.api.deps import error_responses, service_state
from service.api.schemas import TokenScope
from service.auth import authorization, granted, require_inference

router = APIRouter()


@router.head("/v1/token", include_in_schema=False, dependencies=[Depends(require_inference)])
@router.get(
    "/v1/token", response_model=TokenScope, responses=error_responses(401),
    summary="The scope of the presented token: admin (may change tasks) or inference (may classify and read)",
    dependencies=[Depends(require_inference)],
)
async def token_scope(request: Request) -> TokenScope:
    tokens = service_state(request).tokens
    scope = granted(tokens, authorization(request.headers.getlist("authorization")))
    return TokenScope(scope=scope.value, auth_enabled=tokens.enabled)
