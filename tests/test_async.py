"""`async def` workflows and steps: on dbos_nb's own loop, many in flight on few threads."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from dbos_nb import DBOS, Queue, RateLimited, SetWorkflowID


def test_async_workflow_with_async_steps_replays(launched: str) -> None:
    calls: list[int] = []
    loops: list[Any] = []

    @DBOS.step()
    async def fetch(i: int) -> int:
        loops.append(asyncio.get_running_loop())
        calls.append(i)
        await asyncio.sleep(0.01)
        return i * 10

    @DBOS.workflow()
    async def gather_all(n: int) -> list[int]:
        results = await asyncio.gather(*(fetch(i) for i in range(n)))
        await DBOS.sleep_async(0.01)
        return list(results)

    async def from_a_cell() -> tuple[list[int], list[int], Any]:
        with SetWorkflowID("async-1"):
            first = await gather_all(4)
        with SetWorkflowID("async-1"):
            again = await gather_all(4)  # recorded: nothing runs again
        return first, again, asyncio.get_running_loop()

    first, again, caller_loop = asyncio.run(from_a_cell())
    assert first == again == [0, 10, 20, 30]
    assert sorted(calls) == [0, 1, 2, 3]
    # Never the caller's loop (a kernel's loop stops running tasks when a cell ends).
    assert loops and all(loop is not caller_loop for loop in loops)
    steps = DBOS.list_workflow_steps("async-1")
    assert sorted(s.output for s in steps if s.function_name != "DBOS.sleep") == [0, 10, 20, 30]


def test_two_hundred_calls_in_flight_on_few_threads(launched: str) -> None:
    q = Queue("async_llm")
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    @DBOS.step()
    async def call(i: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        await asyncio.sleep(0.5)
        with lock:
            in_flight -= 1
        return i

    threads_before = threading.active_count()
    most_threads = threads_before
    handles = q.enqueue_many(call, range(200), batch_id="inflight")
    while not all(h.get_status().status == "SUCCESS" for h in handles[-5:]):
        most_threads = max(most_threads, threading.active_count())
        time.sleep(0.02)
    assert [h.get_result(timeout_sec=60) for h in handles] == list(range(200))
    assert peak >= 150  # they overlapped...
    assert most_threads - threads_before < 20  # ...without a thread each


def test_async_step_rate_limited_and_handles_async(launched: str) -> None:
    q = Queue("async_limited", concurrency=2)
    seen: list[int] = []

    @DBOS.step()
    async def flaky(i: int) -> int:
        seen.append(i)
        if seen.count(i) == 1:
            raise RateLimited("slow down", retry_after=0.2)
        return -i

    async def caller() -> list[int]:
        handles = [await q.enqueue_async(flaky, i) for i in range(3)]
        status = await handles[0].get_status_async()
        assert status.workflow_id == handles[0].workflow_id
        return [await h.get_result_async(timeout_sec=20) for h in handles]

    assert asyncio.run(caller()) == [0, -1, -2]
    assert sorted(seen) == [0, 0, 1, 1, 2, 2]


def test_async_workflow_started_and_awaited_from_sync_code(launched: str) -> None:
    @DBOS.workflow()
    async def slow_double(x: int) -> int:
        await DBOS.sleep_async(0.05)
        return 2 * x

    handle = DBOS.start_workflow(slow_double, 21)
    assert handle.get_result(timeout_sec=10) == 42

    @DBOS.workflow()
    async def forever() -> None:
        await DBOS.sleep_async(30)

    waiting = DBOS.start_workflow(forever)
    with pytest.raises(TimeoutError):
        asyncio.run(waiting.get_result_async(timeout_sec=0.05))
    DBOS.cancel_workflow(waiting.workflow_id)
    assert waiting.get_status().status == "CANCELLED"
