"""Children that a workflow enqueues (the DBOS tutorial's `process_tasks`), on both backends.

A child's row and its parent's record of it are written together: on PostgreSQL in one
statement, on SQLite in one transaction. A child on a queue without limits that this process
serves starts at once, as a top-level enqueue does. These tests check that the parent still
records each child once, in order, that a replay of the parent finds them instead of enqueueing
them again, and that a row that already exists under the child's id is not claimed as the
parent's child.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from dbos_nb import DBOS, DBOSAwaitedWorkflowCancelledError, Queue, SetWorkflowID
from dbos_nb.core.runtime import get_runtime
from dbos_nb.storage.store import NewWorkflow


def test_enqueued_children_run_once_and_a_resumed_parent_finds_them(launched: str) -> None:
    runs: Counter[int] = Counter()
    entered, release = threading.Event(), threading.Event()
    unlimited = Queue("ce_unlimited")
    limited = Queue("ce_limited", concurrency=1)

    @DBOS.step(name="ce_work")
    def work(x: int) -> int:
        runs[x] += 1
        return x * 10

    @DBOS.workflow(name="ce_child")
    def child(x: int) -> int:
        return work(x)

    @DBOS.step(name="ce_blocker")
    def blocker() -> None:
        entered.set()
        release.wait(20)

    @DBOS.workflow(name="ce_parent")
    def parent() -> list[int]:
        handles = [unlimited.enqueue(child, x) for x in (1, 2, 3)]
        handles += [limited.enqueue(child, x) for x in (4, 5)]
        blocker()
        return [h.get_result() for h in handles]

    with SetWorkflowID("ce-parent"):
        handle = DBOS.start_workflow(parent)
    assert entered.wait(20)
    DBOS.cancel_workflow("ce-parent")
    release.set()
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        handle.get_result()
    entered.clear()
    DBOS.resume_workflow("ce-parent")  # replays the five enqueues, runs the blocker again
    assert handle.get_result() == [10, 20, 30, 40, 50]

    assert runs == Counter({1: 1, 2: 1, 3: 1, 4: 1, 5: 1})
    kids = {w.workflow_id: w for w in DBOS.list_workflows(workflow_id_prefix="ce-parent-")}
    assert sorted(kids) == [f"ce-parent-{n}" for n in range(1, 6)]
    assert {w.queue_name for w in kids.values()} == {"ce_unlimited", "ce_limited"}
    assert all(w.status == "SUCCESS" and w.parent_workflow_id == "ce-parent" for w in kids.values())
    steps = DBOS.list_workflow_steps("ce-parent")
    assert [(s.function_id, s.function_name, s.child_workflow_id) for s in steps[:5]] == [
        (n, "ce_child", f"ce-parent-{n}") for n in range(1, 6)
    ]
    assert [s.function_name for s in steps[5:]] == ["ce_blocker"] + ["DBOS.getResult"] * 5


def _child_row(workflow_id: str, status: str, queue_name: str | None) -> NewWorkflow:
    return NewWorkflow(
        workflow_id=workflow_id,
        name="ce_row",
        inputs=b"",
        status=status,
        created_at=5,
        queue_name=queue_name,
        parent_workflow_id="ce-row-parent",
        parent_function_id=3,
    )


@pytest.mark.parametrize("status", ["ENQUEUED", "PENDING"])
def test_a_child_row_is_written_with_its_parents_record_or_not_at_all(
    launched: str, status: str
) -> None:
    store = get_runtime().store
    queue_name = "ce_row_queue" if status == "ENQUEUED" else None
    assert store.insert_workflow(_child_row("ce-row-child", status, queue_name)) is None
    assert store.get_workflow("ce-row-child")["status"] == status
    recorded = store.list_steps("ce-row-parent")
    assert [(r["function_id"], r["function_name"], r["child_workflow_id"]) for r in recorded] == [
        (3, "ce_row", "ce-row-child")
    ]
    assert recorded[0]["started_at_epoch_ms"] == recorded[0]["completed_at_epoch_ms"] == 5

    # The same write again (a retried enqueue): the existing row, and the one record.
    existing = store.insert_workflow(_child_row("ce-row-child", status, queue_name))
    assert existing is not None and existing["workflow_uuid"] == "ce-row-child"
    assert len(store.list_steps("ce-row-parent")) == 1

    # An id that another write holds already (here a workflow of no parent) is not recorded
    # as this parent's child: the existing row comes back instead.
    store.insert_workflow(
        NewWorkflow("ce-row-taken", "ce_row", b"", status, 5, queue_name=queue_name)
    )
    taken = _child_row("ce-row-taken", status, queue_name)
    taken.parent_function_id = 4
    existing = store.insert_workflow(taken)
    assert existing is not None and existing["parent_workflow_id"] is None
    assert [r["child_workflow_id"] for r in store.list_steps("ce-row-parent")] == ["ce-row-child"]


def test_a_child_started_at_once_is_recorded_with_its_row(launched: str) -> None:
    """The direct start (a queue without limits, served here) writes the row already started
    and the parent's record in the same write."""
    store = get_runtime().store
    Queue("ce_direct_rows")
    row = _child_row("ce-direct-child", "PENDING", "ce_direct_rows")
    row.owner_xid, row.executor_id = "ce-owner", "ce-executor"
    assert store.insert_started_if_unshared(row, 5)
    recorded = store.list_steps("ce-row-parent")
    assert [(r["function_id"], r["child_workflow_id"]) for r in recorded] == [
        (3, "ce-direct-child")
    ]
    # Written again by another execution (another owner, the next operation number): nothing,
    # and no record of a child that this write did not create.
    row.owner_xid, row.parent_function_id = "ce-other-owner", 4
    assert not store.insert_started_if_unshared(row, 5)
    assert len(store.list_steps("ce-row-parent")) == 1


