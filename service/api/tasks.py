"""GET /v1/tasks and GET /v1/tasks/{task}: the registry's tasks, their active versions and where
each is (device, host memory or only the store)."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from service.api.deps import error_responses, service_state
from service.api.schemas import TaskInfo, TaskList, TaskSummary
from service.auth import require_inference
from service.cache import load_or_unavailable
from service.engine.types import TaskKey

router = APIRouter(dependencies=[Depends(require_inference)])


# HEAD beside each GET (the same status and headers, no body), left out of the OpenAPI document.
@router.head("/v1/tasks", include_in_schema=False)
@router.get(
    "/v1/tasks", response_model=TaskList, responses=error_responses(401, 403, 503),
    summary="List tasks and their active versions",
)
async def list_tasks(request: Request) -> TaskList:
    state = service_state(request)
    listings = await state.registry.list_tasks()
    cache = state.runtime.cache if state.runtime is not None else None
    admin = state.admin  # set by create_app; None only in a state built by hand
    return TaskList(
        tasks=[
            TaskSummary(
                name=listing.name,
                version=listing.version,
                location=cache.location(TaskKey(listing.name, listing.version))
                if cache is not None and listing.version is not None else "store",
                error=listing.error,
                problem=admin.remembered_problem(TaskKey(listing.name, listing.version))
                if admin is not None and listing.version is not None else None,
            )
            for listing in listings
        ]
    )


@router.head("/v1/tasks/{task}", include_in_schema=False)
@router.get(
    "/v1/tasks/{task}",
    response_model=TaskInfo,
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Describe one task: method, trainable parameters, labels, where it is",
)
async def task_info(task: str, request: Request) -> TaskInfo:
    state = service_state(request)
    runtime = state.require_runtime()
    key = await state.registry.resolve(task)
    location = runtime.cache.location(key)
    loaded = runtime.cache.peek(key)
    if loaded is None:
        # Load to describe, but do not cache: looking at a task should not evict served ones.
        loaded = await asyncio.to_thread(
            load_or_unavailable, lambda k: runtime.engine.load_task(state.store.bundle_dir(k), k), key
        )
    return TaskInfo.model_validate({**loaded.info(), "name": key.name, "version": key.version, "location": location})
