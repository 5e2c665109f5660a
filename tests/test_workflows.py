"""Behaviour of workflows and steps, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import inspect
import threading
import time
import weakref
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import config, wait_until
from dbos_nb import (
    DBOS,
    DBOSAwaitedWorkflowCancelledError,
    DBOSClient,
    DBOSConflictingRegistrationError,
    DBOSConflictingWorkflowError,
    DBOSException,
    DBOSMaxStepRetriesExceeded,
    DbosNbError,
    DBOSNonExistentWorkflowError,
    DBOSNonSerializableError,
    DBOSNotLaunchedError,
    DBOSUnexpectedStepError,
    Queue,
    SetWorkflowID,
    UnknownQueueError,
    UnknownWorkflowNameError,
    WorkflowPreempted,
    WorkflowStatusString,
)
from dbos_nb.models import INTERNAL_QUEUE


def test_steps_are_checkpointed_and_replayed(launched: str) -> None:
    calls: list[int] = []

    @DBOS.step()
    def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    @DBOS.workflow()
    def wf(n: int) -> list[int]:
        return [double(i) for i in range(n)]

    with SetWorkflowID("wf-1"):
        assert wf(3) == [0, 2, 4]
    assert calls == [0, 1, 2]
    # Same id again: the recorded result comes back and no step runs.
    with SetWorkflowID("wf-1"):
        assert wf(3) == [0, 2, 4]
    assert calls == [0, 1, 2]
    steps = DBOS.list_workflow_steps("wf-1")
    assert [(s.function_id, s.function_name, s.output) for s in steps] == [
        (1, double.__qualname__, 0),
        (2, double.__qualname__, 2),
        (3, double.__qualname__, 4),
    ]
    status = DBOS.get_workflow_status("wf-1")
    assert status is not None
    assert status.status == WorkflowStatusString.SUCCESS
    assert status.output == [0, 2, 4]
    assert status.input == {"args": (3,), "kwargs": {}}  # as DBOS gives it
    assert status.name == wf.__qualname__


def test_set_workflow_id_applies_to_first_workflow_only(launched: str) -> None:
    @DBOS.workflow()
    def ident() -> str | None:
        return DBOS.workflow_id

    with SetWorkflowID("only-first"):
        first = ident()
        second = ident()
    assert first == "only-first"
    assert second != "only-first" and second is not None


def test_reusing_an_id_for_another_workflow_conflicts(launched: str) -> None:
    @DBOS.workflow()
    def a() -> int:
        return 1

    @DBOS.workflow()
    def b() -> int:
        return 2

    with SetWorkflowID("shared"):
        a()
    with pytest.raises(DBOSConflictingWorkflowError, match="shared"), SetWorkflowID("shared"):
        b()


def test_errors_are_recorded_and_raised_again(launched: str) -> None:
    runs: list[int] = []

    @DBOS.workflow()
    def failing() -> None:
        runs.append(1)
        raise ValueError("bad input 42")

    with pytest.raises(ValueError, match="bad input 42"), SetWorkflowID("fails"):
        failing()
    with pytest.raises(ValueError, match="bad input 42"), SetWorkflowID("fails"):
        failing()
    assert runs == [1]
    status = DBOS.get_workflow_status("fails")
    assert status is not None and status.status == "ERROR"
    assert isinstance(status.error, ValueError)
    with pytest.raises(ValueError, match="bad input 42"):
        DBOS.retrieve_workflow("fails").get_result()


def test_step_error_is_recorded_and_replayed(launched: str) -> None:
    attempts: list[int] = []

    @DBOS.step()
    def flaky() -> None:
        attempts.append(1)
        raise KeyError("boom")

    @DBOS.workflow()
    def wf() -> str:
        try:
            flaky()
        except KeyError:
            return "caught"
        return "no error"

    with SetWorkflowID("step-err"):
        assert wf() == "caught"
    steps = DBOS.list_workflow_steps("step-err")
    assert len(steps) == 1 and isinstance(steps[0].error, KeyError)
    assert attempts == [1]


def test_step_retries_with_backoff_then_gives_up(launched: str) -> None:
    attempts: list[Any] = []

    @DBOS.step(retries_allowed=True, max_attempts=3, interval_seconds=0.01, backoff_rate=2.0)
    def sometimes() -> str:
        status = DBOS.step_status
        assert status is not None
        attempts.append((status.current_attempt, status.max_attempts))
        if len(attempts) < 4:  # the plain step's entry, then two failures
            raise RuntimeError("transient")
        return "ok"

    @DBOS.step(retries_allowed=True, max_attempts=2, interval_seconds=0.01)
    def never() -> None:
        raise RuntimeError("always")

    @DBOS.step()
    def plain() -> None:
        status = DBOS.step_status
        assert status is not None
        attempts.append((status.current_attempt, status.max_attempts))

    @DBOS.workflow()
    def wf() -> str:
        plain()
        return sometimes()

    @DBOS.workflow()
    def wf2() -> None:
        never()

    assert wf() == "ok"
    # As in DBOS: counted from 0, and no numbers at all for a step without retries.
    assert attempts == [(None, None), (0, 3), (1, 3), (2, 3)]
    with pytest.raises(DBOSMaxStepRetriesExceeded) as info:
        wf2()
    assert info.value.max_attempts == 2
    assert all(isinstance(e, RuntimeError) for e in info.value.errors)
    assert isinstance(info.value, DBOSException)


def test_child_workflows_get_deterministic_ids(launched: str) -> None:
    @DBOS.workflow()
    def child(x: int) -> int:
        return x + 1

    @DBOS.workflow()
    def parent() -> list[Any]:
        a = child(1)
        handle = DBOS.start_workflow(child, 10)
        return [a, handle.get_result(), handle.workflow_id]

    with SetWorkflowID("parent-1"):
        result = parent()
    assert result == [2, 11, "parent-1-2"]
    kids = DBOS.list_workflows(workflow_id_prefix="parent-1-")
    assert sorted(k.workflow_id for k in kids) == ["parent-1-1", "parent-1-2"]
    assert all(k.parent_workflow_id == "parent-1" for k in kids)
    steps = DBOS.list_workflow_steps("parent-1")
    # The two starts, then the handle's wait (DBOS.getResult, naming the child it waited for).
    assert [s.child_workflow_id for s in steps] == ["parent-1-1", "parent-1-2", "parent-1-2"]
    assert steps[2].function_name == "DBOS.getResult"


def test_start_workflow_runs_in_background(launched: str) -> None:
    gate = threading.Event()

    @DBOS.workflow()
    def waits() -> str:
        gate.wait(10)
        return "done"

    handle = DBOS.start_workflow(waits)
    assert handle.get_status().status == "PENDING"
    gate.set()
    assert handle.get_result() == "done"
    assert handle.get_status().status == "SUCCESS"


def test_non_serializable_argument_is_rejected_and_nothing_written(launched: str) -> None:
    @DBOS.workflow()
    def takes(x: Any, y: Any = None) -> None:
        return None

    lock = threading.Lock()
    with pytest.raises(DBOSNonSerializableError, match="argument 'y'"):
        takes(1, y=lock)
    with pytest.raises(DBOSNonSerializableError, match="positional argument 0"):
        DBOS.start_workflow(takes, lock)
    assert DBOS.list_workflows() == []


def test_non_serializable_result_fails_the_workflow(launched: str) -> None:
    @DBOS.workflow()
    def returns_lock() -> Any:
        return threading.Lock()

    with pytest.raises(DBOSNonSerializableError), SetWorkflowID("bad-result"):
        returns_lock()
    status = DBOS.get_workflow_status("bad-result")
    assert status is not None and status.status == "ERROR"


def test_cancel_stops_a_running_workflow_at_its_next_step(launched: str) -> None:
    started = threading.Event()
    release = threading.Event()
    ran: list[str] = []

    @DBOS.step()
    def first() -> None:
        ran.append("first")
        started.set()
        release.wait(10)

    @DBOS.step()
    def second() -> None:
        ran.append("second")

    @DBOS.workflow()
    def wf() -> None:
        first()
        second()

    handle = DBOS.start_workflow(wf)
    assert started.wait(10)
    DBOS.cancel_workflow(handle.workflow_id)
    release.set()
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        handle.get_result()
    time.sleep(0.1)
    assert ran == ["first"]
    assert handle.get_status().status == "CANCELLED"

    # Resume runs it again from its last completed step.
    resumed = DBOS.resume_workflow(handle.workflow_id)
    assert resumed.get_result() is None
    assert ran == ["first", "second"]


@pytest.mark.parametrize("how", ["queue", "limited-queue", "start_workflow", "direct-start"])
def test_a_cancel_before_the_execution_registers_still_stops_it(
    launched: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A cancel that lands after the row became this process's (a claim, a direct start) but
    before its execution registered here finds nothing to stop: the execution must learn of
    it when it registers, not run its steps (it did, on SQLite, before 2026-12-02)."""
    _cancel_before_registration(launched, monkeypatch, how, DBOS.cancel_workflow)


