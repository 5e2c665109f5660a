"""The engine's promises where a bug hunt found them broken: a workflow takes the same path when
replayed as when it first ran, even around errors that do not survive pickling; timeouts are
enforced however rarely the process polls, and only on the children that share the deadline; a
fork runs without its source's timeout; a blocking sleep is refused on dbos_nb's event loop; a
step's record never outlives its deleted workflow."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from conftest import config, insert_pending
from dbos_nb import (
    DBOS,
    DBOSMaxStepRetriesExceeded,
    DBOSRecordedError,
    DBOSWorkflowTimedOutError,
    SetWorkflowID,
    SetWorkflowTimeout,
)
from dbos_nb.storage.database import Database
from dbos_nb.storage.schema import operation_outputs, workflow_status
from dbos_nb.storage.step_records import StepRecord
from dbos_nb.storage.store import SystemStore

CALLS: dict[str, int] = {}


class ApiError(Exception):
    """Pickles, but does not unpickle (a required keyword-only argument), as httpx's
    HTTPStatusError and many API clients' errors."""

    def __init__(self, message: str, *, response: object) -> None:
        super().__init__(message)
        self.response = response


@DBOS.step(retries_allowed=True, max_attempts=2, interval_seconds=0.01)
def flaky_call() -> str:
    CALLS["flaky"] = CALLS.get("flaky", 0) + 1
    raise ApiError("503 Service Unavailable", response=object())


@DBOS.step()
def failing_call() -> str:
    raise ApiError("429 Too Many Requests", response=object())


@DBOS.step()
def fallback(tag: str) -> str:
    return f"fallback after {tag}"


@DBOS.workflow(name="replay_retries_then_fallback")
def retries_then_fallback() -> str:
    try:
        return flaky_call()
    except DBOSMaxStepRetriesExceeded as exc:
        # The attempts' errors are there, as stand-ins for what did not survive pickling.
        kinds = {type(e).__name__ for e in exc.errors}
        return fallback("retries") + f" ({exc.max_attempts}, {sorted(kinds)})"


@DBOS.workflow(name="replay_catches_a_stand_in")
def catches_a_stand_in() -> str:
    try:
        return failing_call()
    except DBOSRecordedError as exc:
        return fallback(exc.type_name)


@pytest.fixture
def slow_polling(db_url: str) -> Iterator[str]:
    """DBOS launched with a fallback poll far longer than the timeouts under test."""
    DBOS(config=config(db_url, polling_interval_sec=5))
    DBOS.launch()
    yield db_url
    DBOS.destroy()


def test_a_replay_takes_the_path_of_the_first_run_around_unpicklable_errors(
    launched: str,
) -> None:
    CALLS.clear()
    with SetWorkflowID("retried"):
        first = retries_then_fallback()
    assert first.startswith("fallback after retries (2, ")
    with SetWorkflowID("stand_in"):
        assert catches_a_stand_in() == "fallback after ApiError"
    # A replay from the records (what recovery after a crash does): the same path, the same
    # answer, and the failed step is not called again.
    assert DBOS.fork_workflow("retried", 3).get_result(timeout_sec=20) == first
    assert DBOS.fork_workflow("stand_in", 3).get_result(timeout_sec=20) == (
        "fallback after ApiError"
    )
    assert CALLS["flaky"] == 2


def test_an_unpicklable_error_is_raised_as_it_will_read_back(launched: str) -> None:
    @DBOS.workflow(name="replay_lets_it_fail")
    def lets_it_fail() -> str:
        return failing_call()

    with pytest.raises(DBOSRecordedError) as caught:
        lets_it_fail()
    assert caught.value.type_name == "ApiError" and "429" in caught.value.message
    assert isinstance(caught.value.__cause__, ApiError)  # the original, for the traceback


@DBOS.step()
def slow_step(seconds: float) -> str:
    time.sleep(seconds)
    return "step done"


@DBOS.workflow(name="timeout_one_slow_step")
def one_slow_step() -> str:
    return slow_step(1.0)


def test_a_timeout_is_enforced_however_rarely_the_process_polls(slow_polling: str) -> None:
    """A workflow started directly, in a process that polls every 5 s, with a timeout of 0.2 s
    and a step of 1 s: it times out (it went on to SUCCESS, unseen by a sleeping sweep)."""
    with SetWorkflowTimeout(0.2):
        handle = DBOS.start_workflow(one_slow_step)
    with pytest.raises(DBOSWorkflowTimedOutError):
        handle.get_result(timeout_sec=20)
    assert handle.get_status().status == "CANCELLED"


