"""`DBOS.enqueue_workflow_with_options`: enqueue by name from inside the application, with the
options of `DBOSClient.enqueue`, recorded as a child in workflow code."""

from __future__ import annotations

import threading
import uuid

import pytest

from dbos_nb import (
    DBOS,
    DbosNbError,
    DBOSNonExistentWorkflowError,
    DBOSNonSerializableError,
    DBOSQueueDeduplicatedError,
    EnqueueOptions,
    Queue,
    SetEnqueueOptions,
    SetWorkflowID,
    SetWorkflowTimeout,
    UnknownQueueError,
    UnknownWorkflowNameError,
)
from dbos_nb.core.runtime import get_runtime
from dbos_nb.models import STEP_WORKFLOW_PREFIX, QueueSettings


def _declared() -> None:
    Queue("opts_q")

    @DBOS.workflow(name="opts_add")
    def add(a: int, b: int = 0) -> int:
        return a + b


def test_a_registered_workflow_with_every_option(launched: str) -> None:
    _declared()
    options: EnqueueOptions = {
        "queue_name": "opts_q",
        "workflow_name": "opts_add",
        "workflow_id": "opts-1",
        "workflow_timeout": 30.0,
        "priority": 3,
        "app_version": "v-other",
    }
    handle = DBOS.enqueue_workflow_with_options(options, 2, b=5)
    assert handle.workflow_id == "opts-1"
    assert handle.get_result(timeout_sec=10) == 7
    status = handle.get_status()
    assert (status.queue_name, status.priority, status.app_version) == ("opts_q", 3, "v-other")
    assert status.workflow_timeout_ms == 30_000
    # Without app_version the row records none (the workflow may be another version's), as
    # in DBOS; the same call again with the same id enqueues nothing twice.
    plain = DBOS.enqueue_workflow_with_options(
        {"queue_name": "opts_q", "workflow_name": "opts_add"}, 1
    )
    assert plain.get_result(timeout_sec=10) == 1 and plain.get_status().app_version is None
    assert DBOS.enqueue_workflow_with_options(options, 2, b=5).get_result() == 7
    assert len(DBOS.list_workflows(name="opts_add")) == 2


def test_options_left_unset_come_from_the_callers_blocks(launched: str) -> None:
    _declared()
    base: EnqueueOptions = {"queue_name": "opts_q", "workflow_name": "opts_add"}
    with SetWorkflowID("opts-ambient"), SetEnqueueOptions(priority=9), SetWorkflowTimeout(60):
        first = DBOS.enqueue_workflow_with_options(base, 1)
        # The block's id was used up by that enqueue; the options' own values win.
        second = DBOS.enqueue_workflow_with_options({**base, "priority": 2}, 2)
    assert first.workflow_id == "opts-ambient" and second.workflow_id != "opts-ambient"
    assert [first.get_result(), second.get_result()] == [1, 2]
    one, two = first.get_status(), second.get_status()
    assert (one.priority, one.workflow_timeout_ms) == (9, 60_000)
    assert (two.priority, two.workflow_timeout_ms) == (2, 60_000)


def test_deduplication_and_bad_options_are_refused(launched: str) -> None:
    _declared()
    get_runtime().store.upsert_queue(QueueSettings(name="opts_unserved"), 0)  # not served here
    base: EnqueueOptions = {"queue_name": "opts_unserved", "workflow_name": "opts_add"}
    held = DBOS.enqueue_workflow_with_options({**base, "deduplication_id": "d-1"}, 1)
    with pytest.raises(DBOSQueueDeduplicatedError):
        DBOS.enqueue_workflow_with_options({**base, "deduplication_id": "d-1"}, 2)
    assert held.get_status().status == "ENQUEUED"
    with pytest.raises(UnknownQueueError, match="opts_nowhere"):
        DBOS.enqueue_workflow_with_options(
            {"queue_name": "opts_nowhere", "workflow_name": "opts_add"}
        )
    with pytest.raises(UnknownWorkflowNameError, match="opts_nobody"):
        DBOS.enqueue_workflow_with_options({"queue_name": "opts_q", "workflow_name": "opts_nobody"})
    with pytest.raises(DbosNbError, match="unknown enqueue option"):
        DBOS.enqueue_workflow_with_options({**base, "delay": 1})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(DbosNbError, match="workflow_timeout"):
        DBOS.enqueue_workflow_with_options({**base, "workflow_timeout": -1})
    with pytest.raises(DbosNbError, match="must be a dict"):
        DBOS.enqueue_workflow_with_options(["opts_q", "opts_add"])  # type: ignore[arg-type]
    assert [w.workflow_id for w in DBOS.list_workflows(name="opts_add")] == [held.workflow_id]


