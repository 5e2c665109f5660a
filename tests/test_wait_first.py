"""`DBOS.wait_first`: the handle of whichever workflow ends first, recorded in workflow code."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conftest import wait_until
from dbos_nb import (
    DBOS,
    DBOSAwaitedWorkflowCancelledError,
    DBOSClient,
    DBOSNonExistentWorkflowError,
    Queue,
    SetWorkflowID,
    WorkflowHandle,
)

GATES: dict[int, threading.Event] = {}


def _gated_workflows() -> tuple[object, Queue]:
    """A workflow that returns its number once its gate opens (or raises for a negative
    number), on a queue that runs them all at once."""

    @DBOS.workflow(name="wf_gated")
    def gated(i: int) -> int:
        GATES[i].wait(30)
        if i < 0:
            raise ValueError(f"item {i} failed")
        return i

    return gated, Queue("wait_first_q")


@pytest.fixture(autouse=True)
def _gates(request: pytest.FixtureRequest) -> object:
    """(The test's launch is made a dependency of this fixture, so that the gates open before
    DBOS.destroy(): no workflow of this module holds a worker thread into the next test.)"""
    for name in ("launched", "launched_pg"):
        if name in request.fixturenames:
            request.getfixturevalue(name)
    GATES.clear()
    yield
    for gate in GATES.values():  # nothing left waiting after a failed test
        gate.set()


def _enqueue(queue: Queue, gated: object, items: list[int]) -> list[WorkflowHandle[int]]:
    for i in items:
        GATES[i] = threading.Event()
    return [queue.enqueue(gated, i) for i in items]  # type: ignore[arg-type]


def _running(handles: list[WorkflowHandle[int]]) -> None:
    wait_until(lambda: all(h.get_status().status == "PENDING" for h in handles))


def test_results_come_in_the_order_the_workflows_end(launched: str) -> None:
    gated, queue = _gated_workflows()
    handles = _enqueue(queue, gated, [0, 1, 2, 3])
    _running(handles)
    pending = list(handles)
    order = [2, 0, 3, 1]
    seen = []
    for i in order:
        GATES[i].set()
        done = DBOS.wait_first(pending, polling_interval_sec=0.05)
        pending.remove(done)
        seen.append(done.get_result())
    assert seen == order
    assert all(type(h) is WorkflowHandle for h in handles)


def test_a_failure_or_a_cancellation_ends_the_wait(launched: str) -> None:
    gated, queue = _gated_workflows()
    blocked, failing, cancelled = _enqueue(queue, gated, [5, -1, 6])
    _running([blocked, failing, cancelled])
    GATES[-1].set()
    done = DBOS.wait_first([blocked, failing, cancelled], polling_interval_sec=0.05)
    assert done is failing
    with pytest.raises(ValueError, match="item -1 failed"):
        done.get_result()
    DBOS.cancel_workflow(cancelled.workflow_id)
    done = DBOS.wait_first([blocked, cancelled], polling_interval_sec=0.05)
    assert done is cancelled
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        done.get_result()
    assert blocked.get_status().status == "PENDING"


def test_of_workflows_already_ended_the_first_to_end_is_chosen(launched: str) -> None:
    gated, queue = _gated_workflows()
    first, second, third = _enqueue(queue, gated, [7, 8, 9])
    for i, handle in ((8, second), (7, first), (9, third)):
        GATES[i].set()
        assert handle.get_result() == i
        time.sleep(0.01)  # completion times some milliseconds apart
    # Not the first in the list, nor the last: the one that ended first.
    assert DBOS.wait_first([first, third, second]) is second
    assert DBOS.wait_first([third, first]) is first


def test_bad_arguments_are_refused(launched: str) -> None:
    gated, queue = _gated_workflows()
    (handle,) = _enqueue(queue, gated, [1])
    with pytest.raises(ValueError, match="must not be empty"):
        DBOS.wait_first([])
    with pytest.raises(ValueError, match="duplicate workflow IDs"):
        DBOS.wait_first([handle, DBOS.retrieve_workflow(handle.workflow_id)])
    with pytest.raises(TypeError, match="list of workflow handles"):
        DBOS.wait_first(handle)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes workflow handles, got 'wf-1'"):
        DBOS.wait_first([handle, "wf-1"])  # type: ignore[list-item]
    # While none has ended, a workflow that does not exist is refused: it would never end.
    ghost = DBOS.retrieve_workflow("wait-first-ghost", existing_workflow=False)
    with pytest.raises(DBOSNonExistentWorkflowError, match="wait-first-ghost"):
        DBOS.wait_first([handle, ghost])
    GATES[1].set()
    assert handle.get_result() == 1


def test_a_workflow_that_ends_and_is_deleted_between_looks_is_reported(
    launched: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One of the workflows ends and is deleted between two looks: no look will ever find it
    ended, so the wait must not go on for ever; a later look reads that it no longer exists."""
    from dbos_nb.core import waiters

    gated, queue = _gated_workflows()
    busy, fleeting = _enqueue(queue, gated, [70, 71])
    _running([busy, fleeting])
    monkeypatch.setattr(waiters, "_EXISTENCE_EVERY", 2)
    held, deleted = threading.Event(), threading.Event()
    pauses: list[int] = []

    def next_wait(_self: object) -> float:
        pauses.append(1)
        if len(pauses) == 1:  # between two looks: the workflow ends and goes meanwhile
            held.set()
            deleted.wait(10)
        return 0.05

    monkeypatch.setattr(waiters._FirstPoll, "next_wait", next_wait)
    outcome: list[BaseException | object] = []

    def wait() -> None:
        try:
            outcome.append(DBOS.wait_first([busy, fleeting]))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    assert held.wait(10)
    GATES[71].set()
    assert fleeting.get_result() == 71
    DBOS.delete_workflow(fleeting.workflow_id)
    deleted.set()
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], DBOSNonExistentWorkflowError)
    assert fleeting.workflow_id in str(outcome[0])
    GATES[70].set()
    assert busy.get_result() == 70


