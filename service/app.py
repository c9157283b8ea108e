"""The app factory: settings in, a FastAPI app out; the engine is built in the lifespan.

create_app opens the store (local directory or S3 bucket) and the registry (the store's own
files, or Redis), and reads the auth tokens. The lifespan starts following the registry (a Redis
registry connects in the background and never holds start-up hostage), then starts the engine in
the background so /healthz answers while the backbone loads: load backbone -> build Engine ->
one warmup forward -> start the scheduler -> ready (/readyz turns 200). Shutdown stops taking
requests, drains the scheduler and stops following the registry. Tests pass their own engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Mapping

from fastapi import FastAPI

from service import __version__
from service.methods import slots
from service.api import openapi, router
from service.api.errors import install_error_handlers
from service.api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware, TrailingSlashMiddleware
from service.auth import Tokens, warn_if_disabled
from service.cache import TaskCache
from service.hotswap import TaskAdmin
from service.logs import warn_always
from service.memory import Trimmer, check_cache_budget, check_device_budget, device_free_bytes, memory_limit_bytes
from service.metrics import Metrics
from service.registry import open_registry
from service.scheduler import Scheduler
from service.settings import Settings, setting_name
from service.state import EngineLike, Runtime, ServiceState
from service.store import open_store

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, engine: EngineLike | None = None, *,
               flags: Mapping[str, str] | None = None) -> FastAPI:
    """Build the app. Without `engine`, the lifespan loads the backbone named by `settings` and
    builds `service.engine.engine.Engine` on it. Raises ConfigurationError for a bad store.
    `flags`: the settings a command line set (field -> flag, `adaptserve serve`), which set-up
    errors and warnings name by their flag rather than their variable."""
    settings = settings if settings is not None else Settings()
    flags = dict(flags or {})
    store = open_store(settings, flags)
    state = ServiceState(
        settings=settings,
        store=store,
        registry=open_registry(settings, store, flags),
        metrics=Metrics(),
        tokens=Tokens.from_secrets(settings.admin_tokens, settings.inference_tokens),
        flags=flags,
    )
    state.admin = TaskAdmin(state)
    state.metrics.watch(
        cache_stats=lambda: state.runtime.cache.stats if state.runtime else None,
        queue_depth=lambda: state.runtime.scheduler.queue_depth if state.runtime else 0,
        ready=lambda: state.ready,
        registry_status=state.registry.status,
        pool_bytes=slots.pool_bytes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warn_if_disabled(state.tokens)
        log.info("task store: %s; registry: %s", store.describe(), state.registry.backend)
        await state.registry.start()
        startup = asyncio.create_task(_start(state, engine), name="adaptserve-startup")
        try:
            yield
        finally:
            await _stop(state, startup)

    app = FastAPI(
        title="adaptserve",
        version=__version__,
        description="Text classification with many parameter-efficient tasks over one frozen backbone.",
        lifespan=lifespan,
        redirect_slashes=False,  # TrailingSlashMiddleware serves those paths instead
    )
    app.state.service = state
    install_error_handlers(app)
    app.include_router(router)
    openapi.install(app, settings)
    # Added last = outermost: metrics see the body limit's 413s too.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.body_limit_bytes, upload_max_bytes=settings.upload_limit_bytes,
        read_timeout_s=settings.body_read_timeout_s, tokens=state.tokens,
    )
    app.add_middleware(RequestMetricsMiddleware, state=state)
    app.add_middleware(TrailingSlashMiddleware)
    return app


def _build_engine(settings: Settings) -> EngineLike:
    # Imported here: torch and the model code load only when a real engine is wanted.
    from service.engine.backbone import load_backbone
    from service.engine.engine import Engine

    backbone = load_backbone(settings.backbone, device=settings.device, dtype=settings.dtype,
                             small_batch_tokens=settings.small_batch_tokens, cache_dir=settings.cache_dir)
    return Engine(backbone)


async def _start(state: ServiceState, engine: EngineLike | None) -> None:
    settings = state.settings
    try:
        if engine is None:
            log.info("loading backbone %s", settings.backbone or "(bundled all-MiniLM-L6-v2)")
            engine = await asyncio.to_thread(_build_engine, settings)
        await asyncio.to_thread(engine.warmup)
        ready_engine = engine

        def load(key):  # runs in a cache loader thread
            return ready_engine.load_task(state.store.bundle_dir(key), key)

        def to_host(task):  # the host tier keeps CPU copies (engine Tasks move with .to)
            return task.to("cpu") if hasattr(task, "to") else task

        def to_device(task):
            return task.to(ready_engine.backbone.device) if hasattr(task, "to") else task

        # The methods' slot pools (padded device copies of recently batched tasks) share one cap,
        # the device tier's budget, on top of the cache (slots batches in flight hold aside:
        # docs/architecture.md); on a CPU the start-up check below counts them as host memory.
        slots.configure(settings.cache_max_bytes)
        # On the CPU the device is host memory: the tiers then move tasks without copies or threads.
        device = getattr(getattr(ready_engine, "backbone", None), "device", None)
        copies = dict(to_host=to_host, to_device=to_device) if getattr(device, "type", "cpu") != "cpu" else {}
        budget_name = setting_name("cache_max_bytes", state.flags)
        too_big = [check_cache_budget(settings.cache_max_bytes, settings.cache_host_max_bytes, not copies,
                                      memory_limit_bytes(), state.flags)]
        device_memory = device_free_bytes(device)  # a GPU's: what the device tier and the pools may take
        if device_memory is not None:
            too_big.append(check_device_budget(settings.cache_max_bytes, *device_memory, str(device), budget_name))
        for warning in filter(None, too_big):
            warn_always(log, warning)
        cache = TaskCache(load, settings.cache_max_bytes, host_max_bytes=settings.cache_host_max_bytes,
                          failure_ttl_s=settings.failed_load_retry_s, max_bytes_setting=budget_name, **copies)
        trimmer = Trimmer(settings.malloc_trim_interval_s)
        scheduler = Scheduler(
            trimmer.wrap(engine.classify),
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_s,
            max_queue=settings.max_queue,
            on_batch=state.metrics.observe_batch,
            between_batches=state.full_collections.between_batches if state.full_collections else None,
        )
        await scheduler.start()
    except asyncio.CancelledError:
        raise
    except Exception as err:
        state.startup_error = f"{type(err).__name__}: {err}"
        if state.on_startup_failure is not None:
            log.exception("startup failed; the server stops")
            state.on_startup_failure()
        else:
            log.exception("startup failed; the server stays alive but never gets ready")
        return
    state.runtime = Runtime(engine=engine, cache=cache, scheduler=scheduler)
    if state.on_ready is not None:
        state.on_ready()
    log.info("ready: backbone %s", getattr(engine.backbone, "name", "?"))


async def _stop(state: ServiceState, startup: asyncio.Task[None]) -> None:
    state.stopping = True
    if not startup.done():
        startup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await startup
    if state.runtime is not None:
        await state.runtime.scheduler.stop()
        log.info("scheduler drained")
    if state.admin is not None:
        await state.admin.close()
    await state.registry.stop()
    if state.runtime is not None:
        await state.runtime.cache.close()
    log.info("stopped")
