"""`async def` workflows and steps: on dbos_nb's own loop, many in flight on few threads."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from conftest import config, wait_until
from dbos_nb import (
    DBOS,
    DBOSClient,
    DBOSNonExistentWorkflowError,
    EnqueueOptions,
    Queue,
    RateLimited,
    SetWorkflowID,
    UnknownQueueError,
    WorkflowHandleAsync,
    WorkflowPreempted,
)


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


# -- cancelling the caller of a directly-called async workflow ----------------------------------


async def _wait_for_event(event: threading.Event, limit: float = 20.0) -> None:
    """Await a thread-safe event without blocking the running loop (bounded)."""
    deadline = time.monotonic() + limit
    while not event.is_set():
        assert time.monotonic() < deadline, "event never set"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("way", ["wait_for", "task_group", "task_cancel", "child_wait_for"])
def test_cancelling_the_caller_does_not_cancel_the_workflow(launched: str, way: str) -> None:
    """The caller's cancellation (wait_for's timeout, a failing sibling in a TaskGroup,
    task.cancel(), a parent workflow giving up on a child) stops only its waiting: the
    workflow runs on dbos_nb's loop, finishes in this process and records its result."""
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []
    ran_as: list[str | None] = []

    @DBOS.step()
    async def before() -> str:
        calls.append("before")
        return "b"

    @DBOS.step()
    async def gate() -> str:
        calls.append("gate")
        started.set()
        await _wait_for_event(release)
        return "g"

    @DBOS.step()
    async def after() -> str:
        calls.append("after")
        return "a"

    @DBOS.workflow()
    async def guarded(tag: str) -> str:
        ran_as.append(DBOS.workflow_id)
        return tag + (await before()) + (await gate()) + (await after())

    @DBOS.workflow()
    async def impatient_parent() -> str:
        try:
            await asyncio.wait_for(guarded("x"), 0.05)
        except TimeoutError:
            return "gave up"
        return "waited"

    async def sibling_fails() -> None:
        await _wait_for_event(started)
        raise ValueError("sibling failed")

    async def cancel_the_caller() -> None:
        if way == "wait_for":
            with SetWorkflowID("cancel-caller"), pytest.raises(TimeoutError):
                await asyncio.wait_for(guarded("x"), 0.05)
        elif way == "task_group":
            with pytest.raises(ExceptionGroup) as caught:
                async with asyncio.TaskGroup() as tg:
                    with SetWorkflowID("cancel-caller"):
                        tg.create_task(guarded("x"))
                    tg.create_task(sibling_fails())
            assert caught.group_contains(ValueError)
        elif way == "task_cancel":
            with SetWorkflowID("cancel-caller"):
                task = asyncio.ensure_future(guarded("x"))
            await _wait_for_event(started)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with SetWorkflowID("cancel-parent"):
                assert await impatient_parent() == "gave up"

    asyncio.run(cancel_the_caller())
    release.set()
    wait_until(lambda: len(ran_as) == 1 and started.is_set())
    wid = ran_as[0]
    assert wid is not None
    if way != "child_wait_for":
        assert wid == "cancel-caller"
    # It finishes in this process: its result is recorded and every step ran once.
    assert DBOS.retrieve_workflow(wid).get_result(timeout_sec=20) == "xbga"
    assert DBOS.get_workflow_status(wid).status == "SUCCESS"  # type: ignore[union-attr]
    assert calls == ["before", "gate", "after"]
    assert [s.output for s in DBOS.list_workflow_steps(wid)] == ["b", "g", "a"]

    async def call_again() -> str:
        with SetWorkflowID(wid):
            return await guarded("x")

    assert asyncio.run(call_again()) == "xbga"
    assert calls == ["before", "gate", "after"]
    assert len(ran_as) == 1


def test_destroy_stops_a_directly_called_async_workflow_and_relaunch_resumes_it(
    launched: str,
) -> None:
    """DBOS.destroy() still stops an async workflow that a caller awaits (the caller is told
    that the shutdown stopped it, not a bare CancelledError); the next launch resumes it from
    its last step."""
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []
    outcome: list[BaseException | str] = []

    @DBOS.step(name="destroyed_first")
    async def first() -> str:
        calls.append("first")
        return "1"

    @DBOS.step(name="destroyed_gate")
    async def gate() -> str:
        calls.append("gate")
        started.set()
        await _wait_for_event(release)
        return "2"

    @DBOS.workflow(name="destroyed_wf")
    async def stopped() -> str:
        return (await first()) + (await gate())

    async def caller() -> str:
        with SetWorkflowID("destroyed-1"):
            return await stopped()

    def run_caller() -> None:
        try:
            outcome.append(asyncio.run(caller()))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run_caller)
    thread.start()
    assert started.wait(20)
    DBOS.destroy()
    thread.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], WorkflowPreempted)
    assert outcome[0].reason == "shutdown" and "resumes" in str(outcome[0])
    release.set()
    DBOS(config=config(launched))
    DBOS.launch()
    assert DBOS.retrieve_workflow("destroyed-1").get_result(timeout_sec=20) == "12"
    assert calls == ["first", "gate", "gate"]  # the interrupted step runs again, not the first


# -- awaitable handles of the async API -----------------------------------------------------------


