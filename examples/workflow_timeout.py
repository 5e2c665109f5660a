"""Setting Timeouts: an enqueued workflow that does not finish in time is cancelled.

    python examples/workflow_timeout.py

First the tutorial's snippet ("Queues & Parallelism", "Setting Timeouts") with only the import
changed to `dbos_nb`: a workflow enqueued with a 10-second timeout, which finishes well within it.
Then the two rules the tutorial states, shown in under a second:
- a workflow still running when its timeout expires is cancelled at its next step;
- the timeout starts when the workflow is dequeued, not when it is enqueued.
The database is the SQLite file or PostgreSQL URL in DBOS_DATABASE_URL (default: a SQLite file in
the temp directory).
"""

import os
import tempfile
import time

from dbos_nb import DBOS, DBOSAwaitedWorkflowCancelledError, Queue, SetWorkflowTimeout

DATABASE_URL = os.environ.get("DBOS_DATABASE_URL") or (
    f"sqlite:///{os.path.join(tempfile.gettempdir(), 'dbos_nb_workflow_timeout.sqlite')}"
)


# --- tutorial ---------------------------------------------------------------------------------
@DBOS.workflow()
def example_workflow(): ...


queue = Queue("example-queue")
# --- end of tutorial --------------------------------------------------------------------------

one_at_a_time = Queue("one-at-a-time", concurrency=1)


@DBOS.step()
def tick(seconds: float) -> None:
    time.sleep(seconds)


@DBOS.workflow()
def slow_workflow(steps: int, seconds_per_step: float) -> str:
    for _ in range(steps):
        tick(seconds_per_step)
    return "finished"


def outcome(handle) -> str:
    try:
        return f"{handle.get_result()!r}"
    except DBOSAwaitedWorkflowCancelledError as exc:
        return f"{type(exc).__name__}"


if __name__ == "__main__":
    DBOS(config={"name": "workflow_timeout", "system_database_url": DATABASE_URL})
    DBOS.launch()

    # --- tutorial -----------------------------------------------------------------------------
    # If the workflow does not complete within 10 seconds after being dequeued, it times out and is cancelled  # noqa: E501
    with SetWorkflowTimeout(10):
        queue.enqueue(example_workflow)
    # --- end of tutorial ----------------------------------------------------------------------

    # The tutorial drops the handle; find the workflow it enqueued (the newest such one).
    (status,) = DBOS.list_workflows(name="example_workflow", sort_desc=True, limit=1)
    result = outcome(DBOS.retrieve_workflow(status.workflow_id))
    status = DBOS.get_workflow_status(status.workflow_id)
    timeout_ms = status.workflow_timeout_ms
    print(f"example_workflow: {status.status}, result {result}, timeout {timeout_ms} ms")

    # Still running when the timeout expires: cancelled at the start of its next step.
    with SetWorkflowTimeout(0.3):
        handle = queue.enqueue(slow_workflow, 20, 0.05)
    result = outcome(handle)
    steps = len(DBOS.list_workflow_steps(handle.workflow_id))
    print(f"expired: {handle.get_status().status}, result {result}, {steps} of 20 steps ran")

    # Start-to-completion: waiting in the queue (0.4 s behind another workflow) does not count.
    blocker = one_at_a_time.enqueue(slow_workflow, 4, 0.1)
    with SetWorkflowTimeout(0.3):
        waited = one_at_a_time.enqueue(slow_workflow, 2, 0.05)
    result = outcome(waited)
    status = waited.get_status()
    queued_ms = status.dequeued_at - status.created_at
    print(f"queued {queued_ms} ms then ran: {status.status}, result {result}")
    DBOS.destroy()