def test_a_cancel_from_another_process_before_the_execution_registers_stops_it(
    launched_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with the cancel from another connection (a client), heard by notification
    on PostgreSQL while nothing here runs the workflow yet. (On SQLite another process's
    cancel reaches a running workflow at the scheduler's next sweep.)"""
    with DBOSClient(launched_pg) as client:
        _cancel_before_registration(launched_pg, monkeypatch, "queue", client.cancel_workflow)


def _cancel_before_registration(
    url: str, monkeypatch: pytest.MonkeyPatch, how: str, cancel: Any
) -> None:
    from dbos_nb.core import workflows

    ran: list[str] = []
    target: list[str] = []
    written, go = threading.Event(), threading.Event()
    register = workflows.register

    def held_register(rt: Any, ex: Any) -> Any:
        if ex.workflow_id in target:
            written.set()  # the row is PENDING and ours; the execution is not registered yet
            go.wait(10)
        return register(rt, ex)

    monkeypatch.setattr(workflows, "register", held_register)

    @DBOS.step()
    def paid() -> None:
        ran.append("paid")

    @DBOS.workflow()
    def wf() -> None:
        paid()

    direct_starts: list[str] = []
    if how == "direct-start":
        # A queue becomes one whose enqueues start their work directly (no claim) once a claim
        # found it has no limit shared between processes: one workflow through it first.
        direct = DBOS._rt().direct
        assert direct is not None
        adopt = direct.adopt

        def counted_adopt(item: Any, is_async: bool) -> bool:
            direct_starts.append(item.workflow_id)
            return adopt(item, is_async)

        monkeypatch.setattr(direct, "adopt", counted_adopt)
        Queue(f"cancel_window_{how}").enqueue(wf).get_result()
        ran.clear()
    target.append(f"cancel-window-{how}")
    with SetWorkflowID(target[0]):
        if how == "start_workflow":
            handle = DBOS.start_workflow(wf)
        else:
            limits = {"concurrency": 2} if how == "limited-queue" else {}
            handle = Queue(f"cancel_window_{how}", **limits).enqueue(wf)  # type: ignore[arg-type]
    assert written.wait(10)
    if how == "direct-start":
        assert direct_starts == [target[0]]  # it did start directly, not through a claim
    rt = DBOS._rt()
    before = rt.stop_mark()
    cancel(handle.workflow_id)
    # The stop found nothing to stop here (from another process: once its notice arrived).
    wait_until(lambda: rt.stop_mark() != before, timeout=10)
    go.set()
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        handle.get_result()
    wait_until(lambda: not DBOS._rt().is_running(handle.workflow_id))
    assert ran == [] and handle.get_status().status == "CANCELLED"
    # Resumed, it runs: the stop was this execution's, not the workflow's for ever.
    assert DBOS.resume_workflow(handle.workflow_id).get_result() is None
    assert ran == ["paid"]


@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel-then-resume", "resume"])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_workflow_resumed_while_its_old_execution_still_runs_here_completes(
    launched: str, cancel_first: bool, is_async: bool
) -> None:
    """Resumed (or recovered) while a step of its first execution still runs in this process:
    the new execution waits for the stale one to stop (it stops at its step's record) and
    finishes the workflow from its last completed step, instead of both waiting for each other
    forever."""
    started = threading.Event()
    release = threading.Event()
    ran: list[int] = []

    def body(i: int) -> int:
        ran.append(i)
        if i == 0 and len(ran) == 1:  # the first execution's first step holds on
            started.set()
            release.wait(10)
        return i

    if is_async:

        @DBOS.step(name="resumed_step_async")
        async def astep(i: int) -> int:
            return await asyncio.to_thread(body, i)

        @DBOS.workflow(name="resumed_wf_async")
        async def awf() -> list[int]:
            return [await astep(i) for i in range(3)]

        handle = DBOS.start_workflow(awf)
    else:

        @DBOS.step(name="resumed_step")
        def step(i: int) -> int:
            return body(i)

        @DBOS.workflow(name="resumed_wf")
        def wf() -> list[int]:
            return [step(i) for i in range(3)]

        handle = DBOS.start_workflow(wf)
    assert started.wait(10)
    if cancel_first:
        DBOS.cancel_workflow(handle.workflow_id)
    resumed = DBOS.resume_workflow(handle.workflow_id)
    time.sleep(0.1)  # the scheduler claims it again while the old execution still runs
    release.set()
    assert resumed.get_result(timeout_sec=20) == [0, 1, 2]
    assert handle.get_status().status == "SUCCESS"
    # Step 1 completed in the old execution after the resume: its outcome is kept, and the
    # new execution replays it instead of running it again; the rest run once each.
    assert ran == [0, 1, 2]


def test_a_cancel_while_the_resumed_execution_waits_for_the_stale_one_stops_it(
    launched: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled, resumed (the new execution waits for the old one, still in a step, to
    stop), then cancelled again while the new one waits: that cancel finds the old execution to
    stop, not the new one, yet the new one must not run the steps of a CANCELLED workflow."""
    from dbos_nb.core import workflows

    started, release, waiting = threading.Event(), threading.Event(), threading.Event()
    ran: list[str] = []
    register = workflows.register

    def watched_register(rt: Any, ex: Any) -> Any:
        out = register(rt, ex)
        if out[1] is not None:
            waiting.set()  # the new execution now waits for the stale one to end
        return out

    monkeypatch.setattr(workflows, "register", watched_register)

    entered: list[int] = []

    @DBOS.step(name="stale_wait_first")
    def first() -> None:
        ran.append("first")

    @DBOS.step(name="stale_wait_second")
    def second() -> None:
        ran.append("second")

    @DBOS.workflow(name="stale_wait_wf")
    def wf() -> None:
        entered.append(1)
        if len(entered) == 1:  # the first execution holds on before any operation
            started.set()
            release.wait(10)
        first()
        second()

    handle = DBOS.start_workflow(wf)
    wid = handle.workflow_id
    assert started.wait(10)
    DBOS.cancel_workflow(wid)
    DBOS.resume_workflow(wid)
    assert waiting.wait(10)
    DBOS.cancel_workflow(wid)
    release.set()
    wait_until(lambda: not DBOS._rt().is_running(wid), timeout=10)
    time.sleep(0.1)
    assert handle.get_status().status == "CANCELLED"
    assert ran == []
    # Resumed once more, it runs: the stop was that execution's.
    assert DBOS.resume_workflow(wid).get_result(timeout_sec=20) is None
    assert ran == ["first", "second"]


def test_a_stale_execution_arriving_late_does_not_stop_the_current_one(launched: str) -> None:
    """An execution whose claim was superseded before it began (the row names another owner)
    waits for the workflow's result: it never stops the execution that owns the row."""
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.core.workflows import execute

    started = threading.Event()
    release = threading.Event()

    @DBOS.step(name="owned_step")
    def owned_step() -> str:
        started.set()
        release.wait(10)
        return "done"

    @DBOS.workflow(name="owned_wf")
    def owned_wf() -> str:
        return owned_step()

    handle = DBOS.start_workflow(owned_wf)
    assert started.wait(10)
    rt = get_runtime()
    reg = owned_wf.__dbos_nb_registration__  # type: ignore[attr-defined]
    late: list[Any] = []
    thread = threading.Thread(
        target=lambda: late.append(
            execute(rt, reg, handle.workflow_id, "superseded-owner", (), {}, None)
        )
    )
    thread.start()
    thread.join(0.3)
    release.set()
    assert handle.get_result(timeout_sec=20) == "done"
    thread.join(20)
    assert late == ["done"]  # the late one waited and got the owner's result


def test_a_registration_whose_row_read_fails_leaves_nothing_registered(
    launched: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row read at registration (after a stop that found nothing to stop) can fail, the
    database gone, say: the execution is then not begun, and must not stay registered, or the
    workflow would look running in this process for ever."""
    from dbos_nb.core import workflows
    from dbos_nb.core.runtime import get_runtime

    @DBOS.workflow(name="read_fails_wf")
    def wf() -> None:
        pass

    rt = get_runtime()

    def unreachable(_wid: str) -> Any:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(rt.store, "get_workflow", unreachable)
    ex = workflows.Execution(
        wf.__dbos_nb_registration__,  # type: ignore[attr-defined]
        "read-fails",
        "some-owner",
        (),
        {},
        None,
        fresh=True,
        stop_mark=-1,  # matches no mark: the row is read
    )
    with pytest.raises(ConnectionError):
        workflows.register(rt, ex)
    assert not rt.is_running("read-fails")


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_database_lost_while_registering_hands_the_workflow_back(
    launched: str, monkeypatch: pytest.MonkeyPatch, is_async: bool
) -> None:
    """The database lost while an execution registers (its row read after a stop that found
    nothing to stop): nothing ran, and the workflow goes back to its queue and runs, rather
    than staying PENDING under this live process, which nothing would ever run again."""
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.storage.reconnect import mark_lost

    rt = get_runtime()
    marks = iter(range(10**9))
    monkeypatch.setattr(rt, "stop_mark", lambda: next(marks))  # every registration reads
    lost: list[str] = []
    read = rt.store.get_workflow

    def lost_once(workflow_id: str) -> Any:
        if workflow_id.startswith("lost-at-registration") and not lost:
            lost.append(workflow_id)
            raise mark_lost(ConnectionError("server closed the connection unexpectedly"))
        return read(workflow_id)

    monkeypatch.setattr(rt.store, "get_workflow", lost_once)
    if is_async:

        @DBOS.workflow(name="lost_at_registration_async")
        async def awf() -> int:
            return 5

        target: Any = awf
    else:

        @DBOS.workflow(name="lost_at_registration")
        def wf() -> int:
            return 5

        target = wf
    with SetWorkflowID(f"lost-at-registration-{is_async}"):
        handle = Queue("lost_at_registration_q").enqueue(target)
    assert handle.get_result(timeout_sec=20) == 5
    assert lost == [handle.workflow_id]


def test_cancel_children_and_unknown_ids(launched: str) -> None:
    gate = threading.Event()

    @DBOS.workflow()
    def child() -> None:
        gate.wait(5)
        DBOS.sleep(0.01)

    @DBOS.workflow()
    def parent() -> None:
        DBOS.start_workflow(child).get_result()

    with SetWorkflowID("p"):
        handle = DBOS.start_workflow(parent)
    deadline = time.time() + 10
    while DBOS.get_workflow_status("p-1") is None and time.time() < deadline:
        time.sleep(0.01)
    DBOS.cancel_workflow("p", cancel_children=True)
    gate.set()
    assert DBOS.get_workflow_status("p-1").status == "CANCELLED"  # type: ignore[union-attr]
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        handle.get_result()
    DBOS.cancel_workflow("no-such-workflow")  # nothing to cancel: not an error, as in DBOS
    assert DBOS.get_workflow_status("no-such-workflow") is None
    with pytest.raises(DBOSNonExistentWorkflowError):
        DBOS.retrieve_workflow("no-such-workflow")


def test_fork_reuses_steps_before_start_step(launched: str) -> None:
    calls: list[int] = []

    @DBOS.step()
    def record(i: int) -> int:
        calls.append(i)
        return i

    @DBOS.workflow()
    def wf() -> list[int]:
        return [record(i) for i in range(4)]

    with SetWorkflowID("orig"):
        wf()
    assert calls == [0, 1, 2, 3]
    forked = DBOS.fork_workflow("orig", 3)  # keeps steps 1 and 2, runs 3 and 4 again
    assert forked.get_result() == [0, 1, 2, 3]
    assert calls == [0, 1, 2, 3, 2, 3]
    with pytest.raises(DBOSNonExistentWorkflowError):
        DBOS.fork_workflow("missing", 1)
    # Bad requests are refused before anything is written.
    with pytest.raises(UnknownQueueError, match="no_such_queue"):
        DBOS.fork_workflow("orig", 1, queue_name="no_such_queue")
    for bad_step in (None, "1", 1.5, True):
        with pytest.raises(DbosNbError, match="start_step"):
            DBOS.fork_workflow("orig", bad_step)  # type: ignore[arg-type]
    with pytest.raises(DBOSConflictingWorkflowError, match="orig"), SetWorkflowID("orig"):
        DBOS.fork_workflow("orig", 1)
    with pytest.raises(DBOSConflictingWorkflowError), SetWorkflowID(forked.workflow_id):
        DBOS.fork_workflow("orig", 1)
    assert len(DBOS.list_workflows()) == 2
    # The id given by SetWorkflowID is used once, by the fork.
    with SetWorkflowID("fork-2"):
        assert DBOS.fork_workflow("orig", 3).workflow_id == "fork-2"
        assert wf() == [0, 1, 2, 3]
    assert {w.workflow_id for w in DBOS.list_workflows()} >= {"orig", "fork-2"}
    assert len(DBOS.list_workflows()) == 4
    # The lineage is recorded, as DBOS records it, and can be filtered on.
    orig = DBOS.get_workflow_status("orig")
    fork = DBOS.get_workflow_status("fork-2")
    assert orig is not None and fork is not None
    assert (orig.forked_from, orig.was_forked_from) == (None, True)
    assert (fork.forked_from, fork.was_forked_from) == ("orig", False)
    forks = DBOS.list_workflows(forked_from="orig")
    assert {w.workflow_id for w in forks} == {forked.workflow_id, "fork-2"}
    assert [w.workflow_id for w in DBOS.list_workflows(was_forked_from=True)] == ["orig"]
    assert len(DBOS.list_workflows(was_forked_from=False)) == 3
    with pytest.raises(DbosNbError, match="was_forked_from"):
        DBOS.list_workflows(was_forked_from="yes")


def test_a_fork_onto_an_id_taken_meanwhile_is_a_conflict(launched: str) -> None:
    """Another process takes the new id between the fork's check and its insert (here: an
    uncommitted insert on another connection): DBOSConflictingWorkflowError, not the
    database's integrity error."""
    from sqlalchemy import insert

    from dbos_nb.storage.database import Database
    from dbos_nb.storage.schema import workflow_status

    @DBOS.workflow(name="fork_source")
    def fork_source() -> int:
        return 1

    with SetWorkflowID("fork-src"):
        fork_source()
    outcome: list[BaseException | None] = []

    def fork() -> None:
        try:
            with SetWorkflowID("fork-taken"):
                DBOS.fork_workflow("fork-src", 1)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    other = Database(launched)
    try:
        with other.write() as conn:
            conn.execute(
                insert(workflow_status).values(
                    workflow_uuid="fork-taken",
                    status="SUCCESS",
                    name="x",
                    created_at=1,
                    updated_at=1,
                )
            )
            thread = threading.Thread(target=fork)
            thread.start()
            thread.join(0.5)
        thread.join(20)
    finally:
        other.dispose()
    assert len(outcome) == 1 and isinstance(outcome[0], DBOSConflictingWorkflowError), outcome


def test_nondeterministic_replay_is_detected(launched: str) -> None:
    @DBOS.step()
    def s1() -> int:
        return 1

    @DBOS.step()
    def s2() -> int:
        return 2

    which = {"step": s1}

    @DBOS.workflow()
    def wf() -> int:
        return which["step"]()

    with SetWorkflowID("nd"):
        wf()
    DBOS.fork_workflow("nd", 5)  # copies step 1 (s1) into a new workflow
    which["step"] = s2
    forked = DBOS.fork_workflow("nd", 2)
    with pytest.raises(DBOSUnexpectedStepError, match="not deterministic"):
        forked.get_result()


def test_list_workflows_filters(launched: str) -> None:
    @DBOS.workflow()
    def ok(i: int) -> int:
        return i

    @DBOS.workflow()
    def bad() -> None:
        raise ValueError()

    for i in range(5):
        with SetWorkflowID(f"ok-{i}"):
            ok(i)
    with pytest.raises(ValueError), SetWorkflowID("bad-0"):
        bad()
    assert [w.workflow_id for w in DBOS.list_workflows(name=ok.__qualname__)] == [
        f"ok-{i}" for i in range(5)
    ]
    assert [w.workflow_id for w in DBOS.list_workflows(status="ERROR")] == ["bad-0"]
    page = DBOS.list_workflows(name=ok.__qualname__, limit=2, offset=1, sort_desc=True)
    assert [w.workflow_id for w in page] == ["ok-3", "ok-2"]
    first = DBOS.get_workflow_status("ok-0")
    assert first is not None and first.created_at is not None
    later = DBOS.list_workflows(start_time=first.created_at, name=ok.__qualname__)
    assert len(later) == 5
    assert DBOS.list_workflows(end_time=first.created_at - 1) == []
    light = DBOS.list_workflows(workflow_ids=["ok-1"], load_input=False, load_output=False)
    assert light[0].output is None and light[0].status == "SUCCESS"


def test_list_filters_find_steps_enqueued_alone_and_check_statuses(launched: str) -> None:
    @DBOS.step(name="alone_step")
    def alone_step(i: int) -> int:
        return i * 2

    queue = Queue("alone_q")
    handle = queue.enqueue(alone_step, 4)
    assert handle.get_result() == 8
    # Known by its own name, as the frames and the CLI show it (stored under a prefix).
    found = DBOS.list_workflows(name="alone_step")
    assert [w.workflow_id for w in found] == [handle.workflow_id]
    assert [w.workflow_id for w in DBOS.list_workflows(name=["alone_step", "x"])] == [
        handle.workflow_id
    ]
    assert [w.workflow_id for w in DBOS.list_workflows(status="success")] == [handle.workflow_id]
    with DBOSClient(launched) as client:
        assert [w.workflow_id for w in client.list_workflows(name="alone_step")] == [
            handle.workflow_id
        ]
        with pytest.raises(DbosNbError, match=r"unknown status 'BOGUS'.*ENQUEUED"):
            client.list_workflows(status="BOGUS")
    for bad in ("error ", "done", ["SUCCESS", "nope"]):
        with pytest.raises(DbosNbError, match="unknown status"):
            DBOS.list_workflows(status=bad)
        with pytest.raises(DbosNbError, match="unknown status"):
            DBOS.list_queued_workflows(status=bad)


def test_durable_sleep_records_wake_time(launched: str) -> None:
    @DBOS.workflow()
    def sleeper() -> str:
        DBOS.sleep(0.05)
        return "woke"

    with SetWorkflowID("sleepy"):
        t0 = time.monotonic()
        assert sleeper() == "woke"
        assert time.monotonic() - t0 >= 0.05
    steps = DBOS.list_workflow_steps("sleepy")
    assert steps[0].function_name == "DBOS.sleep"
    assert isinstance(steps[0].output, int)


def test_inside_information(launched: str) -> None:
    seen: dict[str, Any] = {}

    @DBOS.step()
    def inner() -> None:
        seen["step_wf"] = DBOS.workflow_id
        seen["step_id"] = DBOS.step_id

    @DBOS.workflow()
    def outer() -> None:
        seen["wf"] = DBOS.workflow_id
        inner()

    with SetWorkflowID("inside"):
        outer()
    assert seen == {"wf": "inside", "step_wf": "inside", "step_id": 1}
    assert DBOS.workflow_id is None
    assert DBOS.step_status is None
    assert isinstance(DBOS.application_version, str)
    DBOS.logger.info("logger works")


def test_decorators_keep_signature_and_doc() -> None:
    def original(a: int, b: str = "x") -> str:
        """Docstring kept."""
        return b * a

    documented = DBOS.workflow()(original)
    assert documented.__doc__ == "Docstring kept."
    assert inspect.signature(documented) == inspect.signature(original)
    assert list(inspect.signature(documented).parameters) == ["a", "b"]
    assert documented.__name__ == "original"


def test_not_launched_error() -> None:
    @DBOS.workflow()
    def wf() -> None:
        return None

    with pytest.raises(DBOSNotLaunchedError, match=r"DBOS\.launch"):
        wf()


def test_async_transactions_raise_a_clear_error() -> None:
    with pytest.raises(DbosNbError, match="database session"):

        @DBOS.transaction()
        async def not_supported() -> None:
            return None


def test_conflicting_registration_from_another_module() -> None:
    def f() -> None:
        return None

    DBOS.workflow(name="taken_name")(f)

    def g() -> None:
        return None

    g.__module__ = "some_other_module"
    g.__code__ = compile("def g(): pass", "/elsewhere/other.py", "exec").co_consts[0]
    with pytest.raises(DBOSConflictingRegistrationError, match="taken_name"):
        DBOS.workflow(name="taken_name")(g)


def test_sync_api_works_inside_a_running_event_loop(launched: str) -> None:
    @DBOS.step()
    def s() -> int:
        return 5

    @DBOS.workflow()
    def wf() -> int:
        return s()

    async def in_loop() -> list[Any]:
        # A Jupyter cell runs inside an event loop; the sync API must work there.
        out: list[Any] = [wf()]
        handle = DBOS.start_workflow(wf)
        out.append(handle.get_result())
        out.append(len(DBOS.list_workflows()))
        return out

    assert asyncio.run(in_loop()) == [5, 5, 2]


def test_recreate_dbos_many_times(db_url: str) -> None:
    for i in range(20):
        DBOS(config=config(db_url))

        @DBOS.step()
        def s(x: int) -> int:
            return x

        @DBOS.workflow()
        def wf(x: int) -> int:
            return s(x) + 1

        DBOS.launch()
        with SetWorkflowID(f"round-{i}"):
            assert wf(i) == i + 1
        DBOS.destroy()
    assert not [t for t in threading.enumerate() if t.name.startswith("dbos_nb")]
    DBOS(config=config(db_url))
    DBOS.launch()
    assert len(DBOS.list_workflows()) == 20


def test_destroy_during_a_direct_call_says_shutdown_and_relaunch_resumes(launched: str) -> None:
    """DBOS.destroy() while a thread runs a workflow called directly: that caller learns that
    the shutdown stopped it (it is not cancelled) and the next launch finishes it, without
    running its completed step again."""
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []
    outcome: list[BaseException | str] = []

    @DBOS.step(name="shut_first")
    def first() -> str:
        calls.append("first")
        return "1"

    @DBOS.step(name="shut_gate")
    def gate() -> str:
        calls.append("gate")
        started.set()
        release.wait(20)
        return "2"

    @DBOS.workflow(name="shut_wf")
    def stopped() -> str:
        return first() + gate() + first()

    def run_caller() -> None:
        try:
            with SetWorkflowID("shut-1"):
                outcome.append(stopped())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run_caller)
    thread.start()
    assert started.wait(20)
    closer = threading.Thread(target=DBOS.destroy)
    closer.start()
    with DBOSClient(launched) as client:  # destroy hands the workflow back before the step ends

        def handed_back() -> bool:
            status = client.get_workflow_status("shut-1")
            return status is not None and status.status == "ENQUEUED"

        wait_until(handed_back)
    release.set()
    closer.join(20)
    thread.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], WorkflowPreempted), outcome
    assert outcome[0].reason == "shutdown" and "resumes" in str(outcome[0])
    DBOS(config=config(launched))
    DBOS.launch()
    assert DBOS.retrieve_workflow("shut-1").get_result(timeout_sec=20) == "121"
    assert calls.count("first") == 2 and calls[0] == "first"


