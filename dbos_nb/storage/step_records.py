"""Step records: what a step checks before it runs, recording its outcome (only by the
workflow's owner, first record wins), and reading a workflow's records.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import BigInteger, Select, String, and_, bindparam, func, select
from sqlalchemy.sql.elements import ColumnElement

from dbos_nb.errors import READ_RECORDED_ELSEWHERE, WorkflowPreempted
from dbos_nb.models import WorkflowStatusString
from dbos_nb.storage import merged
from dbos_nb.storage.database import Database
from dbos_nb.storage.rows import StepPreflight, StoreBase
from dbos_nb.storage.schema import operation_outputs, status_is, workflow_status

ws = workflow_status
oo = operation_outputs
SUCCESS = WorkflowStatusString.SUCCESS.value
ERROR = WorkflowStatusString.ERROR.value


_STEP_PREFLIGHT = (
    select(
        ws.c.status,
        ws.c.workflow_deadline_epoch_ms,
        ws.c.owner_xid,
        oo.c.function_id,
        oo.c.function_name,
        oo.c.output,
        oo.c.error,
        oo.c.child_workflow_id,
    )
    .select_from(
        ws.outerjoin(
            oo,
            and_(
                oo.c.workflow_uuid == ws.c.workflow_uuid,
                oo.c.function_id == bindparam("fid"),
            ),
        )
    )
    .where(ws.c.workflow_uuid == bindparam("wid"))
)

_STEP_COLUMNS = [
    "workflow_uuid",
    "function_id",
    "function_name",
    "output",
    "error",
    "child_workflow_id",
    "started_at_epoch_ms",
    "completed_at_epoch_ms",
]


class StepRecord(NamedTuple):
    """One operation's outcome, to be recorded (see `StepRecords.record_steps`)."""

    function_id: int
    function_name: str
    output: bytes | None
    error: bytes | None
    started_ms: int
    completed_ms: int
    child_workflow_id: str | None = None


def _params(workflow_id: str, owner_xid: str, record: StepRecord) -> dict[str, Any]:
    return {
        "workflow_uuid": workflow_id,
        "function_id": record.function_id,
        "function_name": record.function_name,
        "output": record.output,
        "error": record.error,
        "child_workflow_id": record.child_workflow_id,
        "started_at_epoch_ms": record.started_ms,
        "completed_at_epoch_ms": record.completed_ms,
        "b_wid": workflow_id,
        "b_owner": owner_xid,
    }