def test_workflow_code_records_which_workflow_ended_first(launched: str) -> None:
    gated, queue = _gated_workflows()
    waited_on = _enqueue(queue, gated, [10, 11])

    @DBOS.workflow(name="wf_first_of")
    def first_of(ids: list[str]) -> str:
        handles = [DBOS.retrieve_workflow(wid, existing_workflow=False) for wid in ids]
        return DBOS.wait_first(handles, polling_interval_sec=0.05).workflow_id

    ids = [h.workflow_id for h in waited_on]
    with SetWorkflowID("wf-waiter"):
        waiter = DBOS.start_workflow(first_of, ids)
    wait_until(lambda: waiter.get_status().status == "PENDING")
    GATES[11].set()
    assert waiter.get_result() == ids[1]
    (step,) = DBOS.list_workflow_steps("wf-waiter")
    assert (step.function_id, step.function_name, step.output) == (1, "DBOS.waitFirst", ids[1])

    # Once the winner is deleted, a new wait answers the other one; a replay of the recorded
    # wait (a fork from after it) answers the winner still, without reading anything.
    GATES[10].set()
    assert waited_on[0].get_result() == 10
    DBOS.delete_workflow(ids[1])
    assert DBOS.fork_workflow("wf-waiter", 2).get_result() == ids[1]
    assert DBOS.fork_workflow("wf-waiter", 1).get_result() == ids[0]


def test_async_callers_await_it(launched: str) -> None:
    gated, queue = _gated_workflows()
    for i in (20, 21):
        GATES[i] = threading.Event()

    async def from_a_cell() -> int:
        handles = [await queue.enqueue_async(gated, i) for i in (20, 21)]  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, GATES[21].set)
        done = await DBOS.wait_first_async(handles, polling_interval_sec=0.05)
        return int(await done.get_result())

    assert asyncio.run(from_a_cell()) == 21
    GATES[20].set()