def test_enqueueing_a_function_the_registry_lost_is_refused(db_url: str) -> None:
    """After DBOS.destroy(destroy_registry=True), this process claims none of the old
    functions: enqueueing one would leave it queued, unseen. Refused, with nothing written,
    until its decorator runs again."""

    def body(x: int) -> int:
        return x * 2

    DBOS(config=config(db_url))
    wf = DBOS.workflow(name="lost_wf")(body)
    queue = Queue("lost_q")
    DBOS.launch()
    assert queue.enqueue(wf, 1).get_result(timeout_sec=10) == 2
    DBOS.destroy(destroy_registry=True)
    DBOS(config=config(db_url))
    queue = Queue("lost_q")
    DBOS.launch()
    with pytest.raises(UnknownWorkflowNameError, match=r"'lost_wf'.*destroy_registry"):
        queue.enqueue(wf, 2)
    with pytest.raises(UnknownWorkflowNameError, match="lost_wf"):
        queue.enqueue_many(wf, [(3,), (4,)], batch_id="lost")
    assert len(DBOS.list_workflows(name="lost_wf")) == 1
    assert wf(5) == 10  # a direct call runs here, in this thread
    DBOS.workflow(name="lost_wf")(body)  # the definition cell is run again
    assert queue.enqueue(wf, 6).get_result(timeout_sec=10) == 12


