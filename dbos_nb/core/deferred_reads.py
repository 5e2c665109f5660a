"""The records of a workflow's reads, written with its next write (see `defer_read`).

A workflow that gathers the results of a thousand children calls `handle.get_result()` a
thousand times, and each call is an operation of the workflow, recorded so that a replay gets
the same answer. Committed one by one, those records cost half of the gather on PostgreSQL.
Here they wait in the execution and are written together, before anything that could act on
them (`steps.begin_operation`, `steps._record`, `workflows.run_execution`).
"""

from __future__ import annotations

from typing import TypeVar

from dbos_nb import serialization
from dbos_nb.core.context import RunningWorkflow
from dbos_nb.core.runtime import Runtime
from dbos_nb.storage.step_records import StepRecord

T = TypeVar("T")


# Reads whose records may wait (see `defer_read`): a workflow's wait for another one's result
# or for the first of several to end, and a status read.
DEFERRABLE = frozenset({"DBOS.getResult", "DBOS.getStatus", "DBOS.waitFirst"})
# A record waits no further once this many, or this many bytes of outputs, wait with it: the
# memory they hold, and the reads that a crash would make again, stay small.
MAX_DEFERRED = 256
MAX_DEFERRED_BYTES = 4 * 1024 * 1024


def defer_read(
    rt: Runtime,
    wf: RunningWorkflow,
    fid: int,
    name: str,
    started: int,
    value: T,
    child_workflow_id: str | None,
) -> T:
    """Keep the record of a successful read (`handle.get_result()`, a status read) to write it
    with the execution's next write, instead of committing each on its own: a workflow that
    gathers a thousand results paid a commit per result (half of its gather on PostgreSQL).

    Safe because a read acts on nothing: until the record is written, only the workflow's own
    code runs, which DBOS requires to be deterministic. Every other operation (a step, a
    child, a sleep, a fork or a cancel, ...), and the workflow's outcome, first writes the
    records waiting before it (`begin_operation`, `_record`, `workflows.run_execution`). So
    nothing that the read's value led to through an operation happens before the read is
    recorded; a crash meanwhile only makes the execution that goes on read again. (dbos_nb's
    calls that are no operations, `Batch` methods, queue declarations, a `DBOSClient`, are no
    more covered than any other code outside a step.) A failed read is recorded at once
    (`record_call_error`). A record that cannot be written waits on (see `write_deferred`);
    one that another execution made first, with another answer, sends the workflow back to
    its queue to run again from its records (READ_RECORDED_ELSEWHERE).
    """
    output = serialization.dumps(value)  # now: the workflow's code may change the object
    record = StepRecord(fid, name, output, None, started, rt.now_ms(), child_workflow_id)
    with wf.deferred_lock:
        assert wf.deferred is not None
        wf.deferred.append(record)
        wf.deferred_bytes += len(output)
        full = len(wf.deferred) >= MAX_DEFERRED or wf.deferred_bytes >= MAX_DEFERRED_BYTES
    if full:
        write_deferred(rt, wf)
    return value


def write_deferred(rt: Runtime, wf: RunningWorkflow) -> None:
    """Write the records of the reads that wait (see `defer_read`), together."""
    with wf.deferred_lock:
        records = wf.deferred
        if not records:
            return
        wf.deferred, wf.deferred_bytes = [], 0
    try:
        rt.store.record_steps(wf.workflow_id, wf.owner_xid, records)
    except Exception:
        # Not written (the database out of reach, say): they wait again, ahead of any read
        # made since, and the next write tries them first. Workflow code may catch the error
        # and go on; no later record may land while these are missing.
        with wf.deferred_lock:
            assert wf.deferred is not None
            wf.deferred[:0] = records
            wf.deferred_bytes += sum(len(r.output or b"") for r in records)
        raise
