"""GET /v1/tasks and GET /v1/tasks/{task}: what the store holds and where each task is."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from service.api.deps import error_responses, service_state
from service.api.schemas import TaskInfo, TaskList, TaskSummary
from service.cache import as_unavailable
from service.engine.types import TaskKey
from service.errors import BundleError

router = APIRouter()


@router.get("/v1/tasks", response_model=TaskList, responses=error_responses(503), summary="List tasks and their active versions")
async def list_tasks(request: Request) -> TaskList:
    state = service_state(request)
    listings = await asyncio.to_thread(state.store.list_tasks)  # a directory scan: off the loop
    cache = state.runtime.cache if state.runtime is not None else None
    return TaskList(
        tasks=[
            TaskSummary(
                name=listing.name,
                version=listing.version,
                location="device" if cache is not None and listing.version is not None
                and TaskKey(listing.name, listing.version) in cache else "store",
                error=listing.error,
            )
            for listing in listings
        ]
    )


@router.get(
    "/v1/tasks/{task}",
    response_model=TaskInfo,
    responses=error_responses(404, 422, 503),
    summary="Describe one task: method, trainable parameters, labels, where it is",
)
async def task_info(task: str, request: Request) -> TaskInfo:
    state = service_state(request)
    runtime = state.require_runtime()
    key = state.store.resolve(task)
    loaded = runtime.cache.peek(key)
    location = "device"
    if loaded is None:
        # Load to describe, but do not cache: looking at a task should not evict served ones.
        location = "store"
        try:
            loaded = await asyncio.to_thread(runtime.engine.load_task, state.store.bundle_dir(key), key)
        except (BundleError, OSError) as err:
            raise as_unavailable(key, err) from err
    return TaskInfo.model_validate({**loaded.info(), "name": key.name, "version": key.version, "location": location})