def test_workflow_registered_after_launch_is_recovered(db_url: str) -> None:
    """A PENDING workflow whose function is unknown at launch resumes once it is registered."""
    calls: list[str] = []

    def body() -> str:
        calls.append("ran")
        return "late"

    DBOS(config=config(db_url))
    wf = DBOS.workflow(name="late_wf")(body)
    DBOS.launch()
    # Simulate a crash: a PENDING row of this executor that no thread is running.
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.serialization import dump_inputs
    from dbos_nb.storage.store import NewWorkflow

    rt = get_runtime()
    rt.store.insert_workflow(
        NewWorkflow(
            workflow_id="orphan",
            name="late_wf",
            inputs=dump_inputs("late_wf", (), {}),
            status="PENDING",
            created_at=rt.now_ms(),
            executor_id=rt.executor_id,
            owner_xid="dead-owner",
        )
    )
    DBOS.destroy(destroy_registry=True)
    DBOS(config=config(db_url))
    DBOS.launch()
    time.sleep(0.2)
    assert DBOS.get_workflow_status("orphan").status == "ENQUEUED"  # type: ignore[union-attr]
    assert calls == []
    DBOS.workflow(name="late_wf")(body)  # the definition cell is run again
    assert DBOS.retrieve_workflow("orphan").get_result(timeout_sec=10) == "late"
    assert calls == ["ran"]
    del wf