def test_a_name_registered_elsewhere_is_enqueued_for_the_process_that_registers_it(
    launched: str,
) -> None:
    """A name this process does not register but another one did (recorded in the database)
    is written by name, as a client writes it: it waits for a process that registers it."""
    store = get_runtime().store
    # New names each run: the registry outlives a test, and these must be unknown here.
    far_wf_name, far_step_name, not_yet_name = (
        f"opts_{n}_{uuid.uuid4().hex[:8]}" for n in ("far_wf", "far_step", "not_yet")
    )
    Queue("opts_q")
    store.record_functions(
        [
            (far_wf_name, "workflow", "elsewhere", "h1"),
            (far_step_name, "step", "elsewhere", "h2"),
        ],
        0,
    )
    wf = DBOS.enqueue_workflow_with_options(
        {"queue_name": "opts_q", "workflow_name": far_wf_name}, 4
    )
    step = DBOS.enqueue_workflow_with_options(
        {"queue_name": "opts_q", "workflow_name": far_step_name}, "x"
    )
    assert wf.get_status().status == "ENQUEUED"
    assert wf.get_status().name == far_wf_name
    assert step.get_status().name == STEP_WORKFLOW_PREFIX + far_step_name
    # Nobody registered it, but asked to: written all the same.
    later = DBOS.enqueue_workflow_with_options(
        {"queue_name": "opts_q", "workflow_name": not_yet_name, "allow_unregistered": True}, 1
    )

    # This process registers them now: its worker runs what waited.
    @DBOS.workflow(name=far_wf_name)
    def far_wf(x: int) -> int:
        return x * 10

    @DBOS.step(name=far_step_name)
    def far_step(x: str) -> str:
        return x + "!"

    @DBOS.workflow(name=not_yet_name)
    def not_yet(x: int) -> int:
        return -x

    assert wf.get_result(timeout_sec=10) == 40
    assert step.get_result(timeout_sec=10) == "x!"
    assert later.get_result(timeout_sec=10) == -1


def test_workflow_code_records_it_as_a_child(launched: str) -> None:
    """Called by a workflow, the enqueue is an operation of it: the child's id derives from
    the parent's, and a replay (a fork) gets the same child back without enqueueing again."""
    _declared()

    @DBOS.workflow(name="opts_parent")
    def parent(n: int) -> int:
        handle = DBOS.enqueue_workflow_with_options(
            {"queue_name": "opts_q", "workflow_name": "opts_add"}, n, b=1
        )
        result: int = handle.get_result()
        return result

    @DBOS.workflow(name="opts_parent_async")
    async def parent_async(n: int) -> int:
        handle = await DBOS.enqueue_workflow_with_options_async(
            {"queue_name": "opts_q", "workflow_name": "opts_add"}, n, b=2
        )
        result: int = await handle.get_result_async()
        return result

    with SetWorkflowID("opts-parent"):
        assert parent(5) == 6
    with SetWorkflowID("opts-parent-async"):
        assert DBOS.start_workflow(parent_async, 5).get_result(timeout_sec=10) == 7
    for parent_id, total in (("opts-parent", 6), ("opts-parent-async", 7)):
        first = DBOS.list_workflow_steps(parent_id)[0]
        assert first.function_name == "opts_add"
        child = DBOS.get_workflow_status(first.child_workflow_id)
        assert child is not None and child.parent_workflow_id == parent_id
        assert child.output == total
    runs = len(DBOS.list_workflows(name="opts_add"))
    assert DBOS.fork_workflow("opts-parent", 2).get_result(timeout_sec=10) == 6
    assert len(DBOS.list_workflows(name="opts_add")) == runs  # the replay enqueued nothing