def test_a_child_row_whose_record_fails_is_not_written(launched: str) -> None:
    """The row and the parent's record are one write: a record refused (here by a trigger)
    leaves no row behind, on PostgreSQL (one statement) and SQLite (one transaction)."""
    rt = get_runtime()
    if rt.db.is_postgres:
        ddl = [
            "CREATE FUNCTION dbos_nb.ce_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN IF NEW.workflow_uuid = 'ce-refused-parent' THEN "
            "RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER ce_refuse BEFORE INSERT ON dbos_nb.operation_outputs "
            "FOR EACH ROW EXECUTE FUNCTION dbos_nb.ce_refuse()",
        ]
    else:
        ddl = [
            "CREATE TRIGGER ce_refuse BEFORE INSERT ON operation_outputs "
            "WHEN NEW.workflow_uuid = 'ce-refused-parent' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        ]
    with rt.db.engine.begin() as conn:
        for statement in ddl:
            conn.execute(text(statement))
    for status, queue_name in (("ENQUEUED", "ce_refused_queue"), ("PENDING", None)):
        row = _child_row(f"ce-refused-{status}", status, queue_name)
        row.parent_workflow_id = "ce-refused-parent"
        with pytest.raises(DBAPIError, match="refused"):
            rt.store.insert_workflow(row)
        assert rt.store.get_workflow(f"ce-refused-{status}") is None
    assert rt.store.insert_workflow(_child_row("ce-refused-ok", "ENQUEUED", "q")) is None


def test_children_on_a_queue_without_limits_start_at_the_enqueue(
    launched: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like a top-level enqueue, without a claim: handed straight to this process's worker."""
    adopted: list[str] = []
    direct = get_runtime().direct
    assert direct is not None
    adopt = direct.adopt
    monkeypatch.setattr(
        direct,
        "adopt",
        lambda item, is_async: (adopted.append(item.workflow_id), adopt(item, is_async)),
    )
    unlimited, limited = Queue("ce_at_once"), Queue("ce_claimed", concurrency=2)

    @DBOS.workflow(name="ce_at_once_child")
    def child(x: int) -> int:
        return x

    @DBOS.workflow(name="ce_at_once_parent")
    def parent() -> int:
        handles = [unlimited.enqueue(child, x) for x in (1, 2)]
        handles.append(limited.enqueue(child, 3))
        return sum(h.get_result() for h in handles)

    # The worker learns that a queue has no limits from its first claim on it: until then an
    # enqueue writes the row ENQUEUED (see Scheduler._claim).
    assert unlimited.enqueue(child, 0).get_result() == 0
    adopted.clear()
    with SetWorkflowID("ce-at-once"):
        assert parent() == 6
    assert adopted == ["ce-at-once-1", "ce-at-once-2"]  # the limited queue's child was claimed