def test_recovery_dead_letters_after_max_attempts(db_url: str) -> None:
    DBOS(config=config(db_url))

    @DBOS.workflow(name="fragile", max_recovery_attempts=1)
    def fragile() -> str:
        return "ok"

    DBOS.launch()
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.serialization import dump_inputs
    from dbos_nb.storage.store import NewWorkflow

    rt = get_runtime()
    rt.store.insert_workflow(
        NewWorkflow(
            workflow_id="crashy",
            name="fragile",
            inputs=dump_inputs("fragile", (), {}),
            status="PENDING",
            created_at=rt.now_ms(),
            executor_id=rt.executor_id,
            owner_xid="x",
            recovery_attempts=2,
        )
    )
    DBOS.destroy()
    DBOS(config=config(db_url))
    DBOS.launch()
    from dbos_nb import DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded

    with pytest.raises(DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded):
        DBOS.retrieve_workflow("crashy").get_result(timeout_sec=10)
    status = DBOS.get_workflow_status("crashy")
    assert status is not None and status.status == "MAX_RECOVERY_ATTEMPTS_EXCEEDED"


def test_ids_too_long_for_the_database_are_refused_with_a_typed_error(launched: str) -> None:
    """PostgreSQL's id columns hold 255 characters: a longer id (given, or derived for a child
    or a batch item) is refused by name before it reaches the database, on both backends."""
    from dbos_nb import DBOSClient, EnqueueOptions

    @DBOS.workflow(name="long_child")
    def long_child() -> int:
        return 1

    @DBOS.workflow(name="long_parent")
    def long_parent() -> int:
        return long_child() + 1

    queue = Queue("long_q")
    with pytest.raises(DbosNbError, match="a workflow id can have at most 255 characters, got 256"):
        SetWorkflowID("w" * 256)
    with (
        SetWorkflowID("p" * 255),
        pytest.raises(DbosNbError, match=r"a child workflow's id .* at most 255"),
    ):
        long_parent()
    with SetWorkflowID("p" * 250):
        assert long_parent() == 2  # its child's id, `<parent>-1`, fits
    with pytest.raises(DbosNbError, match=r"a batch item's id .* at most 255"):
        queue.enqueue_many(long_child, [()] * 10, batch_id="b" * 254, unpack=True)
    client = DBOSClient(launched)
    try:
        options: EnqueueOptions = {
            "queue_name": "long_q",
            "workflow_name": "long_child",
            "workflow_id": "c" * 300,
        }
        with pytest.raises(DbosNbError, match="at most 255 characters, got 300"):
            client.enqueue(options)
    finally:
        client.destroy()
    assert not [s for s in DBOS.list_workflows() if len(s.workflow_id) > 255]


