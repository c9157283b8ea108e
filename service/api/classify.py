"""POST /v1/tasks/{task}/classify: check the request, find the task, queue its rows, answer.

The handler never touches weights or runs a forward: the store names the version, the task
cache loads it, the scheduler batches its rows with everyone else's."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Coroutine, Sequence, TypeVar

from fastapi import APIRouter, Depends, Request, Response

from service.api.deps import error_responses, service_state
from service.api.schemas import ClassifyRequest, ClassifyResponse, EarlyExit, PredictionOut, TextPair
from service.auth import require_inference
from service.engine.types import ClassifyItem, TaskKey
from service.errors import ClientDisconnected, DeadlineExceeded, InvalidInput, PayloadTooLarge
from service.scheduler import Timing
from service.settings import Settings
from service.state import EngineLike, TaskLike

T = TypeVar("T")

router = APIRouter()


@router.post(
    "/v1/tasks/{task}/classify",
    response_model=ClassifyResponse,
    # 500 is inference_failed: the batched forward this request shared raised (see the scheduler).
    responses=error_responses(400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 503, 504),
    summary="Classify texts (or text pairs) with one task",
    dependencies=[Depends(require_inference)],
)
async def classify(task: str, body: ClassifyRequest, request: Request, response: Response) -> ClassifyResponse:
    state = service_state(request)
    settings = state.settings
    runtime = state.require_runtime()
    timeout_s = settings.request_timeout_s
    if body.timeout_ms is not None:
        timeout_s = min(timeout_s, body.timeout_ms / 1000.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    started = time.perf_counter()  # Server-Timing's clock (uvloop's loop.time() counts whole ms)

    # Resolved once: every row of this request runs on this version, whatever is activated meanwhile
    # (the batch holds the Task object). In memory with Redis; a stat + tiny read with a local store.
    if state.registry.may_block:  # a remote store's pointer, for a task this replica has not read yet
        key = await _within(deadline, state.registry.resolve(task), lambda: (
            f"the active version of task {task!r} could not be read from the store within the request's deadline"))
    else:
        key = await state.registry.resolve(task)
    _check_limits(body.inputs, settings)

    async def answer() -> ClassifyResponse:
        source = runtime.cache.location(key)
        loaded = await _within(deadline, runtime.cache.get(key), lambda: (
            "request deadline exceeded before its rows were queued"  # it was there: a timeout_ms of 1
            if runtime.cache.peek(key) is not None else f"task {key} did not load within the request's deadline"))
        found = time.perf_counter()
        items = _to_items(loaded, key, body.inputs, _exit_policy(loaded, key, body.early_exit))
        items = await _pretokenize(runtime.engine, items, deadline)
        await _refuse_overflow(runtime.engine, loaded, key, items, deadline)
        tokenised = time.perf_counter()
        timing = Timing()
        predictions = await runtime.scheduler.submit(items, deadline, timing)
        response.headers["Server-Timing"] = _server_timing(
            ("task", found - started, source), ("tokenize", tokenised - found, None), ("queue", timing.queued, None),
            ("forward", timing.forward, f"{timing.batch_rows} rows"), ("total", time.perf_counter() - started, None))
        if getattr(loaded, "has_exits", False) and state.registry.known(key.name):  # deleted meanwhile: no series back
            state.metrics.observe_exits(key.name, [p.exit_layer for p in predictions])
        return ClassifyResponse(
            task=key.name,
            version=key.version,
            predictions=[
                PredictionOut(label=p.label, score=p.score, scores=p.scores, version=p.version, exit_layer=p.exit_layer)
                for p in predictions
            ],
        )

    return await _unless_disconnected(request, answer())


def _server_timing(*spans: tuple[str, float, str | None]) -> str:
    """A `Server-Timing` header (W3C): where the request's time went, in ms. `task` is finding the
    version and its weights (desc: the tier they came from: device, host or store), `queue` the wait
    for a forward, `forward` the forwards its rows ran in (desc: the largest batch's rows)."""
    return ", ".join(f"{name};dur={1e3 * seconds:.1f}" + (f';desc="{desc}"' if desc else "") for name, seconds, desc in spans)


def _check_limits(inputs: Sequence[str | TextPair], settings: Settings) -> None:
    if len(inputs) > settings.max_inputs_per_request:
        raise PayloadTooLarge(
            f"{len(inputs)} inputs in one request; the limit is {settings.max_inputs_per_request} (split the request)"
        )
    for index, item in enumerate(inputs):
        sides = zip(("[0] (the text)", "[1] (the text pair)"), item) if isinstance(item, tuple) else (("", item),)
        for side, text in sides:
            if len(text) > settings.max_chars_per_input:
                raise PayloadTooLarge(
                    f"inputs[{index}]{side} has {len(text)} characters; the limit is {settings.max_chars_per_input}"
                )


async def _refuse_overflow(engine: EngineLike, task: TaskLike, key: TaskKey, items: list[ClassifyItem],
                           deadline: float) -> None:
    """413 when the task's overflow policy is `refuse` and an input is longer than its max_length
    tokens. Checked before the rows are queued, so an over-long input never takes a place in a
    batch or fails anyone else's; `truncate` tasks (the default) never pay for the count. The
    rows come tokenised: only those that reached max_length are tokenised again, uncut, to count."""
    if task.overflow != "refuse":
        return
    max_length, prompt = task.max_length, task.prompt_tokens
    counts = await _in_thread(engine.token_counts, items, deadline)  # the tokenizer is CPU work: off the loop
    for index, count in enumerate(counts):
        if count > max_length:
            # a prompt task's count is its prompt's: say so, and how long the input itself may be
            counted = f" with the task's prompt template, whose text and special tokens are {prompt} of them" if prompt else ""
            room = f" to at most {max_length - prompt} tokens" if prompt else ""
            raise PayloadTooLarge(
                f"inputs[{index}] is {count} tokens{counted}; task {key.name!r} takes at most {max_length} "
                f"(its overflow policy is 'refuse': shorten the input{room})"
            )


async def _pretokenize(engine: EngineLike, items: list[ClassifyItem], deadline: float) -> list[ClassifyItem]:
    """The rows with their tokens, made here and not on the forward thread, so that a request's
    tokenising never delays another's forward: short rows at once on the loop, the rest in a
    worker thread (`Engine.pretokenize`)."""
    inline = engine.pretokenize_inline(items)
    return inline if inline is not None else await _in_thread(engine.pretokenize, items, deadline)


async def _in_thread(fn: Callable[[list[ClassifyItem]], T], items: list[ClassifyItem], deadline: float) -> T:
    """fn(items) in a worker thread, within the request's deadline (504 past it: the thread
    finishes on its own, its result unused)."""
    return await _within(deadline, asyncio.to_thread(fn, items),
                         lambda: "request deadline exceeded while its inputs were being tokenised")


async def _within(deadline: float, work: Awaitable[T], late: Callable[[], str]) -> T:
    """`work`'s result, or DeadlineExceeded (504) with the message `late()` once the deadline passes."""
    try:
        return await asyncio.wait_for(work, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
    except asyncio.TimeoutError:
        raise DeadlineExceeded(late()) from None


def _exit_policy(task: TaskLike, key: TaskKey, early_exit: EarlyExit | None) -> Any:
    """The request's early-exit override as an engine `ExitPolicy`, or None for the task's default.

    Asking a task without exit classifiers to exit early is an error, not a silent no-op
    (`off` is allowed anywhere: it is what such a task does anyway)."""
    if early_exit is None:
        return None
    if early_exit.policy != "off" and not getattr(task, "has_exits", False):
        raise InvalidInput(
            f"task {key.name!r} has no early-exit classifiers, so early_exit.policy "
            f"{early_exit.policy!r} cannot apply (only 'off' can)"
        )
    from service.methods.exits import DEFAULT_THRESHOLDS, ExitPolicy, patience_problem  # imports torch: only when asked

    threshold = early_exit.threshold
    if threshold is None:  # the task's calibrated threshold for this policy (docs/training.md), else the default
        threshold = task.exit_threshold(early_exit.policy)
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[early_exit.policy]
    if early_exit.policy == "patience" and (problem := patience_problem(threshold, task.exit_count)):
        # It would run every row through every layer: `off` under another name, which no one means.
        given = "" if early_exit.threshold is not None else " (the task's default, as none was given)"
        raise InvalidInput(f"early_exit.threshold{given}: {problem} (task {key.name!r})")
    try:
        return ExitPolicy(early_exit.policy, float(threshold))
    except ValueError as err:  # the schema checks the same ranges; this is the engine's last word
        raise InvalidInput(f"early_exit: {err}") from None


def _to_items(task: TaskLike, key: TaskKey, inputs: Sequence[str | TextPair], exit_policy: Any = None) -> list[ClassifyItem]:
    pair_task = task.input_kind == "pair"
    items = []
    for index, item in enumerate(inputs):
        if isinstance(item, tuple) != pair_task:
            if pair_task:
                raise InvalidInput(
                    f"task {key.name!r} classifies text pairs: inputs[{index}] must be [text, text_pair], not a string"
                )
            raise InvalidInput(
                f"task {key.name!r} classifies single texts: inputs[{index}] must be a string, not a pair"
            )
        text, text_pair = item if isinstance(item, tuple) else (item, None)
        items.append(ClassifyItem(task=task, text=text, text_pair=text_pair, exit_policy=exit_policy))
    return items


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (its queued rows are then
    dropped before their forward)."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
    if not work_task.done() or work_task.cancelled():
        raise ClientDisconnected("client disconnected before its predictions were ready")
    return work_task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is http.disconnect, whenever it comes.
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:
        # A server that cannot report disconnects: never cancel; the work's deadline still holds.
        await asyncio.Event().wait()
