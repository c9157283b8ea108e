"""Running async tests without a pytest plugin: each test gets a fresh loop from asyncio.run,
so nothing (tasks, executors, loop state) leaks from one test into the next, and a hung test
fails after TEST_TIMEOUT_S instead of hanging the suite."""
from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, Coroutine

TEST_TIMEOUT_S = 10.0


def async_test(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Decorator: run an `async def test_...` (fixtures and parametrize still apply) in asyncio.run."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT_S))

    return run


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll `condition` on the loop until it holds; fail the test if it never does."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not condition():
        if loop.time() > give_up:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.001)
