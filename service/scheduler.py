"""Dynamic micro-batching: one queue of rows from every task, one forward thread that forms the
batches and runs them.

A batch closes when it holds `max_batch_size` rows or `max_wait_s` after its first row was queued,
whichever comes first. The forward thread takes its next batch itself the moment a forward ends,
so the event loop is off the path between two forwards: a busy loop (parsing requests, writing
answers) never leaves the forward thread idle with rows queued. The loop only queues rows and
delivers each finished batch's predictions. Forwards never overlap. Each request's rows resolve
one future; a request may span batches.

Rows are dropped before their forward when their request is already over: cancelled (client gone),
past its deadline (failed with DeadlineExceeded), or failed in an earlier batch. A forward that
raises fails every request of its batch; a row the engine answers with an error instead of a
prediction (its task's weights produce non-finite scores) fails its own request alone.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from service.engine.types import ClassifyItem, Prediction
from service.errors import AdaptserveError, DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown

log = logging.getLogger(__name__)

# One answer per row: its Prediction, or the AdaptserveError that fails that row's request alone.
ClassifyFn = Callable[[Sequence[ClassifyItem]], "list[Prediction | AdaptserveError]"]
BatchObserver = Callable[[int, float], None]  # (rows in the batch, seconds the forward took)


@dataclass
class Timing:
    """Where one request's time went inside the scheduler, in seconds (the `Server-Timing` answer
    header). Written by the forward thread before it hands the request its answer, so read it
    once `submit` has returned."""

    queued: float = 0.0  # from queueing its rows to the start of the first forward that held one
    forward: float = 0.0  # from that start to the end of the last forward that held one
    batch_rows: int = 0  # rows in the largest of those forwards (its own and other requests')


@dataclass(eq=False)
class _Request:
    future: asyncio.Future[list[Prediction]]
    deadline: float  # time.monotonic() after which the request is failed, not run
    results: list[Prediction | None]
    remaining: int
    queued_at: float  # time.monotonic() when its rows were queued
    timing: Timing | None = None
    first_forward: float | None = None  # time.monotonic() when its first forward started
    # True once the request is over: set by `submit` as it returns (answered, failed, timed out,
    # cancelled), and by the forward thread as it fails the request's batch or finds it late. The
    # forward thread reads it to skip the request's queued rows (a plain attribute: no lock needed).
    over: bool = False
    # Its rows still in the queue that count in `queue_depth` (guarded by the scheduler's lock):
    # 0 once `submit` lets the request go, though its rows stay queued until the thread skips them.
    waiting: int = 0


@dataclass(eq=False)
class _Row:
    request: _Request
    index: int  # position in the request's inputs
    item: ClassifyItem


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
        between_batches: Callable[[bool], object] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be positive, max_wait_s >= 0")
        self._classify = classify
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._between_batches = between_batches  # on the forward thread; its argument: no rows waiting
        self._queue: deque[_Row] = deque()  # guarded by _ready's lock
        self._waiting = 0  # rows in _queue of requests not over yet: queue_depth (guarded by the lock too)
        self._ready = threading.Condition()  # notified when rows arrive and on stop()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    @property
    def queue_depth(self) -> int:
        """Rows waiting for a forward (not counting the batch in flight, nor the rows of requests
        already over, which the forward thread skips when it reaches them)."""
        return self._waiting

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("scheduler already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="adaptserve-forward", daemon=True)
        self._thread.start()

    async def submit(self, items: Sequence[ClassifyItem], deadline: float, timing: Timing | None = None) -> list[Prediction]:
        """Queue `items` as one request and wait for their predictions.

        `deadline` is in `asyncio.get_running_loop().time()` units. Raises Overloaded when the
        queue cannot take every row, DeadlineExceeded when the deadline passes first,
        ShuttingDown after stop(). Cancelling the caller drops its rows that have not run yet.
        `timing`, when given, is filled in as the request's rows run.
        """
        if self._stopping or not self.running:
            raise ShuttingDown("server is shutting down" if self._stopping else "scheduler is not running")
        if not items:
            return []
        loop = asyncio.get_running_loop()
        timeout = max(0.0, deadline - loop.time())
        now = time.monotonic()  # the forward thread's clock (a loop's clock may be its own)
        request = _Request(loop.create_future(), now + timeout, [None] * len(items), len(items), now, timing,
                           waiting=len(items))
        with self._ready:
            if len(self._queue) + len(items) > self.max_queue:
                self._drop_rows_let_go()
            if len(self._queue) + len(items) > self.max_queue:
                raise Overloaded(
                    f"server is overloaded ({self._waiting} rows queued, limit {self.max_queue}); retry later"
                )
            self._queue.extend(_Row(request, i, item) for i, item in enumerate(items))
            self._waiting += len(items)
            self._ready.notify()
        try:
            # asyncio.wait neither cancels the future on timeout nor delays our own cancellation,
            # so a caller that goes away marks its rows dead in this very step.
            await asyncio.wait({request.future}, timeout=timeout)
            if not request.future.done():
                _fail(request, DeadlineExceeded("request deadline exceeded before its predictions were ready"))
            return request.future.result()
        finally:
            # Client gone: its rows still queued are skipped when the forward thread reaches them.
            request.over = True
            if request.waiting:  # rows still queued (an answered request's were all taken: no lock needed)
                with self._ready:
                    self._waiting -= request.waiting
                    request.waiting = 0
            if not request.future.done():
                request.future.cancel()

    def _drop_rows_let_go(self) -> None:
        """Under the lock: take out the queued rows of requests already let go (timed out, client
        gone), which the forward thread would skip. While a long forward holds the thread, they
        would otherwise fill the bounded queue and refuse live requests with 429s."""
        if self._waiting < len(self._queue):
            live = [row for row in self._queue if row.request.waiting]
            self._queue.clear()
            self._queue.extend(live)

    async def stop(self) -> None:
        """Stop taking requests, finish every queued and in-flight row, then return."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # -- the forward thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                if batch:
                    self._forward(batch)
        except Exception:  # a bug, not a failed forward (those fail their own batch and go on)
            log.exception("the batching loop stopped on a bug; requests now get 503")

    def _next_batch(self) -> list[_Row] | None:
        """Wait for rows, let the batch fill until it is full or its first row has waited
        max_wait_s (while stopping, flush what is there at once), and take it. None: stopped
        and drained."""
        if self._between_batches is not None:
            self._between_batches(not self._queue)  # a racy peek, outside the lock: a hint
        with self._ready:
            while not self._queue:
                if self._stopping:
                    return None
                self._ready.wait()
            close_at = self._queue[0].request.queued_at + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._stopping:
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            batch, late = self._take_batch(time.monotonic())
        if late:
            self._deliver_failure(late, DeadlineExceeded("request deadline exceeded while queued"))
        return batch

    def _take_batch(self, now: float) -> tuple[list[_Row], list[_Request]]:
        batch: list[_Row] = []
        late: list[_Request] = []
        while self._queue and len(batch) < self.max_batch_size:
            row = self._queue.popleft()
            request = row.request
            if request.waiting:  # not let go by `submit` yet: it counted in queue_depth until now
                request.waiting -= 1
                self._waiting -= 1
            if request.over:  # answered, cancelled, timed out or failed in an earlier batch
                continue
            if now >= request.deadline:
                request.over = True
                late.append(request)
                continue
            batch.append(row)
        return batch, late

    def _forward(self, batch: list[_Row]) -> None:
        items = [row.item for row in batch]
        started = time.perf_counter()
        started_at = time.monotonic()
        try:
            predictions = self._classify(items)
            if len(predictions) != len(items):
                raise RuntimeError(f"engine returned {len(predictions)} predictions for {len(items)} rows")
        except AdaptserveError as err:
            self._deliver_failure([row.request for row in batch], err)
            return
        except Exception as err:
            log.exception("forward of a batch of %d rows failed", len(items))
            failure = InferenceFailed(f"inference failed: {type(err).__name__}: {err}")
            self._deliver_failure([row.request for row in batch], failure)
            return
        finally:
            if self._on_batch is not None:
                self._on_batch(len(items), time.perf_counter() - started)
        _time(batch, started_at, time.monotonic())
        self._call(_deliver, batch, predictions)

    def _deliver_failure(self, requests: list[_Request], error: BaseException) -> None:
        for request in requests:
            request.over = True
        self._call(_fail_all, requests, error)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting for these answers any more
            pass


def _time(batch: list[_Row], started: float, ended: float) -> None:
    """On the forward thread: note this forward in the timing of each request it served."""
    for request in {id(row.request): row.request for row in batch}.values():
        timing = request.timing
        if timing is None:
            continue
        if request.first_forward is None:
            request.first_forward = started
            timing.queued = started - request.queued_at
        timing.forward = ended - request.first_forward
        timing.batch_rows = max(timing.batch_rows, len(batch))


def _deliver(batch: list[_Row], predictions: list[Prediction | AdaptserveError]) -> None:
    """On the event loop: hand each row's prediction to its request; complete finished requests.
    A row answered with an error fails its request (its rows still queued are then skipped)."""
    for row, prediction in zip(batch, predictions):
        request = row.request
        if request.future.done():
            continue
        if isinstance(prediction, AdaptserveError):
            request.over = True
            _fail(request, prediction)
            continue
        request.results[row.index] = prediction
        request.remaining -= 1
        if request.remaining == 0:
            request.future.set_result(request.results)  # type: ignore[arg-type]


def _fail_all(requests: list[_Request], error: BaseException) -> None:
    for request in requests:
        _fail(request, error)


def _fail(request: _Request, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)
