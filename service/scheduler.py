"""Dynamic micro-batching: one queue of rows from every task, one loop that forms batches, one
worker thread that runs the forward.

A batch closes when it holds `max_batch_size` rows or `max_wait_s` after its first row was queued,
whichever comes first. The forward runs in a single worker thread so the event loop never blocks
and forwards never overlap. Each request's rows resolve one future; a request may span batches.

Rows are dropped before their forward when their request is already over: cancelled (client gone),
past its deadline (failed with DeadlineExceeded), or failed in an earlier batch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from service.engine.types import ClassifyItem, Prediction
from service.errors import AdaptserveError, DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown

log = logging.getLogger(__name__)

ClassifyFn = Callable[[Sequence[ClassifyItem]], "list[Prediction]"]
BatchObserver = Callable[[int, float], None]  # (rows in the batch, seconds the forward took)


@dataclass(eq=False)
class _Request:
    future: asyncio.Future[list[Prediction]]
    deadline: float  # loop.time() after which the request is failed, not run
    results: list[Prediction | None]
    remaining: int


@dataclass(eq=False)
class _Row:
    request: _Request
    index: int  # position in the request's inputs
    item: ClassifyItem
    queued_at: float = field(default=0.0)  # loop.time() when queued


class Scheduler:
    """`await scheduler.submit(items, deadline)` returns one Prediction per item, in order."""

    def __init__(
        self,
        classify: ClassifyFn,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be positive, max_wait_s >= 0")
        self._classify = classify
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: deque[_Row] = deque()
        self._wakeup = asyncio.Event()  # set whenever rows arrive or stop() is called
        self._worker: ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def queue_depth(self) -> int:
        """Rows waiting for a forward (not counting the batch in flight)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        if self._loop_task is not None:
            raise RuntimeError("scheduler already started")
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptserve-forward")
        self._loop_task = asyncio.create_task(self._run(), name="adaptserve-scheduler")
        self._loop_task.add_done_callback(_log_crash)

    async def submit(self, items: Sequence[ClassifyItem], deadline: float) -> list[Prediction]:
        """Queue `items` as one request and wait for their predictions.

        `deadline` is in `asyncio.get_running_loop().time()` units. Raises Overloaded when the
        queue cannot take every row, DeadlineExceeded when the deadline passes first,
        ShuttingDown after stop(). Cancelling the caller drops its rows that have not run yet.
        """
        if self._stopping or not self.running:
            raise ShuttingDown("server is shutting down" if self._stopping else "scheduler is not running")
        if not items:
            return []
        if len(self._queue) + len(items) > self.max_queue:
            raise Overloaded(
                f"server is overloaded ({len(self._queue)} rows queued, limit {self.max_queue}); retry later"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        request = _Request(loop.create_future(), deadline, [None] * len(items), len(items))
        self._queue.extend(_Row(request, i, item, now) for i, item in enumerate(items))
        self._wakeup.set()
        try:
            # asyncio.wait neither cancels the future on timeout nor delays our own cancellation,
            # so a caller that goes away marks its rows dead in this very step.
            await asyncio.wait({request.future}, timeout=max(0.0, deadline - now))
            if not request.future.done():
                _fail(request, DeadlineExceeded("request deadline exceeded before its predictions were ready"))
            return request.future.result()
        finally:
            # Client gone: its rows still queued are skipped when the batch loop reaches them.
            if not request.future.done():
                request.future.cancel()

    async def stop(self) -> None:
        """Stop taking requests, finish every queued and in-flight row, then return."""
        self._stopping = True
        self._wakeup.set()
        if self._loop_task is not None:
            try:
                await self._loop_task
            except Exception:  # already logged by the loop
                pass
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Let the batch fill until it is full or its first row has waited max_wait_s;
            # while stopping, flush what is there at once.
            close_at = self._queue[0].queued_at + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._stopping:
                remaining = close_at - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch(loop.time())
            if batch:
                await self._forward(batch)

    def _take_batch(self, now: float) -> list[_Row]:
        batch: list[_Row] = []
        while self._queue and len(batch) < self.max_batch_size:
            row = self._queue.popleft()
            request = row.request
            if request.future.done():  # cancelled, timed out or failed in an earlier batch
                continue
            if now >= request.deadline:
                _fail(request, DeadlineExceeded("request deadline exceeded while queued"))
                continue
            batch.append(row)
        return batch

    async def _forward(self, batch: list[_Row]) -> None:
        loop = asyncio.get_running_loop()
        items = [row.item for row in batch]
        started = time.perf_counter()
        try:
            predictions = await loop.run_in_executor(self._worker, self._classify, items)
            if len(predictions) != len(items):
                raise RuntimeError(f"engine returned {len(predictions)} predictions for {len(items)} rows")
        except AdaptserveError as err:
            for row in batch:
                _fail(row.request, err)
            return
        except Exception as err:
            log.exception("forward of a batch of %d rows failed", len(items))
            failure = InferenceFailed(f"inference failed: {type(err).__name__}: {err}")
            for row in batch:
                _fail(row.request, failure)
            return
        finally:
            if self._on_batch is not None:
                self._on_batch(len(items), time.perf_counter() - started)
        for row, prediction in zip(batch, predictions):
            request = row.request
            if request.future.done():
                continue
            request.results[row.index] = prediction
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.results)  # type: ignore[arg-type]


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batching loop stopped on a bug; requests now get 503", exc_info=task.exception())


def _fail(request: _Request, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)
