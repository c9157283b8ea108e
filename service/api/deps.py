"""Small helpers shared by the route modules."""
from __future__ import annotations

from typing import Any

from fastapi import Request

from service.api.schemas import ErrorBody
from service.state import ServiceState


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries saying these statuses answer with an ErrorBody."""
    return {status: {"model": ErrorBody} for status in statuses}


def service_state(request: Request) -> ServiceState:
    return request.app.state.service
