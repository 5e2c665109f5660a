"""`enqueue_many` inside a workflow: the batch is one operation of its parent, written in the
same transaction as the parent's record of it (and only by the execution that owns the parent),
so that no crash can leave a batch the parent's replay does not know of."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from conftest import wait_until
from dbos_nb import DBOS, Queue, SetWorkflowID
from dbos_nb.core.runtime import get_runtime
from dbos_nb.storage.schema import operation_outputs, workflow_status

RUNS: list[int] = []


@DBOS.workflow()
def triple(x: int) -> int:
    RUNS.append(x)
    return 3 * x


@DBOS.workflow()
def fan_out(xs: list[int]) -> list[int]:
    handles = Queue("in_wf").enqueue_many(triple, xs)
    return [h.get_result() for h in handles]


def _children_of(workflow_id: str) -> list[str]:
    rt = get_runtime()
    with rt.db.read() as conn:
        rows = conn.execute(
            sa.select(workflow_status.c.workflow_uuid)
            .where(workflow_status.c.workflow_uuid.like(f"{workflow_id}-%"))
            .order_by(workflow_status.c.workflow_uuid)
        )
        return list(rows.scalars())


def _refuse_records_naming(child_id: str, backend: str) -> list[str]:
    """DDL for a trigger that makes the database refuse the parent's record of the batch
    `child_id` (as a crash at that moment would leave it unwritten); and the DDL to drop it."""
    if backend == "sqlite":
        return [
            "CREATE TRIGGER refuse_record BEFORE INSERT ON operation_outputs "
            f"WHEN NEW.child_workflow_id = '{child_id}' "
            "BEGIN SELECT RAISE(ABORT, 'record refused by the test'); END",
        ]
    return [
        "CREATE FUNCTION dbos_nb.refuse_record() RETURNS trigger AS $$ BEGIN "
        f"IF NEW.child_workflow_id = '{child_id}' THEN "
        "RAISE EXCEPTION 'record refused by the test'; END IF; RETURN NEW; END $$ "
        "LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_record BEFORE INSERT ON dbos_nb.operation_outputs "
        "FOR EACH ROW EXECUTE FUNCTION dbos_nb.refuse_record()",
    ]


def _drop_refusal(backend: str) -> str:
    if backend == "sqlite":
        return "DROP TRIGGER refuse_record"
    return "DROP TRIGGER refuse_record ON dbos_nb.operation_outputs"


def test_the_batch_and_its_parents_record_are_one_write(launched: str, backend: str) -> None:
    """When the parent's record of the batch cannot be written, no item of the batch is
    either: two writes would leave a batch that a replay after an upgrade of the child ids'
    numbering (schema version 8) would enqueue again, under other ids."""
    Queue("in_wf")
    RUNS.clear()
    rt = get_runtime()
    with rt.db.write() as conn:
        for ddl in _refuse_records_naming("atomic-1", backend):
            conn.execute(sa.text(ddl))
    with SetWorkflowID("atomic"), pytest.raises(Exception, match="record refused by the test"):
        fan_out([1, 2, 3])
    assert _children_of("atomic") == []
    with rt.db.write() as conn:
        conn.execute(sa.text(_drop_refusal(backend)))
    with SetWorkflowID("atomic-again"):
        assert fan_out([1, 2, 3]) == [3, 6, 9]
    assert _children_of("atomic-again") == [f"atomic-again-1/{i}" for i in range(3)]
    assert sorted(RUNS) == [1, 2, 3]


def test_a_replay_finds_the_batch_and_enqueues_nothing_twice(launched: str) -> None:
    """A parent recovered after its batch was enqueued reads the batch's ids from its record:
    the items run once, and the parent gathers their results."""
    Queue("in_wf")
    RUNS.clear()
    with SetWorkflowID("replayed"):
        assert fan_out([4, 5]) == [12, 15]
    steps = DBOS.list_workflow_steps("replayed")
    assert steps[0].function_id == 1
    assert steps[0].child_workflow_id == "replayed-1"
    rt = get_runtime()
    with rt.db.write() as conn:  # as a crash after the batch (and the reads) left it
        conn.execute(
            sa.delete(operation_outputs).where(
                operation_outputs.c.workflow_uuid == "replayed",
                operation_outputs.c.function_id > 1,
            )
        )
        conn.execute(
            sa.update(workflow_status)
            .where(workflow_status.c.workflow_uuid == "replayed")
            .values(status="PENDING", output=None)
        )
    (recovered,) = DBOS.recover_pending_workflows()
    assert recovered.get_result(timeout_sec=20) == [12, 15]
    assert sorted(RUNS) == [4, 5]
    assert _children_of("replayed") == ["replayed-1/0", "replayed-1/1"]


def test_an_empty_batch_is_still_an_operation_of_its_parent(launched: str) -> None:
    """An empty batch writes no workflow, but it takes its operation number all the same, so
    that the parent's next operations keep their numbers on a replay."""
    Queue("in_wf")
    with SetWorkflowID("empty"):
        assert fan_out([]) == []
    steps = DBOS.list_workflow_steps("empty")
    assert [(s.function_id, s.child_workflow_id) for s in steps] == [(1, "empty-1")]


@DBOS.workflow()
def fan_out_when_stale(xs: list[int]) -> list[int]:
    rt = get_runtime()
    with rt.db.write() as conn:  # another execution takes the workflow over at this moment
        conn.execute(
            sa.update(workflow_status)
            .where(workflow_status.c.workflow_uuid == DBOS.workflow_id)
            .values(owner_xid="another-execution")
        )
    handles = Queue("in_wf").enqueue_many(triple, xs)
    return [h.get_result() for h in handles]


def test_a_stale_execution_enqueues_no_batch(launched: str) -> None:
    """An execution that no longer owns its workflow (taken over, say) is stopped at the
    batch, and the batch is not written: only the execution that owns the workflow may
    enqueue it."""
    Queue("in_wf")
    RUNS.clear()
    rt = get_runtime()
    with SetWorkflowID("stale"):
        DBOS.start_workflow(fan_out_when_stale, [1, 2])
    wait_until(lambda: not rt.is_running("stale"))
    assert _children_of("stale") == []
    assert [s.function_id for s in DBOS.list_workflow_steps("stale")] == []
    assert RUNS == []