def test_a_client_waits_for_the_first_too(launched: str) -> None:
    gated, queue = _gated_workflows()
    handles = _enqueue(queue, gated, [30, 31])
    _running(handles)
    with DBOSClient(launched, polling_interval_sec=0.05) as client:
        mine = [client.retrieve_workflow(h.workflow_id) for h in handles]
        threading.Timer(0.2, GATES[30].set).start()
        done = client.wait_first(mine)
        assert done is mine[0] and done.get_result() == 30

        async def awaited() -> str:
            theirs = [await client.retrieve_workflow_async(h.workflow_id) for h in handles]
            GATES[31].set()
            await handles_done(theirs[1].workflow_id)
            return (await client.wait_first_async(theirs[1:])).workflow_id

        async def handles_done(wid: str) -> None:
            await asyncio.to_thread(DBOS.retrieve_workflow(wid).get_result)

        assert asyncio.run(awaited()) == handles[1].workflow_id


def test_a_long_list_is_read_in_chunks(launched: str) -> None:
    """Ids beyond the first chunks of the read (500 a statement) count too."""

    @DBOS.workflow(name="wf_plain")
    def plain(i: int) -> int:
        return i

    parked = Queue("wait_first_parked", limiter={"limit": 1, "period": 3600})
    handles = parked.enqueue_many(plain, list(range(1100)))  # one start allowed: item 0
    assert handles[0].get_result() == 0
    last_first = handles[::-1]
    assert DBOS.wait_first(last_first) is handles[0]
    # While none has ended, an id that no workflow has is refused, wherever it is in the list.
    ghost = DBOS.retrieve_workflow("wait-first-ghost-1100", existing_workflow=False)
    with pytest.raises(DBOSNonExistentWorkflowError, match="ghost-1100"):
        DBOS.wait_first([*handles[1:], ghost])


