"""DBOS's bulk management calls: `cancel_workflows`, `resume_workflows`, `delete_workflows`
(and their `_async` twins, on DBOS and on DBOSClient): one transaction for all the ids."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conftest import wait_until
from dbos_nb import (
    DBOS,
    DBOSAwaitedWorkflowCancelledError,
    DBOSClient,
    DBOSNonExistentWorkflowError,
    Queue,
    SetWorkflowID,
    WorkflowActiveError,
    WorkflowHandle,
    WorkflowHandleAsync,
)

GATE = threading.Event()
RUNS: list[int] = []


@pytest.fixture(autouse=True)
def _reset(launched: str) -> object:
    """(After the launch, so that the gate opens before DBOS.destroy(): no workflow of this
    module is left holding a worker thread into the next test.)"""
    GATE.clear()
    RUNS.clear()
    yield
    GATE.set()


def _queue_of_held() -> tuple[object, Queue]:
    @DBOS.step(name="bulk_paid")
    def paid(i: int) -> int:
        RUNS.append(i)
        return i

    @DBOS.workflow(name="bulk_held")
    def held(i: int) -> int:
        GATE.wait(30)
        return paid(i)

    return held, Queue("bulk_q")


def _statuses(handles: list[WorkflowHandle[int]]) -> list[str]:
    return [h.get_status().status for h in handles]


def test_cancel_resume_and_delete_several_at_once(launched: str) -> None:
    held, queue = _queue_of_held()
    handles = [queue.enqueue(held, i) for i in range(4)]  # type: ignore[arg-type]
    ids = [h.workflow_id for h in handles]
    wait_until(lambda: _statuses(handles) == ["PENDING"] * 4)

    DBOS.cancel_workflows(ids[:3])
    assert _statuses(handles) == ["CANCELLED"] * 3 + ["PENDING"]
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        handles[0].get_result()

    # Resumed together, from their last completed step: each runs its step once.
    resumed = DBOS.resume_workflows(ids[:2])
    assert [h.workflow_id for h in resumed] == ids[:2]
    GATE.set()
    assert [h.get_result() for h in resumed] == [0, 1]
    assert handles[3].get_result() == 3
    assert sorted(RUNS) == [0, 1, 3]
    assert _statuses(handles) == ["SUCCESS", "SUCCESS", "CANCELLED", "SUCCESS"]

    DBOS.delete_workflows([ids[0], ids[2], "bulk-never-was"])  # an unknown id is no error
    assert [DBOS.get_workflow_status(w) is None for w in ids] == [True, False, True, False]
    assert DBOS.list_workflow_steps(ids[0]) == []


def test_a_bulk_delete_with_one_active_workflow_deletes_nothing(launched: str) -> None:
    held, queue = _queue_of_held()
    done = queue.enqueue(held, 1)  # type: ignore[arg-type]
    GATE.set()
    assert done.get_result() == 1
    GATE.clear()
    running = queue.enqueue(held, 2)  # type: ignore[arg-type]
    wait_until(lambda: running.get_status().status == "PENDING")
    with pytest.raises(WorkflowActiveError, match=running.workflow_id):
        DBOS.delete_workflows([done.workflow_id, running.workflow_id])
    assert done.get_status().status == "SUCCESS"
    assert [s.function_name for s in DBOS.list_workflow_steps(done.workflow_id)] == ["bulk_paid"]
    GATE.set()
    assert running.get_result() == 2


def test_a_bulk_resume_with_an_unknown_id_resumes_nothing(launched: str) -> None:
    held, queue = _queue_of_held()
    handle = queue.enqueue(held, 5)  # type: ignore[arg-type]
    wait_until(lambda: handle.get_status().status == "PENDING")
    DBOS.cancel_workflows([handle.workflow_id])
    with pytest.raises(DBOSNonExistentWorkflowError, match="bulk-ghost"):
        DBOS.resume_workflows([handle.workflow_id, "bulk-ghost"])
    assert handle.get_status().status == "CANCELLED"


@pytest.mark.parametrize(
    "call",
    [
        lambda: DBOS.cancel_workflows("one-id"),  # type: ignore[arg-type]
        lambda: DBOS.resume_workflows("one-id"),  # type: ignore[arg-type]
        lambda: DBOS.delete_workflows("one-id"),  # type: ignore[arg-type]
        lambda: DBOS.cancel_workflows(["ok", 7]),  # type: ignore[list-item]
        lambda: DBOS.delete_workflows(["ok", ""]),
    ],
)
def test_ids_must_be_a_list_of_strings(launched: str, call: object) -> None:
    """A lone string would otherwise be taken for a list of one-character ids."""
    with pytest.raises(TypeError, match=r"list of workflow ids|must be a non-empty string"):
        call()  # type: ignore[operator]


SINGLE_ID_CALLS = [
    "retrieve_workflow",
    "get_workflow_status",
    "list_workflow_steps",
    "cancel_workflow",
    "resume_workflow",
    "delete_workflow",
]


@pytest.mark.parametrize("bad", [5, None, ""])
def test_a_single_workflow_id_must_be_a_string(launched: str, bad: object) -> None:
    """Another type reached the database: a bare driver error on PostgreSQL, a silent "not
    found" on SQLite; `resume_workflow(None)` even returned a handle."""
    from dbos_nb import DBOSClient

    with DBOSClient(launched) as client:
        for owner, label in ((DBOS, "DBOS"), (client, "DBOSClient")):
            for name in SINGLE_ID_CALLS:
                with pytest.raises(TypeError, match=rf"{label}\.{name} takes a workflow id"):
                    getattr(owner, name)(bad)
            with pytest.raises(TypeError, match=rf"{label}\.fork_workflow takes a workflow id"):
                owner.fork_workflow(bad, 1)  # type: ignore[attr-defined]
            with pytest.raises(TypeError, match=rf"{label}\.delete_queue takes a queue name"):
                owner.delete_queue(bad)  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match=r"DBOS\.get_result takes a workflow id"):
            DBOS.get_result(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"DBOS\.enqueue_workflow takes a queue name"):
            DBOS.enqueue_workflow(bad, print)  # type: ignore[arg-type]