class StepRecords(StoreBase):
    """Preflight, record and read the operations of workflows."""

    def _build_step_statements(self, db: Database) -> None:
        """Prepare the dialect-specific write of a step record (called once, by __init__)."""

        def step_row_where(*conditions: ColumnElement[bool]) -> Select[Any]:
            """The step's record as a row of bind parameters, selected only if its workflow's
            row meets the conditions."""
            row = [bindparam(c, type_=oo.c[c].type) for c in _STEP_COLUMNS]
            workflow = ws.c.workflow_uuid == bindparam("b_wid", type_=String)
            # The workflow's row locked (PostgreSQL, FOR KEY SHARE) until the record commits:
            # a delete of the workflow either waits for it and then deletes the record too, or
            # deletes first and the record is not written. Without the lock, READ COMMITTED
            # let a record land after its workflow was deleted, and a new workflow under the
            # same id replayed it as its own step.
            found = select(ws.c.id).where(workflow, *conditions)
            if db.is_postgres:
                found = found.with_for_update(read=True, key_share=True)
            return select(*row).where(found.exists())

        owned = step_row_where(ws.c.owner_xid == bindparam("b_owner", type_=String))
        self._record_owned_step = (
            db.insert(oo)
            .from_select(_STEP_COLUMNS, owned)
            .on_conflict_do_nothing()
            .returning(oo.c.function_id)
        )
        self._record_steps = merged.record_steps(db.prepared(self._record_owned_step))
        # An execution that lost the workflow while its step ran (cancelled and resumed, taken
        # over) still ran the step: its outcome is kept for the execution that goes on, unless
        # that one recorded the step first or the workflow has ended. Only in the row the step
        # ran for: one created after the step began (the id deleted and used again) is another
        # workflow, which must not replay it.
        resumable = step_row_where(
            ~status_is(ws.c.status, SUCCESS, ERROR),
            ws.c.created_at <= bindparam("started_at_epoch_ms", type_=BigInteger),
        )
        self._record_orphan_step = (
            db.insert(oo).from_select(_STEP_COLUMNS, resumable).on_conflict_do_nothing()
        )

    def step_preflight(self, workflow_id: str, function_id: int) -> StepPreflight:
        """The workflow's status and deadline, and the step's recorded outcome if it has one."""
        row = self.db.read_row(_STEP_PREFLIGHT, {"wid": workflow_id, "fid": function_id})
        if row is None:
            return StepPreflight(None, None, False, None, None, None, None)
        return StepPreflight(
            status=row[0],
            deadline_ms=row[1],
            owner_xid=row[2],
            recorded=row[3] is not None,
            function_name=row[4],
            output=row[5],
            error=row[6],
            child_workflow_id=row[7],
        )

    def record_step(
        self,
        workflow_id: str,
        owner_xid: str,
        function_id: int,
        function_name: str,
        output: bytes | None,
        error: bytes | None,
        started_ms: int,
        completed_ms: int,
        child_workflow_id: str | None = None,
    ) -> StepPreflight | None:
        """Record an operation's outcome, if this execution still owns the workflow.

        Idempotent: if this execution's operation is already recorded, the first record wins,
        nothing is written, and that record is returned (else None). When another execution
        owns the workflow now, raises WorkflowPreempted: this one must not go on. What it just
        ran is kept all the same if nobody recorded that operation yet and the workflow has
        not ended, so that the execution that goes on replays it rather than running it again.
        The common case is one atomic statement.
        """
        record = StepRecord(
            function_id, function_name, output, error, started_ms, completed_ms, child_workflow_id
        )
        params = _params(workflow_id, owner_xid, record)
        inserted = self.db.grouped(self._record_owned_step, params, self._record_steps)
        return None if inserted is not None else self._not_inserted(params)

    def record_steps(self, workflow_id: str, owner_xid: str, records: list[StepRecord]) -> None:
        """Record several reads of one execution together, all or nothing (reads whose
        records waited, see `deferred_reads.defer_read`): one round trip on PostgreSQL.

        A record already there is fine if it is this very one (a write run again after a lost
        reply). Otherwise raises WorkflowPreempted: "taken over by another execution" when the
        workflow is no longer this execution's (nothing is kept for the one that goes on: it
        reads again), READ_RECORDED_ELSEWHERE when another execution recorded the operation
        with another answer while this one still owns the workflow."""
        batch = [_params(workflow_id, owner_xid, record) for record in records]
        answers = self.db.grouped_many(self._record_owned_step, self._record_steps, batch)
        for record, answer in zip(records, answers, strict=True):
            if answer is None:
                self._check_read_recorded(workflow_id, owner_xid, record)

    def _check_read_recorded(self, workflow_id: str, owner_xid: str, record: StepRecord) -> None:
        found = self.step_preflight(workflow_id, record.function_id)
        if not found.recorded or found.owner_xid != owner_xid:
            raise WorkflowPreempted(workflow_id, "taken over by another execution")
        recorded = (found.function_name, found.output, found.error)
        if recorded != (record.function_name, record.output, record.error):
            raise WorkflowPreempted(workflow_id, READ_RECORDED_ELSEWHERE)

    def _not_inserted(self, params: dict[str, Any]) -> StepPreflight:
        """A step's record that was not written: the operation's record (returned), or the
        workflow is no longer this execution's (WorkflowPreempted; what it ran is kept for the
        execution that goes on, see `record_step`)."""
        workflow_id, owner_xid = params["workflow_uuid"], params["b_owner"]
        existing = self.step_preflight(workflow_id, params["function_id"])
        if existing.recorded and existing.owner_xid == owner_xid:
            return existing
        if not existing.recorded:
            orphan = {key: value for key, value in params.items() if key != "b_owner"}
            self.db.grouped(self._record_orphan_step, orphan)
        raise WorkflowPreempted(workflow_id, "taken over by another execution")

    def last_recorded_function_id(self, workflow_id: str) -> int:
        """The highest operation number recorded for a workflow (-1 if none)."""
        with self.db.read() as conn:
            value = conn.execute(
                select(func.max(oo.c.function_id)).where(oo.c.workflow_uuid == workflow_id)
            ).scalar()
        return int(value) if value is not None else -1

    def list_steps(self, workflow_id: str) -> list[dict[str, Any]]:
        """Every recorded operation of a workflow, in order."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(oo).where(oo.c.workflow_uuid == workflow_id).order_by(oo.c.function_id)
            ).mappings()
            return [dict(r) for r in rows]