@pytest.mark.parametrize("way", ["sync", "async"])
def test_a_finish_wakes_the_wait(launched: str, monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    """With the polling fallback made an hour long, only the finish's wake-up ends the wait."""
    from dbos_nb.core import waiters

    gated, queue = _gated_workflows()
    handles = _enqueue(queue, gated, [40, 41])
    _running(handles)
    monkeypatch.setattr(waiters._FirstPoll, "next_wait", lambda _self: 3600.0)
    threading.Timer(0.2, GATES[41].set).start()
    if way == "sync":
        done = DBOS.wait_first(handles)
    else:

        async def awaited() -> str:
            mine = [await DBOS.retrieve_workflow_async(h.workflow_id) for h in handles]
            first = await asyncio.wait_for(DBOS.wait_first_async(mine), 30)
            return first.workflow_id

        done = DBOS.retrieve_workflow(asyncio.run(awaited()))
    assert done.workflow_id == handles[1].workflow_id


def test_a_cancel_from_another_connection_wakes_the_wait(
    launched_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL another process's cancel (here a client's own connection) reaches the
    wait by notification: the polling fallback is an hour long."""
    from dbos_nb.core import waiters

    gated, queue = _gated_workflows()
    handles = _enqueue(queue, gated, [42, 43])
    _running(handles)
    monkeypatch.setattr(waiters._FirstPoll, "next_wait", lambda _self: 3600.0)
    with DBOSClient(launched_pg) as client:
        threading.Timer(0.2, client.cancel_workflow, args=(handles[0].workflow_id,)).start()
        assert DBOS.wait_first(handles) is handles[0]


def test_async_workflow_code_awaits_it_and_its_replay_answers_the_same(launched: str) -> None:
    """In an `async def` workflow: `await DBOS.wait_first_async(...)` is recorded, and the
    blocking `DBOS.wait_first` is refused (it would stop the loop the children run on)."""
    gated, queue = _gated_workflows()
    waited_on = _enqueue(queue, gated, [50, 51])
    ids = [h.workflow_id for h in waited_on]

    @DBOS.workflow(name="wf_async_first_of")
    async def first_of(ids: list[str]) -> str:
        handles = [await DBOS.retrieve_workflow_async(w, existing_workflow=False) for w in ids]
        try:
            DBOS.wait_first([DBOS.retrieve_workflow(w, existing_workflow=False) for w in ids])
        except RuntimeError as exc:
            assert "await wait_first_async" in str(exc)
        else:
            raise AssertionError("the blocking wait_first was not refused")
        return (await DBOS.wait_first_async(handles, polling_interval_sec=0.05)).workflow_id

    with SetWorkflowID("wf-async-waiter"):
        waiter = DBOS.start_workflow(first_of, ids)
    GATES[50].set()
    assert waiter.get_result() == ids[0]
    (step,) = DBOS.list_workflow_steps("wf-async-waiter")
    assert (step.function_name, step.output) == ("DBOS.waitFirst", ids[0])
    GATES[51].set()
    assert waited_on[1].get_result() == 51
    DBOS.delete_workflow(ids[0])
    assert DBOS.fork_workflow("wf-async-waiter", 2).get_result() == ids[0]


def test_inside_a_step_it_is_a_plain_call(launched: str) -> None:
    gated, queue = _gated_workflows()
    (handle,) = _enqueue(queue, gated, [60])
    GATES[60].set()

    @DBOS.step(name="st_waits_first")
    def waits(wid: str) -> str:
        return DBOS.wait_first([DBOS.retrieve_workflow(wid)]).workflow_id

    @DBOS.workflow(name="wf_step_waits_first")
    def outer(wid: str) -> str:
        return waits(wid)

    with SetWorkflowID("wf-step-waiter"):
        assert outer(handle.workflow_id) == handle.workflow_id
    steps = DBOS.list_workflow_steps("wf-step-waiter")
    assert [s.function_name for s in steps] == ["st_waits_first"]


def test_sync_code_on_the_async_loop_reads_an_ended_workflow_but_may_not_wait(
    launched: str,
) -> None:
    """Sync code that runs on dbos_nb's event loop (a sync helper called by an `async def`
    workflow) may read the result of a workflow that has ended, as before; only a wait that
    would block the loop (the workflow still runs) is refused, before anything is recorded."""
    gated, queue = _gated_workflows()
    ended, running = _enqueue(queue, gated, [60, 61])
    GATES[60].set()
    assert ended.get_result() == 60

    def sync_helper(workflow_id: str) -> int:
        result: int = DBOS.retrieve_workflow(workflow_id, existing_workflow=False).get_result()
        return result

    @DBOS.workflow(name="wf_async_sync_read")
    async def reader(done_id: str, busy_id: str) -> int:
        try:
            sync_helper(busy_id)
        except RuntimeError as exc:
            assert "await get_result_async" in str(exc)
        else:
            raise AssertionError("a blocking wait on the loop was not refused")
        return sync_helper(done_id)

    with SetWorkflowID("wf-async-sync-reader"):
        handle = DBOS.start_workflow(reader, ended.workflow_id, running.workflow_id)
    assert handle.get_result(timeout_sec=20) == 60
    # Only the read that ran is an operation of the workflow; the refused wait left none.
    steps = DBOS.list_workflow_steps("wf-async-sync-reader")
    assert [(s.function_name, s.output) for s in steps] == [("DBOS.getResult", 60)]
    GATES[61].set()
    assert running.get_result() == 61


def test_a_replay_on_the_async_loop_answers_from_the_record(launched: str) -> None:
    """Sync code of an async workflow read an ended workflow's outcome (recorded); that
    workflow was resumed since and runs again. The replay gets the recorded outcome: it is no
    wait, so it is not refused (it was, before 2026-12-03, with a RuntimeError)."""
    gated, queue = _gated_workflows()
    (child,) = _enqueue(queue, gated, [80])
    _running([child])
    DBOS.cancel_workflow(child.workflow_id)

    @DBOS.workflow(name="wf_async_replayed_read")
    async def reader(child_id: str) -> str:
        try:
            DBOS.retrieve_workflow(child_id, existing_workflow=False).get_result()
        except Exception as exc:
            return type(exc).__name__
        return "read"

    with SetWorkflowID("wf-async-replayed-read"):
        first = DBOS.start_workflow(reader, child.workflow_id).get_result(timeout_sec=20)
    assert first == "DBOSAwaitedWorkflowCancelledError"
    DBOS.resume_workflow(child.workflow_id)
    _running([child])  # it runs again: a fresh read on the loop would now be refused
    replay = DBOS.fork_workflow("wf-async-replayed-read", 2).get_result(timeout_sec=20)
    assert replay == first
    GATES[80].set()
    assert child.get_result() == 80