def test_every_other_enqueue_records_the_runtimes_version(launched: str) -> None:
    """Only the options' enqueue leaves app_version unset; `queue.enqueue`, `enqueue_many`
    and `start_workflow` record the version of the process that wrote them."""
    _declared()
    queue = Queue("opts_q")

    @DBOS.workflow(name="opts_versioned")
    def versioned(x: int) -> int:
        return x

    handles = [
        *queue.enqueue_many(versioned, [1, 2]),
        queue.enqueue(versioned, 3),
        DBOS.start_workflow(versioned, 4),
    ]
    assert [h.get_result(timeout_sec=10) for h in handles] == [1, 2, 3, 4]
    version = get_runtime().app_version
    assert [h.get_status().app_version for h in handles] == [version] * 4


def test_a_failed_enqueue_leaves_the_callers_workflow_id(launched: str) -> None:
    """An enqueue that fails (an argument that cannot be pickled) does not use up the id of
    the `SetWorkflowID` around it: the next enqueue in the block takes it, as with
    `queue.enqueue`."""
    _declared()
    base: EnqueueOptions = {"queue_name": "opts_q", "workflow_name": "opts_add"}
    with SetWorkflowID("opts-kept"):
        with pytest.raises(DBOSNonSerializableError):
            DBOS.enqueue_workflow_with_options(base, threading.Lock())
        kept = DBOS.enqueue_workflow_with_options(base, 1)
    assert kept.workflow_id == "opts-kept" and kept.get_result(timeout_sec=10) == 1
    with pytest.raises(DbosNbError, match="allow_unregistered must be True or False"):
        DBOS.enqueue_workflow_with_options({**base, "allow_unregistered": "no"})  # type: ignore[typeddict-item]


@pytest.mark.parametrize("how", ["queue.enqueue", "with_options", "enqueue_many", "start_workflow"])
def test_a_replay_does_not_run_a_deleted_child_again(launched: str, how: str) -> None:
    """A parent's replay gets back the child it enqueued; that child ran and was deleted
    since: the replay must not write it anew (and run it, and pay for it, again)."""
    queue = Queue("opts_q")
    runs: list[int] = []

    @DBOS.workflow(name="opts_counted")
    def counted(x: int) -> int:
        runs.append(x)
        return x

    @DBOS.workflow(name=f"opts_parent_of_counted_{how}")
    def parent() -> str:
        if how == "queue.enqueue":
            handle = queue.enqueue(counted, 7)
        elif how == "enqueue_many":
            (handle,) = queue.enqueue_many(counted, [7])
        elif how == "start_workflow":
            handle = DBOS.start_workflow(counted, 7)
        else:
            handle = DBOS.enqueue_workflow_with_options(
                {"queue_name": "opts_q", "workflow_name": "opts_counted"}, 7
            )
        return handle.workflow_id

    with SetWorkflowID(f"opts-parent-{how}"):
        child_id = parent()
    assert DBOS.retrieve_workflow(child_id).get_result(timeout_sec=10) == 7
    DBOS.delete_workflow(child_id)
    assert DBOS.fork_workflow(f"opts-parent-{how}", 2).get_result(timeout_sec=10) == child_id
    assert runs == [7] and DBOS.get_workflow_status(child_id) is None


def test_a_replayed_direct_call_of_a_deleted_child_raises(launched: str) -> None:
    """A child called directly, finished, then deleted: the parent's replay cannot read its
    result, and says so, rather than running (and paying for) the child again."""
    runs: list[int] = []

    @DBOS.workflow(name="opts_direct_child")
    def child(x: int) -> int:
        runs.append(x)
        return x

    @DBOS.workflow(name="opts_direct_parent")
    def parent() -> int:
        return child(3)

    with SetWorkflowID("opts-direct-parent"):
        assert parent() == 3
    (record,) = DBOS.list_workflow_steps("opts-direct-parent")
    DBOS.delete_workflow(record.child_workflow_id)
    with pytest.raises(DBOSNonExistentWorkflowError, match=record.child_workflow_id):
        DBOS.fork_workflow("opts-direct-parent", 2).get_result(timeout_sec=10)
    assert runs == [3]
