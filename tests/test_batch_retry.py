"""`Batch.retry_failed()` re-runs every item the batch counts as failed, and only those: items
whose failure came from a child workflow, and items given up after too many recoveries (both
backends)."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from conftest import config
from dbos_nb import DBOS, Queue
from dbos_nb.storage.database import Database


def test_retry_reruns_items_whose_child_workflow_failed(launched: str) -> None:
    calls: list[int] = []
    fixed = {"now": False}

    @DBOS.step()
    def flaky(y: int) -> int:
        calls.append(y)
        if not fixed["now"]:
            raise ConnectionError("transient")
        return y * 10

    @DBOS.workflow()
    def child(y: int) -> int:
        return flaky(y)

    @DBOS.workflow()
    def parent(x: int) -> int:
        return child(x) + 1

    batch = Queue("retry_children").map(parent, [1, 2], batch="retry-children")
    batch.wait(timeout=20, show=False)
    assert batch.counts()["failed"] == 2 and sorted(calls) == [1, 2]
    fixed["now"] = True
    assert batch.retry_failed() == 2
    batch.wait(timeout=20, show=False)
    assert batch.results() == [11, 21]
    assert sorted(calls) == [1, 1, 2, 2]  # the failed step ran again, once per item
    children = DBOS.list_workflows(parent_workflow_id=["retry-children/0", "retry-children/1"])
    assert [c.status for c in children] == ["SUCCESS", "SUCCESS"]


def test_retry_reruns_items_given_up_after_too_many_recoveries(db_url: str) -> None:
    """An item whose process kept dying is dead-lettered (MAX_RECOVERY_ATTEMPTS_EXCEEDED) with
    an error that says why; the batch counts it failed, shows that error, and retries it."""
    runs: list[int] = []

    def body(x: int) -> int:
        runs.append(x)
        return x * 2

    def declare() -> Callable[[int], int]:
        return DBOS.workflow(name="retry_crashy", max_recovery_attempts=1)(body)

    DBOS(config=config(db_url, listen_queues=["elsewhere"]))  # enqueues, does not run
    crashy = declare()
    DBOS.launch()
    batch = Queue("retry_dead").map(crashy, [1, 2], batch="retry-dead")
    DBOS.destroy()
    # Item 0 as a process that died while running it, again and again, leaves it.
    db = Database(db_url)
    table = ("dbos_nb." if db.is_postgres else "") + "workflow_status"
    with db.write() as conn:
        conn.execute(
            sa.text(
                f"UPDATE {table} SET status = 'PENDING', owner_xid = 'dead', "
                "executor_id = 'local', recovery_attempts = 5 "
                "WHERE workflow_uuid = 'retry-dead/0'"
            )
        )
    db.dispose()
    DBOS(config=config(db_url))
    declare()  # registered again in the new DBOS, as a relaunched program does
    DBOS.launch()
    batch.wait(timeout=20, show=False)
    assert batch.counts()["failed"] == 1 and runs == [2]
    error = batch.to_pandas()["error"].iloc[0]
    assert "started 5 times" in error and "max_recovery_attempts=1" in error
    recent = batch.progress().recent_errors
    assert [wid for wid, _ in recent] == ["retry-dead/0"]
    assert batch.retry_failed() == 1
    batch.wait(timeout=20, show=False)
    assert batch.results() == [2, 4] and sorted(runs) == [1, 2]
