"""Task versions over HTTP: upload, list, activate, roll back, delete (service.hotswap does the work).

    POST   /v1/tasks/{task}/versions                      admin   upload (multipart), activate by default
    GET    /v1/tasks/{task}/versions                      read    versions, active one, history
    POST   /v1/tasks/{task}/versions/{version}/activate   admin
    POST   /v1/tasks/{task}/rollback                      admin   to the previously active version
    DELETE /v1/tasks/{task}/versions/{version}            admin   never the active one
    DELETE /v1/tasks/{task}                               admin   the task and every version
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service.api.deps import error_responses, service_state
from service.api.schemas import Deleted, TaskState, TaskVersions, UploadResponse, VersionInfo
from service.auth import require_admin, require_inference
from service.errors import BadRequest, ClientDisconnected, InvalidInput, UnsupportedMediaType
from service.hotswap import TaskAdmin
from service.registry.base import TaskRecord
from service.state import ServiceState
from service.store import validate_task_name
from service.upload import Part

router = APIRouter()

# The route reads the multipart body itself (to count and cap it while it streams in), so FastAPI
# cannot infer it: declared here so clients and fuzzers know its shape.
UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "properties": {
        "adapter_config.json": {"type": "string", "format": "binary", "description": "the bundle's config"},
        "adapter_model.safetensors": {"type": "string", "format": "binary", "description": "its weights (safetensors only)"},
        "bundle": {"type": "string", "format": "binary",
                   "description": "instead of the two files: one .zip or .tar.gz of a bundle or a PEFT adapter directory"},
        "activate": {"type": "boolean", "description": "make the new version active (default true; a task's "
                                                        "first version always is: false is refused with 409)"},
    },
    "anyOf": [{"required": ["adapter_config.json", "adapter_model.safetensors"]}, {"required": ["bundle"]}],
}}}}}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_MAX_FORM_FILES = 8  # 2 bundle files or 1 archive; a few more get a clear "unexpected part" problem
_MAX_FORM_FIELDS = 4  # `activate` only
_MAX_FIELD_BYTES = 1024


def _admin(state: ServiceState) -> TaskAdmin:
    assert state.admin is not None
    return state.admin


def _task_state(record: TaskRecord) -> TaskState:
    return TaskState(task=record.name, active=record.active, rollback_to=record.rollback_target(),
                     history=list(record.history))


@router.post(
    "/v1/tasks/{task}/versions",
    response_model=UploadResponse,
    status_code=201,
    # 409: activate=false for a task's first version (a task's only version serves).
    responses=error_responses(400, 401, 403, 408, 409, 413, 415, 422, 429, 503) | {200: {"model": UploadResponse}},
    summary="Upload a task version (multipart: adapter_config.json + adapter_model.safetensors, or one .zip/.tar.gz)",
    dependencies=[Depends(require_admin)],
    openapi_extra=UPLOAD_BODY,
)
async def upload_version(
    task: str,
    request: Request,
    activate: bool | None = Query(default=None, description="Make the new version active (default true; a task's "
                                  "first version always is: false is refused with 409)."),
) -> Any:
    state = service_state(request)
    validate_task_name(task)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            "upload a bundle as multipart/form-data: parts adapter_config.json and adapter_model.safetensors, "
            "or one .zip / .tar.gz"
        )
    # Refuse before reading a large body when nothing could come of it.
    state.require_runtime()
    state.registry.require_writable()
    admin = _admin(state)
    async with admin.upload_slot():  # 429 beyond max_concurrent_uploads, before the body is read
        parts, form_activate = await _read_form(request, admin.limits.part_bytes)
        if activate is not None and form_activate is not None and activate != form_activate:
            raise InvalidInput("'activate' given twice (query and form) with different values")
        wanted = activate if activate is not None else form_activate if form_activate is not None else True
        result = await admin.upload(task, parts, activate=wanted)
    body = UploadResponse(task=result.task, version=result.version, active=result.active, created=result.created,
                          source=result.source, kind=result.kind, warnings=list(result.warnings))
    return JSONResponse(body.model_dump(), status_code=201 if result.created else 200)


@router.head("/v1/tasks/{task}/versions", include_in_schema=False, dependencies=[Depends(require_inference)])
@router.get(
    "/v1/tasks/{task}/versions",
    response_model=TaskVersions,
    responses=error_responses(401, 403, 404, 422, 503),
    summary="List a task's versions, the active one, and its activation history",
    dependencies=[Depends(require_inference)],
)
async def list_versions(task: str, request: Request) -> TaskVersions:
    record, rows, error = await _admin(service_state(request)).versions(task)
    return TaskVersions(**_task_state(record).model_dump(), error=error, versions=[VersionInfo(**row) for row in rows])


@router.post(
    "/v1/tasks/{task}/versions/{version}/activate",
    response_model=TaskState,
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Make a stored version the active one (it is loaded first; one that cannot load is refused)",
    dependencies=[Depends(require_admin)],
)
async def activate_version(task: str, version: str, request: Request) -> TaskState:
    return _task_state(await _admin(service_state(request)).activate(task, version))


@router.post(
    "/v1/tasks/{task}/rollback",
    response_model=TaskState,
    responses=error_responses(401, 403, 404, 409, 422, 503),
    summary="Re-activate the previously active version",
    dependencies=[Depends(require_admin)],
)
async def rollback(task: str, request: Request) -> TaskState:
    return _task_state(await _admin(service_state(request)).rollback(task))


@router.delete(
    "/v1/tasks/{task}/versions/{version}",
    response_model=Deleted,
    responses=error_responses(401, 403, 404, 409, 422, 503),
    summary="Delete one version (never the active one)",
    dependencies=[Depends(require_admin)],
)
async def delete_version(task: str, version: str, request: Request) -> Deleted:
    await _admin(service_state(request)).delete_version(task, version)
    return Deleted(task=task, version=version)


@router.delete(
    "/v1/tasks/{task}",
    response_model=Deleted,
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Delete a task and every version of it",
    dependencies=[Depends(require_admin)],
)
async def delete_task(task: str, request: Request) -> Deleted:
    await _admin(service_state(request)).delete_task(task)
    return Deleted(task=task)


async def _read_form(request: Request, part_bytes: int) -> tuple[list[Part], bool | None]:
    """The file parts (each read up to `part_bytes + 1` bytes) and the `activate` form field.
    ClientDisconnected (499) when the client goes away while sending them: nothing to answer."""
    parts: list[Part] = []
    form_activate: bool | None = None
    try:
        form = await request.form(max_files=_MAX_FORM_FILES, max_fields=_MAX_FORM_FIELDS, max_part_size=_MAX_FIELD_BYTES)
    except ClientDisconnect:
        raise ClientDisconnected("client disconnected while sending its upload") from None
    except HTTPException as err:  # Starlette's multipart parser: e.g. a file sent as a plain field (no filename)
        if err.status_code != 400:
            raise
        raise BadRequest(f"the multipart body could not be read ({err.detail}); send each file as a file part with "
                         "a filename, e.g. curl -F 'bundle=@bundle.zip'") from None
    try:
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append(Part(field, value.filename, await value.read(part_bytes + 1)))
            elif field == "activate":
                form_activate = _parse_bool(field, value)
            else:
                raise InvalidInput(f"unexpected form field {field[:50]!r}: only file parts and 'activate' are accepted")
    finally:
        await form.close()
    return parts, form_activate


def _parse_bool(field: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidInput(f"form field {field!r} must be true or false, not {value[:20]!r}")