class _Pair(Exception):
    """An exception class whose __init__ takes two arguments: it pickles, but does not load."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")
        self.a, self.b = a, b


def test_an_output_that_cannot_be_loaded_back_fails_when_recorded(launched: str) -> None:
    """Not later, when a replay (recovery, resume, fork) reads it: the step fails at once with
    a typed error that says what to do, and a replay of the workflow says the same."""

    @DBOS.step(name="make_pair")
    def make_pair() -> _Pair:
        return _Pair(1, 2)  # returned as a value, not raised

    @DBOS.workflow(name="pair_wf")
    def pair_wf() -> str:
        try:
            return repr(make_pair())
        except DBOSNonSerializableError as exc:
            return f"refused: {exc}"

    handle = DBOS.start_workflow(pair_wf)
    first = handle.get_result(timeout_sec=10)
    assert first.startswith("refused: value of type _Pair is serialized but cannot be loaded back")
    assert DBOS.fork_workflow(handle.workflow_id, 2).get_result(timeout_sec=10) == first


def test_an_execution_that_lost_its_workflow_stops_at_its_next_record(launched: str) -> None:
    """A stale execution (its process froze while another took the workflow over and went on)
    stops when it finds its step recorded by the other: it never runs the later steps."""
    from dbos_nb import serialization
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.storage.database import Database

    gate = threading.Event()
    calls: list[str] = []

    @DBOS.step(name="stale_work")
    def work() -> int:
        calls.append("work")
        gate.wait(20)
        return 1

    @DBOS.step(name="stale_next")
    def later() -> int:
        calls.append("next")
        return 2

    @DBOS.workflow(name="stale_wf")
    def flow() -> int:
        return work() + later()

    handle = Queue("stale_q").enqueue(flow)
    wid = handle.workflow_id
    wait_until(lambda: calls == ["work"])
    # Meanwhile another execution took the workflow over and recorded the step.
    db = Database(launched)
    table = ("dbos_nb." if db.is_postgres else "") + "workflow_status"
    with db.write() as conn:
        conn.execute(
            sa.text(f"UPDATE {table} SET owner_xid = 'other' WHERE workflow_uuid = :w"), {"w": wid}
        )
    db.dispose()
    rt = get_runtime()
    now = rt.now_ms()
    rt.store.record_step(wid, "other", 1, "stale_work", serialization.dumps(1), None, now, now)
    gate.set()
    wait_until(lambda: wid not in rt.running_ids())
    assert calls == ["work"]


def test_a_stale_step_never_lands_in_a_new_workflow_under_the_same_id(launched: str) -> None:
    """A workflow cancelled and deleted while its step ran, then started afresh under the same
    id: the old step's outcome, arriving late, is not kept for the new workflow, which runs
    its own step."""
    gate = threading.Event()
    calls: list[str] = []

    @DBOS.step(name="reuse_step")
    def step(tag: str) -> str:
        calls.append(tag)
        if tag == "old":
            gate.wait(20)
        return f"from {tag}"

    @DBOS.workflow(name="reuse_wf")
    def job(tag: str) -> str:
        return step(tag)

    with SetWorkflowID("reused"):
        DBOS.start_workflow(job, "old")
    wait_until(lambda: calls == ["old"])
    DBOS.cancel_workflow("reused")
    DBOS.delete_workflow("reused")
    with SetWorkflowID("reused"):
        fresh = DBOS.start_workflow(job, "new")  # waits here for the old execution to stop
    gate.set()
    assert fresh.get_result(timeout_sec=20) == "from new"
    assert calls == ["old", "new"]


def test_an_applications_own_database_error_is_the_workflows_outcome(launched: str) -> None:
    """A workflow body that meets its own database's error (a lost connection to the
    application's database, a cancelled query) fails with it: only dbos_nb's own checkpoints
    losing the system database make a workflow go back to its queue."""
    import psycopg

    raised: list[Exception] = [
        psycopg.OperationalError("connection failed: the application's database is down"),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
    ]
    runs: list[int] = []

    @DBOS.workflow(name="own_db_error_wf")
    def reads_its_own_database(i: int) -> None:
        runs.append(i)
        raise raised[i]

    for i, error in enumerate(raised):
        with SetWorkflowID(f"own-db-{i}"), pytest.raises(type(error)):
            reads_its_own_database(i)
        status = DBOS.get_workflow_status(f"own-db-{i}")
        assert status is not None and status.status == "ERROR"
    assert runs == [0, 1]  # each ran once: nothing was handed back to run again


def test_a_start_whose_write_was_run_twice_runs_its_own_row(
    launched: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct start whose row was written by an attempt whose reply got lost, then written
    again (as `reconnect` does after a lost connection), finds its own row and runs it rather
    than waiting on it for ever."""
    from dbos_nb.core.runtime import get_runtime

    store = get_runtime().store
    write_once = store.insert_workflow

    def write_twice(row: Any) -> Any:
        write_once(row)  # committed; its reply lost
        return write_once(row)  # run again: the id is taken, by this very write

    monkeypatch.setattr(store, "insert_workflow", write_twice)

    @DBOS.workflow(name="written_twice_wf")
    def written_twice(x: int) -> int:
        return x + 1

    called: list[int] = []

    def call() -> None:
        with SetWorkflowID("written-twice"):
            called.append(written_twice(1))

    caller = threading.Thread(target=call, daemon=True)  # a hang fails the test, not the run
    caller.start()
    caller.join(20)
    assert called == [2]
    with SetWorkflowID("started-twice"):
        assert DBOS.start_workflow(written_twice, 2).get_result(timeout_sec=20) == 3