def test_start_workflow_async_and_retrieve_workflow_async_give_awaitable_handles(
    launched: str,
) -> None:
    release = threading.Event()

    @DBOS.workflow()
    async def held(x: int) -> int:
        await _wait_for_event(release)
        return 2 * x

    @DBOS.workflow()
    def fails(x: int) -> int:
        raise ValueError(f"bad {x}")

    async def releaser() -> None:
        await asyncio.sleep(0.01)  # runs only if the awaited get_result leaves the loop free
        release.set()

    async def caller() -> None:
        handle = await DBOS.start_workflow_async(held, 21)
        assert isinstance(handle, WorkflowHandleAsync)
        assert handle.get_workflow_id() == handle.workflow_id
        with pytest.raises(TimeoutError):
            await handle.get_result(timeout_sec=0.05)
        result, _ = await asyncio.gather(handle.get_result(polling_interval_sec=0.05), releaser())
        assert result == 42
        status = await handle.get_status()
        assert (status.workflow_id, status.status) == (handle.workflow_id, "SUCCESS")

        again = await DBOS.retrieve_workflow_async(handle.workflow_id)
        assert isinstance(again, WorkflowHandleAsync)
        assert await again.get_result() == 42
        assert await again.get_result_async() == 42  # the former spelling still works
        assert (await again.get_status_async()).status == "SUCCESS"

        failed = await DBOS.start_workflow_async(fails, 7)
        with pytest.raises(ValueError, match="bad 7"):
            await failed.get_result()
        assert (await failed.get_status()).status == "ERROR"

        with pytest.raises(DBOSNonExistentWorkflowError):
            await DBOS.retrieve_workflow_async("no-such-workflow")
        absent = await DBOS.retrieve_workflow_async("no-such-workflow", existing_workflow=False)
        with pytest.raises(DBOSNonExistentWorkflowError):
            await absent.get_status()
        with pytest.raises(DBOSNonExistentWorkflowError):
            await absent.get_result()

    asyncio.run(caller())


def test_enqueue_async_gives_awaitable_handles(launched: str) -> None:
    q = Queue("async_handles")
    release = threading.Event()

    @DBOS.workflow()
    async def held(x: int) -> int:
        await _wait_for_event(release)
        if x < 0:
            raise ValueError(f"negative {x}")
        return x + 1

    async def caller() -> None:
        handle = await q.enqueue_async(held, 1)
        failing = await q.enqueue_async(held, -1)
        assert isinstance(handle, WorkflowHandleAsync)
        with pytest.raises(TimeoutError):
            await handle.get_result(timeout_sec=0.05)
        release.set()
        assert await handle.get_result(polling_interval_sec=0.05) == 2
        with pytest.raises(ValueError, match="negative -1"):
            await failing.get_result(polling_interval_sec=0.05)
        status = await failing.get_status()
        assert (status.status, status.queue_name) == ("ERROR", "async_handles")

    asyncio.run(caller())


def test_enqueue_workflow_async_by_queue_name(launched: str) -> None:
    """DBOS.enqueue_workflow_async, as in DBOS: the queue by name, an awaitable handle, the
    same refusal of a queue nobody declared."""
    Queue("async_by_name")

    @DBOS.workflow()
    async def doubled(x: int) -> int:
        return 2 * x

    async def caller() -> tuple[Any, int, str | None]:
        handle = await DBOS.enqueue_workflow_async("async_by_name", doubled, 21)
        status = await handle.get_status()
        with pytest.raises(UnknownQueueError, match="async_nowhere"):
            await DBOS.enqueue_workflow_async("async_nowhere", doubled, 1)
        return handle, await handle.get_result(polling_interval_sec=0.05), status.queue_name

    handle, value, queue_name = asyncio.run(caller())
    assert isinstance(handle, WorkflowHandleAsync)
    assert (value, queue_name) == (42, "async_by_name")


def test_client_enqueue_async_and_retrieve_workflow_async(launched: str) -> None:
    Queue("client_async_q")
    release = threading.Event()

    @DBOS.workflow(name="client_async_wf")
    async def held(x: int) -> int:
        await _wait_for_event(release)
        if x < 0:
            raise ValueError(f"negative {x}")
        return 10 * x

    async def caller(client: DBOSClient) -> None:
        options: EnqueueOptions = {
            "queue_name": "client_async_q",
            "workflow_name": "client_async_wf",
        }
        handle = await client.enqueue_async(options, 4)
        failing = await client.enqueue_async({**options, "workflow_id": "client-async-bad"}, -4)
        assert isinstance(handle, WorkflowHandleAsync)
        with pytest.raises(TimeoutError):
            await handle.get_result(timeout_sec=0.05)
        release.set()
        assert await handle.get_result(polling_interval_sec=0.05) == 40
        assert (await handle.get_status()).status == "SUCCESS"
        found = await client.retrieve_workflow_async("client-async-bad")
        assert isinstance(found, WorkflowHandleAsync)
        with pytest.raises(ValueError, match="negative -4"):
            await found.get_result(polling_interval_sec=0.05)
        assert (await failing.get_status()).status == "ERROR"
        with pytest.raises(DBOSNonExistentWorkflowError):
            await client.retrieve_workflow_async("no-such-workflow")

    with DBOSClient(launched) as client:
        asyncio.run(caller(client))


def test_an_awaited_handle_is_woken_by_the_completion(
    launched: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`await handle.get_result()` is woken by the workflow's completion, as a blocked thread
    is: with the polling fallback made an hour long, the result still arrives."""
    from dbos_nb.core import waiters

    release = threading.Event()

    @DBOS.workflow()
    def held(x: int) -> int:
        release.wait(30)
        return x * 2

    monkeypatch.setattr(waiters._Poll, "next_wait", lambda _self: 3600.0)

    async def wait_for_it() -> list[int]:
        handles = [await Queue("async_woken").enqueue_async(held, i) for i in (1, 2)]
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, release.set)
        return list(await asyncio.wait_for(asyncio.gather(*(h.get_result() for h in handles)), 30))

    assert asyncio.run(wait_for_it()) == [2, 4]
