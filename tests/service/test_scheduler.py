from __future__ import annotations

import asyncio
import threading
import time
from typing import Sequence

import pytest

from service.engine.types import ClassifyItem, Prediction, TaskKey
from service.errors import DeadlineExceeded, InferenceFailed, InvalidInput, Overloaded, ShuttingDown
from service.scheduler import Scheduler, Timing
from tests.aio import async_test, wait_until
from tests.fakes import FakeTask

TASK = FakeTask(TaskKey("t", "v1"), ["x"])
FAR = 1e9  # a deadline that never passes


class Echo:
    """A forward that labels each row with its own text and records batches."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate: threading.Event | None = None
        self.in_forward = threading.Event()
        self.wrong_count = False

    def __call__(self, items: Sequence[ClassifyItem]) -> list[Prediction]:
        self.in_forward.set()
        if self.gate is not None:
            assert self.gate.wait(5), "gate never opened"
        texts = [item.text for item in items]
        self.batches.append(texts)
        if "boom" in texts:
            raise RuntimeError("boom")
        if "bad" in texts:
            raise InvalidInput("the engine refused this row")
        predictions = [Prediction(label=text, score=1.0, scores={text: 1.0}, version="v1") for text in texts]
        return predictions[:-1] if self.wrong_count else predictions

    def seen(self) -> set[str]:
        return {text for batch in self.batches for text in batch}


def rows(*texts: str) -> list[ClassifyItem]:
    return [ClassifyItem(task=TASK, text=text) for text in texts]


def labels(predictions: list[Prediction]) -> list[str]:
    return [p.label for p in predictions]


async def started(echo: Echo, **kwargs) -> Scheduler:
    options = dict(max_batch_size=32, max_wait_s=0.0, max_queue=1024) | kwargs
    scheduler = Scheduler(echo, **options)
    await scheduler.start()
    return scheduler


async def blocked_in_forward(scheduler: Scheduler, echo: Echo, *texts: str) -> asyncio.Future:
    """Submit one request (default: one row, "first") and hold its forward at the gate."""
    echo.gate = threading.Event()
    first = asyncio.ensure_future(scheduler.submit(rows(*(texts or ("first",))), FAR))
    await wait_until(echo.in_forward.is_set)
    return first


@async_test
async def test_full_batches_go_without_waiting() -> None:
    echo = Echo()
    scheduler = await started(echo, max_batch_size=4, max_wait_s=60.0)  # a wait the test would notice
    result = await scheduler.submit(rows(*"abcdefgh"), FAR)
    assert labels(result) == list("abcdefgh")
    assert echo.batches == [list("abcd"), list("efgh")]
    await scheduler.stop()


@async_test
async def test_a_partial_batch_goes_after_max_wait() -> None:
    echo = Echo()
    scheduler = await started(echo, max_batch_size=4, max_wait_s=0.01)
    result = await scheduler.submit(rows(*"abcdefghij"), FAR)  # spans three batches
    assert labels(result) == list("abcdefghij")
    assert echo.batches == [list("abcd"), list("efgh"), list("ij")]
    await scheduler.stop()


@async_test
async def test_concurrent_requests_share_a_batch_and_get_their_own_rows() -> None:
    echo = Echo()
    scheduler = await started(echo, max_batch_size=6, max_wait_s=60.0)  # only a full batch can go
    one, two, three = await asyncio.gather(
        scheduler.submit(rows("a", "b"), FAR),
        scheduler.submit(rows("c"), FAR),
        scheduler.submit(rows("d", "e", "f"), FAR),
    )
    assert (labels(one), labels(two), labels(three)) == (["a", "b"], ["c"], ["d", "e", "f"])
    assert echo.batches == [list("abcdef")]
    await scheduler.stop()


@async_test
async def test_the_next_batch_starts_while_the_event_loop_is_busy() -> None:
    """The forward thread takes its next batch itself: a loop stuck in other work (parsing
    requests, writing answers) does not leave it idle while rows are queued."""
    echo = Echo()
    scheduler = await started(echo, max_batch_size=2)
    answer = asyncio.ensure_future(scheduler.submit(rows(*"abcdef"), FAR))  # three batches
    await asyncio.sleep(0)  # the request is queued
    busy_until = time.monotonic() + 5
    while len(echo.batches) < 3 and time.monotonic() < busy_until:
        time.sleep(0.005)  # the event loop is blocked: only the forward thread can move
    assert echo.batches == [list("ab"), list("cd"), list("ef")]
    assert labels(await answer) == list("abcdef")
    await scheduler.stop()


@async_test
async def test_a_bug_in_the_batching_loop_stops_it_and_later_requests_are_refused() -> None:
    def broken(rows: int, seconds: float) -> None:
        raise RuntimeError("observer bug")

    scheduler = await started(Echo(), on_batch=broken)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded):  # its batch ran, but the loop died before answering
        await scheduler.submit(rows("a"), loop.time() + 0.2)
    await wait_until(lambda: not scheduler.running)
    with pytest.raises(ShuttingDown, match="scheduler is not running"):
        await scheduler.submit(rows("b"), FAR)


@async_test
async def test_batch_observer_sees_every_forward() -> None:
    seen: list[int] = []
    echo = Echo()
    scheduler = await started(echo, max_batch_size=3, on_batch=lambda n, seconds: seen.append(n))
    await scheduler.submit(rows(*"abcde"), FAR)
    assert seen == [3, 2]
    await scheduler.stop()


@async_test
async def test_the_forward_thread_says_between_batches_whether_rows_wait() -> None:
    seen: list[bool] = []
    echo = Echo()
    echo.gate = threading.Event()
    scheduler = await started(echo, max_batch_size=2, between_batches=seen.append)
    await wait_until(lambda: seen == [True])  # started, nothing queued
    first = asyncio.ensure_future(scheduler.submit(rows("a"), FAR))
    await wait_until(echo.in_forward.is_set)
    second = asyncio.ensure_future(scheduler.submit(rows("b", "c"), FAR))  # queued behind the forward
    await wait_until(lambda: scheduler.queue_depth == 2)
    echo.gate.set()
    await asyncio.gather(first, second)
    await wait_until(lambda: len(seen) == 3)
    assert seen == [True, False, True]  # after the first forward, two rows were waiting
    await scheduler.stop()


@async_test
async def test_rows_past_their_deadline_fail_and_never_run() -> None:
    echo = Echo()
    scheduler = await started(echo)
    first = await blocked_in_forward(scheduler, echo)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded):
        await scheduler.submit(rows("late"), loop.time() + 0.02)
    with pytest.raises(DeadlineExceeded):
        await scheduler.submit(rows("already-late"), loop.time() - 1.0)
    echo.gate.set()
    assert labels(await first) == ["first"]
    assert labels(await scheduler.submit(rows("after"), FAR)) == ["after"]
    assert "late" not in echo.seen() and "already-late" not in echo.seen()
    assert scheduler.queue_depth == 0
    await scheduler.stop()


@async_test
async def test_cancelled_requests_are_dropped_before_their_forward() -> None:
    echo = Echo()
    scheduler = await started(echo)
    first = await blocked_in_forward(scheduler, echo)
    gone = asyncio.ensure_future(scheduler.submit(rows("gone", "gone-too"), FAR))
    await wait_until(lambda: scheduler.queue_depth == 2)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)  # let the cancellation land
    assert scheduler.queue_depth == 0  # its rows wait for nothing now, though the thread has not skipped them yet
    echo.gate.set()
    await first
    assert labels(await scheduler.submit(rows("after"), FAR)) == ["after"]
    assert gone.cancelled()
    assert echo.seen() == {"first", "after"}
    await scheduler.stop()


@async_test
async def test_a_failing_forward_fails_only_its_own_batch() -> None:
    echo = Echo()
    scheduler = await started(echo, max_batch_size=1)
    bad, good = await asyncio.gather(
        scheduler.submit(rows("boom"), FAR), scheduler.submit(rows("fine"), FAR), return_exceptions=True
    )
    assert isinstance(bad, InferenceFailed) and "boom" in bad.message
    assert labels(good) == ["fine"]
    assert labels(await scheduler.submit(rows("later"), FAR)) == ["later"]  # the loop survived
    await scheduler.stop()


@async_test
async def test_requests_sharing_a_failing_batch_all_fail() -> None:
    echo = Echo()
    scheduler = await started(echo, max_batch_size=2, max_wait_s=60.0)  # only a full batch can go
    results = await asyncio.gather(
        scheduler.submit(rows("boom"), FAR), scheduler.submit(rows("fine"), FAR), return_exceptions=True
    )
    assert all(isinstance(result, InferenceFailed) for result in results)
    await scheduler.stop()


@async_test
async def test_engine_errors_of_the_service_hierarchy_keep_their_type() -> None:
    echo = Echo()
    scheduler = await started(echo)
    with pytest.raises(InvalidInput, match="refused"):
        await scheduler.submit(rows("bad"), FAR)
    await scheduler.stop()


@async_test
async def test_an_engine_returning_the_wrong_number_of_rows_fails_the_batch() -> None:
    echo = Echo()
    echo.wrong_count = True
    scheduler = await started(echo)
    with pytest.raises(InferenceFailed, match="1 predictions for 2 rows"):
        await scheduler.submit(rows("a", "b"), FAR)
    await scheduler.stop()


@async_test
async def test_a_full_queue_refuses_whole_requests_with_retry_after() -> None:
    echo = Echo()
    scheduler = await started(echo, max_batch_size=1, max_queue=3)
    first = await blocked_in_forward(scheduler, echo)  # its row has left the queue
    queued = asyncio.ensure_future(scheduler.submit(rows("a", "b", "c"), FAR))
    await wait_until(lambda: scheduler.queue_depth == 3)
    with pytest.raises(Overloaded) as refused:
        await scheduler.submit(rows("d"), FAR)
    assert refused.value.status_code == 429 and refused.value.headers["Retry-After"] == "1"
    echo.gate.set()
    assert labels(await first) == ["first"] and labels(await queued) == ["a", "b", "c"]
    assert "d" not in echo.seen()
    await scheduler.stop()


@async_test
async def test_rows_of_requests_already_over_neither_count_as_queued_nor_fill_the_queue() -> None:
    """A request that timed out during a long forward left its rows queued until the forward
    thread skipped them: adaptserve_queue_depth counted them, and the next requests got 429s
    from a queue where nothing waited."""
    echo = Echo()
    scheduler = await started(echo, max_batch_size=1, max_queue=3)
    first = await blocked_in_forward(scheduler, echo)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded):
        await scheduler.submit(rows("late-a", "late-b", "late-c"), loop.time() + 0.02)
    assert scheduler.queue_depth == 0
    queued = asyncio.ensure_future(scheduler.submit(rows("a", "b", "c"), FAR))  # room for these: not a 429
    await wait_until(lambda: scheduler.queue_depth == 3)
    with pytest.raises(Overloaded, match=r"\(3 rows queued, limit 3\)"):
        await scheduler.submit(rows("d"), FAR)
    echo.gate.set()
    assert labels(await first) == ["first"] and labels(await queued) == ["a", "b", "c"]
    assert not {"late-a", "late-b", "late-c", "d"} & echo.seen()
    assert scheduler.queue_depth == 0
    await scheduler.stop()


@async_test
async def test_stop_drains_queued_and_in_flight_work_then_refuses_new_requests() -> None:
    echo = Echo()
    scheduler = await started(echo, max_batch_size=2, max_wait_s=60.0)
    first = await blocked_in_forward(scheduler, echo, "first", "second")  # a full batch goes at once
    queued = [asyncio.ensure_future(scheduler.submit(rows(text), FAR)) for text in "abc"]
    await wait_until(lambda: scheduler.queue_depth == 3)
    stopping = asyncio.ensure_future(scheduler.stop())
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDown):
        await scheduler.submit(rows("late"), FAR)
    echo.gate.set()
    await stopping  # returns only once everything queued has run (max_wait ignored while stopping)
    assert labels(await first) == ["first", "second"]
    assert [labels(result) for result in await asyncio.gather(*queued)] == [["a"], ["b"], ["c"]]
    assert not scheduler.running


@async_test
async def test_submit_before_start_is_refused() -> None:
    scheduler = Scheduler(Echo(), max_batch_size=1, max_wait_s=0, max_queue=1)
    with pytest.raises(ShuttingDown, match="not running"):
        await scheduler.submit(rows("a"), FAR)


@async_test
async def test_timing_says_how_long_a_request_queued_and_ran() -> None:
    echo = Echo()
    scheduler = await started(echo, max_batch_size=4)
    first = await blocked_in_forward(scheduler, echo)
    waiting = Timing()
    second = asyncio.ensure_future(scheduler.submit(rows(*"abcdef"), FAR, waiting))  # two batches, after "first"
    await asyncio.sleep(0.05)
    echo.gate.set()
    assert labels(await second) == list("abcdef")
    await first
    assert echo.batches == [["first"], list("abcd"), list("ef")]
    assert waiting.queued >= 0.04  # it waited for the held forward
    assert 0 <= waiting.forward < waiting.queued  # both of its forwards ran at once after it
    assert waiting.batch_rows == 4
    await scheduler.stop()


@async_test
async def test_timing_is_optional_and_left_alone_for_a_failed_request() -> None:
    echo = Echo()
    scheduler = await started(echo)
    timing = Timing()
    with pytest.raises(InferenceFailed):
        await scheduler.submit(rows("boom"), FAR, timing)
    assert timing == Timing()  # no forward finished for it
    assert labels(await scheduler.submit(rows("fine"), FAR)) == ["fine"]
    await scheduler.stop()