def test_an_outcome_that_cannot_be_recorded_hands_the_workflow_back(
    launched: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recording a finished workflow's outcome meets a lost system database (once): the
    direct caller is told so, and the workflow runs again from its recorded steps to record
    its outcome."""
    import psycopg

    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.storage.reconnect import mark_lost

    store = get_runtime().store
    finish = store.finish_workflow
    failures = [mark_lost(psycopg.OperationalError("server closed the connection"))]

    def finish_once_lost(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return finish(*args, **kwargs)

    monkeypatch.setattr(store, "finish_workflow", finish_once_lost)
    calls: list[int] = []

    @DBOS.step(name="unrecorded_step")
    def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    @DBOS.workflow(name="unrecorded_wf")
    def unrecorded(x: int) -> int:
        return double(x)

    with SetWorkflowID("unrecorded"), pytest.raises(WorkflowPreempted, match="system database"):
        unrecorded(4)
    assert DBOS.retrieve_workflow("unrecorded").get_result(timeout_sec=20) == 8
    assert calls == [4]  # the step's record stood: only the outcome was written again


class _Bulky:
    """Stands for a DataFrame passed to a workflow: picklable, and weakly referable."""

    def __init__(self, size: int) -> None:
        self.payload = b"x" * size


def test_an_idle_worker_thread_keeps_no_workflow_inputs_alive(launched: str) -> None:
    """A workflow's inputs (a frame of gigabytes) are freed once it has run: the pool thread
    that ran it, idle now, holds neither its last task's arguments (the claim, with the
    pickled inputs) until it exits, nor the unpickled inputs."""
    from dbos_nb.models import ClaimedWorkflow

    seen: list[weakref.ref[_Bulky]] = []

    @DBOS.workflow(name="wf_keeps_no_inputs")
    def measure(bulky: _Bulky) -> int:
        seen.append(weakref.ref(bulky))
        return len(bulky.payload)

    queue = Queue("q_inputs_freed")
    handles = [queue.enqueue(measure, _Bulky(1000)) for _ in range(5)]
    assert [h.get_result() for h in handles] == [1000] * 5
    ids = {h.workflow_id for h in handles}
    assert len(seen) == 5

    def freed() -> bool:
        gc.collect()
        claims = [o for o in gc.get_objects() if isinstance(o, ClaimedWorkflow)]
        return not any(c.workflow_id in ids for c in claims) and all(r() is None for r in seen)

    wait_until(freed)


def test_resume_puts_a_workflow_back_in_its_own_queue(db_url: str) -> None:
    """A cancelled item of a limited queue resumes under that queue's limits (DBOS resumes into
    its internal queue, which would skip them), and no longer looks finished."""
    DBOS(config=config(db_url))
    Queue("resume_own_q", concurrency=1)
    DBOS.launch()
    DBOS.destroy()  # nothing runs the rows below: what resume writes stays to be read
    with DBOSClient(db_url) as client:
        options: Any = {"queue_name": "resume_own_q", "workflow_name": "resume_own_wf"}
        own = client.enqueue({**options, "allow_unregistered": True}, 1).workflow_id
        elsewhere = client.enqueue(
            {**options, "queue_name": "undeclared_q", "allow_unregistered": True}, 2
        ).workflow_id
        for wid in (own, elsewhere):
            client.cancel_workflow(wid)
            cancelled = client.retrieve_workflow(wid).get_status()
            assert cancelled.status == "CANCELLED" and cancelled.completed_at is not None
            client.resume_workflow(wid)
        resumed = client.retrieve_workflow(own).get_status()
        assert (resumed.status, resumed.queue_name) == ("ENQUEUED", "resume_own_q")
        assert resumed.completed_at is None
        # A queue no process declared would keep it waiting: the internal queue runs it.
        assert client.retrieve_workflow(elsewhere).get_status().queue_name == INTERNAL_QUEUE