@DBOS.workflow(name="timeout_child")
def child(tag: str) -> str:
    DBOS.sleep(0.6)
    return tag


@DBOS.workflow(name="timeout_parent")
def parent() -> list[str]:
    inherits = DBOS.start_workflow(child, "inherits")
    with SetWorkflowTimeout(None):
        free = DBOS.start_workflow(child, "no timeout")
    with SetWorkflowTimeout(30):
        own = DBOS.start_workflow(child, "own timeout")
    DBOS.sleep(1.0)  # past the parent's deadline
    return [inherits.workflow_id, free.workflow_id, own.workflow_id]


def test_a_timeout_cancels_only_the_children_that_share_the_deadline(launched: str) -> None:
    with SetWorkflowTimeout(0.3):
        handle = DBOS.start_workflow(parent)
    with pytest.raises(DBOSWorkflowTimedOutError):
        handle.get_result(timeout_sec=20)
    children = {s.input["args"][0]: s for s in DBOS.list_workflows(name="timeout_child")}
    assert children["inherits"].status == "CANCELLED"
    for tag in ("no timeout", "own timeout"):
        # As in DBOS: a child started outside the parent's deadline runs on.
        assert DBOS.retrieve_workflow(children[tag].workflow_id).get_result(timeout_sec=20) == tag


def test_a_fork_runs_without_its_sources_timeout(launched: str) -> None:
    with SetWorkflowTimeout(0.2), SetWorkflowID("timed_source"):
        source = DBOS.start_workflow(one_slow_step)
    with pytest.raises(DBOSWorkflowTimedOutError):
        source.get_result(timeout_sec=20)
    fork = DBOS.fork_workflow("timed_source", 1)
    assert fork.get_result(timeout_sec=20) == "step done"  # it timed out again before
    assert fork.get_status().workflow_timeout_ms is None


@DBOS.workflow(name="async_blocking_sleep")
async def blocking_sleep() -> str:
    DBOS.sleep(0.5)
    return "slept"


def test_a_blocking_sleep_on_dbos_nbs_event_loop_raises(launched: str) -> None:
    with pytest.raises(RuntimeError, match=r"await DBOS\.sleep_async"):
        asyncio.run(blocking_sleep())


# -- a step's record against a concurrent delete of its workflow --------------------------------


@pytest.fixture
def store(db_url: str) -> Iterator[SystemStore]:
    DBOS(config=config(db_url))
    DBOS.launch()  # creates the schema
    DBOS.destroy()
    db = Database(db_url)
    try:
        yield SystemStore(db)
    finally:
        db.dispose()


@pytest.mark.parametrize("batched", [False, True])
def test_no_step_record_outlives_its_deleted_workflow(store: SystemStore, batched: bool) -> None:
    """A delete that has removed the workflow and its records but not yet committed, while an
    execution records a step: the record must not land after the delete commits (PostgreSQL's
    READ COMMITTED let it, and a new workflow under the same id replayed it as its own)."""
    insert_pending(store, "doomed", "owner-1", queue_name=None)
    attempt: dict[str, object] = {}

    def record() -> None:
        try:
            if batched:
                store.record_steps("doomed", "owner-1", [StepRecord(1, "s", b"x", None, 1, 2)])
            else:
                store.record_step("doomed", "owner-1", 1, "s", b"x", None, 1, 2)
        except BaseException as exc:  # preempted: the workflow is gone
            attempt["raised"] = exc

    with store.db.write() as conn:
        conn.execute(sa.delete(workflow_status).where(workflow_status.c.workflow_uuid == "doomed"))
        conn.execute(
            sa.delete(operation_outputs).where(operation_outputs.c.workflow_uuid == "doomed")
        )
        writer = threading.Thread(target=record)
        writer.start()
        time.sleep(0.3)  # the record is attempted while the delete is not committed
    writer.join(20)
    assert not writer.is_alive()
    with store.db.read() as conn:
        left = conn.execute(
            sa.select(operation_outputs.c.function_id).where(
                operation_outputs.c.workflow_uuid == "doomed"
            )
        ).all()
    assert left == []
