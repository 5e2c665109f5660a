"""DBOS calls made by workflow code are operations of the workflow (both backends).

`DBOS.fork_workflow`, `cancel_workflow`, `get_result`, `handle.get_result()`, the status reads and
listings, called by a workflow (not by a step), are recorded under DBOS's names for them; when the
workflow runs again (recovery after a crash, a resume after a cancel) they return or raise what
the first run got, and a fork, a cancel or a delete is not made a second time.

Run as a script, this module is the application that the crash test starts and kills:

    python test_checkpointed_calls.py crash|recover SYSTEM_URL WORKDIR
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import append_effect, kill_when_ready, wait_until
from dbos_nb import (
    DBOS,
    DBOSAwaitedWorkflowCancelledError,
    DBOSClient,
    DBOSNonExistentWorkflowError,
    SetWorkflowID,
)
from dbos_nb.core.runtime import get_runtime

# -- the crash test: SIGKILL after the calls, recovery in a new process -------------------------


def _crash_app(mode: str, url: str, workdir: str) -> None:
    """Phase "crash": a workflow reads a status, forks a workflow, waits for the fork and lists
    workflows, then blocks in a step (after writing WORKDIR/ready) to be killed there. Phase
    "recover": the next launch recovers it; prints its result, forks and recorded steps."""

    @DBOS.step(name="ck_work")
    def work(x: int) -> int:
        append_effect(workdir, f"work{x}")  # a paid call: how often it runs is what matters
        return x

    @DBOS.workflow(name="ck_target")
    def target(x: int) -> int:
        return work(x)

    @DBOS.step(name="ck_crash_point")
    def crash_point() -> str:
        if mode == "crash":
            Path(workdir, "ready").write_text(str(os.getpid()))
            time.sleep(600)
        return "ok"

    @DBOS.workflow(name="ck_manager")
    def manager() -> list[Any]:
        status = DBOS.get_workflow_status("ck-target")
        assert status is not None
        fork = DBOS.fork_workflow("ck-target", 1)  # from operation 1: its step runs again
        value = fork.get_result()
        listed = DBOS.list_workflows(forked_from="ck-target")
        crash_point()
        return [status.status, fork.workflow_id, value, len(listed)]

    DBOS(
        config={
            "name": "ckpt_app",
            "system_database_url": url,
            "executor_id": "ckpt-exec",
            "polling_interval_sec": 0.05,
        }
    )
    DBOS.launch()
    if mode == "crash":
        with SetWorkflowID("ck-target"):
            target(7)
        with SetWorkflowID("ck-manager"):
            manager()
    else:
        result = DBOS.retrieve_workflow("ck-manager").get_result(timeout_sec=60)
        forks = [w.workflow_id for w in DBOS.list_workflows(forked_from="ck-target")]
        steps = [[s.function_id, s.function_name] for s in DBOS.list_workflow_steps("ck-manager")]
        print(json.dumps({"result": result, "forks": forks, "steps": steps}))
    DBOS.destroy()


def test_calls_recorded_before_a_crash_are_not_made_again(db_url: str, tmp_path: Path) -> None:
    script = [sys.executable, __file__]
    kill_when_ready([*script, "crash", db_url, str(tmp_path)], tmp_path)
    assert (tmp_path / "effects.log").read_text().split() == ["work7", "work7"]
    (tmp_path / "ready").unlink()

    out = subprocess.run(
        [*script, "recover", db_url, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    (fork_id,) = report["forks"]  # forked once: the recovery replayed the fork
    assert report["result"] == ["SUCCESS", fork_id, 7, 1]
    # The target's step and the fork's, and no third run.
    assert (tmp_path / "effects.log").read_text().split() == ["work7", "work7"]
    # Operations numbered from 1, as in DBOS; the names are DBOS's. The fork's handle comes
    # from `retrieve_workflow`, a status read of its own, as in DBOS.
    assert report["steps"] == [
        [1, "DBOS.getStatus"],
        [2, "DBOS.forkWorkflow"],
        [3, "DBOS.getStatus"],
        [4, "DBOS.getResult"],
        [5, "DBOS.listWorkflows"],
        [6, "ck_crash_point"],
    ]


# -- in one process: a cancel stops the workflow, a resume replays it ---------------------------


def _cancel_when_entered(workflow_id: str, entered: threading.Event) -> None:
    assert entered.wait(20)
    DBOS.cancel_workflow(workflow_id)


def test_a_resumed_workflow_replays_its_calls_without_making_them_again(launched: str) -> None:
    runs: list[str] = []
    entered, release = threading.Event(), threading.Event()
    victim_gate = threading.Event()

    @DBOS.step(name="ck_paid")
    def paid(tag: str) -> str:
        runs.append(tag)
        return tag.upper()

    @DBOS.workflow(name="ck_forked")
    def forked(tag: str) -> str:
        return paid(tag)

    @DBOS.workflow(name="ck_failing")
    def failing() -> None:
        raise ValueError("the child's own failure")

    @DBOS.workflow(name="ck_victim")
    def victim() -> str:
        victim_gate.wait(20)
        return paid("victim")

    @DBOS.step(name="ck_blocker")
    def blocker() -> None:
        entered.set()
        release.wait(20)

    @DBOS.workflow(name="ck_calls")
    def calls() -> list[Any]:
        fork = DBOS.fork_workflow("ck-forked", 1)
        value = fork.get_result()
        state = fork.get_status().status
        DBOS.cancel_workflow("ck-victim")
        try:
            DBOS.get_result("ck-failing")
            failure = ""
        except ValueError as exc:
            failure = str(exc)
        steps = DBOS.list_workflow_steps("ck-forked")
        blocker()
        return [fork.workflow_id, value, state, failure, len(steps)]

    with SetWorkflowID("ck-forked"):
        assert forked("a") == "A"
    with SetWorkflowID("ck-failing"):
        failed = DBOS.start_workflow(failing)
    with pytest.raises(ValueError):
        failed.get_result()
    with SetWorkflowID("ck-victim"):
        DBOS.start_workflow(victim)
    with SetWorkflowID("ck-calls"):
        handle = DBOS.start_workflow(calls)
    _cancel_when_entered("ck-calls", entered)
    release.set()
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        handle.get_result()
    assert runs == ["a", "a"]  # the workflow's step, then the fork's

    # Undo what the first run did, where a second call would show: the victim runs again
    # (a repeated cancel would stop it), the failed child is gone (waiting for it again
    # would raise DBOSNonExistentWorkflowError, not its recorded failure).
    DBOS.resume_workflow("ck-victim")
    DBOS.delete_workflow("ck-failing")
    entered.clear()
    DBOS.resume_workflow("ck-calls")
    fork_id, value, state, failure, count = handle.get_result()
    assert (value, state, failure, count) == ("A", "SUCCESS", "the child's own failure", 1)
    assert [w.workflow_id for w in DBOS.list_workflows(forked_from="ck-forked")] == [fork_id]
    victim_gate.set()
    assert DBOS.retrieve_workflow("ck-victim").get_result() == "VICTIM"
    assert runs == ["a", "a", "victim"]
    steps = DBOS.list_workflow_steps("ck-calls")
    assert [(s.function_id, s.function_name) for s in steps] == [
        (1, "DBOS.forkWorkflow"),
        (2, "DBOS.getStatus"),  # fork_workflow's retrieve_workflow, as in DBOS
        (3, "DBOS.getResult"),
        (4, "DBOS.getStatus"),
        (5, "DBOS.cancelWorkflow"),
        (6, "DBOS.getResult"),
        (7, "DBOS.listWorkflowSteps"),
        (8, "ck_blocker"),
    ]
    # A wait records the workflow it waited for, and its failure as its outcome.
    assert steps[2].child_workflow_id == fork_id and steps[2].output == "A"
    assert steps[5].child_workflow_id == "ck-failing"
    assert isinstance(steps[5].error, ValueError)
    with pytest.raises(DBOSNonExistentWorkflowError):
        DBOS.get_result("ck-failing")  # outside a workflow: a plain wait, as before


def test_async_calls_are_recorded_and_replayed_too(launched: str) -> None:
    runs: list[str] = []
    entered, release = threading.Event(), threading.Event()

    @DBOS.step(name="ack_paid")
    async def paid(tag: str) -> str:
        runs.append(tag)
        return tag.upper()

    @DBOS.workflow(name="ack_forked")
    async def forked(tag: str) -> str:
        return await paid(tag)

    @DBOS.workflow(name="ack_gone")
    def gone() -> int:
        return 1

    @DBOS.step(name="ack_blocker")
    async def blocker() -> None:
        entered.set()
        await asyncio.to_thread(release.wait, 20)

    @DBOS.workflow(name="ack_calls")
    async def calls() -> list[Any]:
        status = await DBOS.get_workflow_status_async("ack-forked")
        assert status is not None
        fork = await DBOS.fork_workflow_async("ack-forked", 1)
        value = await fork.get_result()
        listed = await DBOS.list_queued_workflows_async()
        await DBOS.delete_workflow_async("ack-gone")
        await blocker()
        return [fork.workflow_id, value, status.status, len(listed)]

    async def first_run() -> None:
        with SetWorkflowID("ack-forked"):
            assert await forked("b") == "B"

    asyncio.run(first_run())
    with SetWorkflowID("ack-gone"):
        gone()
    with SetWorkflowID("ack-calls"):
        handle = DBOS.start_workflow(calls)
    _cancel_when_entered("ack-calls", entered)
    release.set()
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        handle.get_result()

    with SetWorkflowID("ack-gone"):  # back again: a repeated delete would remove it
        gone()
    DBOS.resume_workflow("ack-calls")
    fork_id, value, state, queued = handle.get_result()
    assert (value, state, queued) == ("B", "SUCCESS", 0)
    assert runs == ["b", "b"]
    assert [w.workflow_id for w in DBOS.list_workflows(forked_from="ack-forked")] == [fork_id]
    assert DBOS.get_workflow_status("ack-gone") is not None
    steps = DBOS.list_workflow_steps("ack-calls")
    assert [s.function_name for s in steps] == [
        "DBOS.getStatus",
        "DBOS.forkWorkflow",
        "DBOS.getStatus",
        "DBOS.getResult",
        "DBOS.listQueuedWorkflows",
        "DBOS.deleteWorkflow",
        "ack_blocker",
    ]


def test_a_parent_cancelled_while_it_waits_stops_and_records_no_outcome(launched: str) -> None:
    """Cancelled with its children, a parent waiting for a child stops (it does not take the
    child's cancellation for its wait's outcome); resumed with the child, it gets the child's
    result."""
    started, gate = threading.Event(), threading.Event()

    @DBOS.workflow(name="ck_slow_child")
    def slow_child() -> str:
        started.set()
        gate.wait(20)
        DBOS.sleep(0.01)
        return "child done"

    @DBOS.workflow(name="ck_parent")
    def parent() -> str:
        return DBOS.start_workflow(slow_child).get_result()

    with SetWorkflowID("ck-parent"):
        handle = DBOS.start_workflow(parent)
    assert started.wait(20)
    DBOS.cancel_workflow("ck-parent", cancel_children=True)
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        handle.get_result()
    gate.set()
    # Its caller learns of the cancel from the row at once: wait for the execution itself.
    wait_until(lambda: not get_runtime().is_running("ck-parent"))
    names = [s.function_name for s in DBOS.list_workflow_steps("ck-parent")]
    assert names == ["ck_slow_child"]  # the start; the wait recorded nothing
    DBOS.resume_workflow("ck-parent-1")
    DBOS.resume_workflow("ck-parent")
    assert handle.get_result() == "child done"
    names = [s.function_name for s in DBOS.list_workflow_steps("ck-parent")]
    assert names == ["ck_slow_child", "DBOS.getResult"]


def test_calls_inside_a_step_or_outside_a_workflow_are_plain_calls(launched: str) -> None:
    @DBOS.step(name="ck_looks")
    def looks() -> int:
        status = DBOS.get_workflow_status("ck-looker")
        listed = DBOS.list_workflows(workflow_ids=["ck-looker"])
        return len(listed) + (status is not None)

    @DBOS.workflow(name="ck_looker")
    def looker() -> int:
        return looks()

    with SetWorkflowID("ck-looker"):
        assert looker() == 2
    assert [s.function_name for s in DBOS.list_workflow_steps("ck-looker")] == ["ck_looks"]
    # From outside any workflow, nothing is recorded anywhere.
    assert DBOS.retrieve_workflow("ck-looker").get_result() == 2
    assert DBOS.get_result("ck-looker") == 2
    assert len(DBOS.list_workflow_steps("ck-looker")) == 1


if __name__ == "__main__":
    _crash_app(*sys.argv[1:4])


def test_a_cancel_from_another_process_is_not_recorded_as_the_waits_outcome(
    launched: str,
) -> None:
    """The same, cancelled by another process (here a DBOSClient): this execution hears of it
    only at its next sweep or notification, and the awaited child's cancellation can end its
    wait first. That cancellation must not be recorded as the wait's outcome (a resumed parent
    would replay it, though the child, resumed too, succeeds)."""
    gate = threading.Event()

    @DBOS.workflow(name="ck_x_child")
    def x_child() -> str:
        gate.wait(20)
        DBOS.sleep(0.01)
        return "child done"

    @DBOS.workflow(name="ck_x_parent")
    def x_parent() -> str:
        return DBOS.start_workflow(x_child).get_result()

    rt = get_runtime()
    with DBOSClient(launched) as client:
        for i in range(3):
            gate.clear()
            wid = f"ck-x-{i}"
            with SetWorkflowID(wid):
                DBOS.start_workflow(x_parent)
            wait_until(lambda w=wid: rt.is_running(f"{w}-1"))  # type: ignore[misc]
            client.cancel_workflow(wid, cancel_children=True)
            wait_until(lambda w=wid: not rt.is_running(w))  # type: ignore[misc]
            gate.set()
            names = [s.function_name for s in DBOS.list_workflow_steps(wid)]
            assert names == ["ck_x_child"], names
            DBOS.resume_workflow(f"{wid}-1")
            handle = DBOS.resume_workflow(wid)
            assert handle.get_result() == "child done"


def test_calls_gathered_at_once_replay_in_the_same_order(launched: str) -> None:
    """Recorded calls started together (`asyncio.gather`) take their operation numbers in the
    order they are made, not in the order their threads finish: a replay finds each record
    where it looks, and returns what the first run saw (here, a workflow deleted since)."""
    entered, release = threading.Event(), threading.Event()

    @DBOS.workflow(name="gx_target")
    def target() -> int:
        return 7

    @DBOS.step(name="gx_blocker")
    async def blocker() -> None:
        entered.set()
        await asyncio.to_thread(release.wait, 20)

    @DBOS.workflow(name="gx_calls")
    async def gathered() -> list[Any]:
        status, listed, steps = await asyncio.gather(
            DBOS.get_workflow_status_async("gx-target"),
            DBOS.list_workflows_async(workflow_ids=["gx-target"], load_input=False),
            DBOS.list_workflow_steps_async("gx-target"),
        )
        await blocker()
        return [status.status if status else None, len(listed), len(steps)]

    with SetWorkflowID("gx-target"):
        assert target() == 7
    with SetWorkflowID("gx-calls"):
        handle = DBOS.start_workflow(gathered)
    _cancel_when_entered("gx-calls", entered)
    release.set()
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        handle.get_result()
    DBOS.delete_workflow("gx-target")  # a fresh read would now find nothing
    DBOS.resume_workflow("gx-calls")
    assert handle.get_result() == ["SUCCESS", 1, 0]
    names = [s.function_name for s in DBOS.list_workflow_steps("gx-calls")]
    assert names == [
        "DBOS.getStatus",
        "DBOS.listWorkflows",
        "DBOS.listWorkflowSteps",
        "gx_blocker",
    ]