def test_workflow_code_records_a_bulk_cancel_once(launched: str) -> None:
    """In workflow code a bulk call is one operation, under DBOS's name: a replay (a fork
    from after it) does not cancel again, which would cancel the resumed workflows."""
    held, queue = _queue_of_held()
    victims = [queue.enqueue(held, i) for i in (7, 8)]  # type: ignore[arg-type]
    ids = [h.workflow_id for h in victims]
    wait_until(lambda: _statuses(victims) == ["PENDING"] * 2)

    @DBOS.workflow(name="bulk_canceller")
    def canceller(targets: list[str]) -> int:
        DBOS.cancel_workflows(targets)
        return len(targets)

    with SetWorkflowID("bulk-canceller"):
        assert canceller(ids) == 2
    assert _statuses(victims) == ["CANCELLED"] * 2
    (step,) = DBOS.list_workflow_steps("bulk-canceller")
    assert (step.function_id, step.function_name) == (1, "DBOS.cancelWorkflow")

    DBOS.resume_workflows(ids)
    wait_until(lambda: _statuses(victims) == ["PENDING"] * 2)
    assert DBOS.fork_workflow("bulk-canceller", 2).get_result() == 2
    assert _statuses(victims) == ["PENDING"] * 2  # the replay cancelled nothing
    GATE.set()
    assert [h.get_result() for h in victims] == [7, 8]


def test_async_twins_and_the_client(launched: str) -> None:
    held, queue = _queue_of_held()
    handles = [queue.enqueue(held, i) for i in (10, 11, 12)]  # type: ignore[arg-type]
    ids = [h.workflow_id for h in handles]
    wait_until(lambda: _statuses(handles) == ["PENDING"] * 3)

    async def with_dbos() -> list[WorkflowHandleAsync[int]]:
        await DBOS.cancel_workflows_async(ids[:1])
        return await DBOS.resume_workflows_async(ids[:1])

    (again,) = asyncio.run(with_dbos())
    assert isinstance(again, WorkflowHandleAsync) and again.workflow_id == ids[0]

    with DBOSClient(launched) as client:
        client.cancel_workflows(ids[1:])
        assert _statuses(handles)[1:] == ["CANCELLED"] * 2
        (resumed,) = client.resume_workflows(ids[1:2])
        assert resumed.workflow_id == ids[1]

        async def deleting() -> None:
            await client.delete_workflows_async(ids[2:])

        asyncio.run(deleting())
        assert client.retrieve_workflow(ids[1]).get_status().status in ("ENQUEUED", "PENDING")
        GATE.set()
        assert resumed.get_result() == 11
        with pytest.raises(DBOSNonExistentWorkflowError):
            client.retrieve_workflow(ids[2])
    assert handles[0].get_result() == 10


def test_children_of_several_roots_are_cancelled_and_deleted_with_them(launched: str) -> None:
    """`cancel_children` / `delete_children` reach the children of every root in the list,
    and nothing else: a workflow outside the families is left as it was."""
    held, queue = _queue_of_held()

    @DBOS.workflow(name="bulk_parent")
    def parent(i: int) -> int:
        with SetWorkflowID(f"bulk-child-{i}"):
            child = DBOS.start_workflow(held, i)
        result: int = child.get_result()
        return result

    parents = []
    for i in (1, 2):
        with SetWorkflowID(f"bulk-parent-{i}"):
            parents.append(DBOS.start_workflow(parent, i))
    outsider = queue.enqueue(held, 3)  # type: ignore[arg-type]
    kids = [DBOS.retrieve_workflow(f"bulk-child-{i}", existing_workflow=False) for i in (1, 2)]
    family = [*parents, *kids]
    wait_until(lambda: all(DBOS.get_workflow_status(h.workflow_id) is not None for h in kids))
    wait_until(lambda: _statuses([*family, outsider]) == ["PENDING"] * 5)

    DBOS.cancel_workflows([p.workflow_id for p in parents], cancel_children=True)
    assert _statuses([*family, outsider]) == ["CANCELLED"] * 4 + ["PENDING"]
    GATE.set()
    assert outsider.get_result() == 3
    for h in family:
        with pytest.raises(DBOSAwaitedWorkflowCancelledError):
            h.get_result()
    wait_until(lambda: not any(DBOS._rt().is_running(h.workflow_id) for h in family))
    assert RUNS == [3]  # no child ran its step after the cancel

    DBOS.delete_workflows([p.workflow_id for p in parents], delete_children=True)
    assert [DBOS.get_workflow_status(h.workflow_id) for h in family] == [None] * 4
    assert outsider.get_status().status == "SUCCESS"
