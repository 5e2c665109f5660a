"""The records of a workflow's reads (`handle.get_result()`, status reads) wait for its next
write (both backends, see `deferred_reads.defer_read`).

A read acts on nothing, so its record may be written with the workflow's next operation, or
with its outcome, instead of with a commit of its own. These tests check that the records wait
while only the workflow's own code runs, that any other operation (here a step) and the
outcome write them first, that they wait no further than MAX_DEFERRED, that a failed read is
recorded at once, and that after a SIGKILL with records waiting the recovery reads again and
runs no child twice.

Run as a script, this module is the application that the crash test starts and kills:

    python test_deferred_reads.py crash|recover SYSTEM_URL WORKDIR
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import append_effect, insert_pending, kill_when_ready
from dbos_nb import DBOS, DBOSAwaitedWorkflowCancelledError, Queue, SetWorkflowID, serialization
from dbos_nb.core import deferred_reads
from dbos_nb.core.runtime import get_runtime
from dbos_nb.errors import READ_RECORDED_ELSEWHERE, WorkflowPreempted
from dbos_nb.storage.step_records import StepRecord, StepRecords


def _recorded(workflow_id: str) -> list[tuple[int, str]]:
    return [(s.function_id, s.function_name) for s in DBOS.list_workflow_steps(workflow_id)]


class Gatherer:
    """A parent workflow that starts `children` children (and, with `failing`, one more, which
    fails), waits for each result in turn (the failing one's last), then waits in its own
    code, outside any operation, until `release` is set; `waiting` is set when it gets
    there."""

    def __init__(self, prefix: str, children: int, failing: bool = False) -> None:
        self.parent, self.child, self.waiting, self.release = _declare(prefix, children, failing)


def _declare(
    prefix: str, children: int, failing: bool
) -> tuple[Callable[[], int], Callable[[int], int], threading.Event, threading.Event]:
    waiting, release = threading.Event(), threading.Event()

    @DBOS.workflow(name=f"{prefix}_child")
    def child(x: int) -> int:
        if x < 0:
            raise ValueError("a child's failure")
        return x

    @DBOS.workflow(name=f"{prefix}_parent")
    def parent() -> int:
        handles = [DBOS.start_workflow(child, x) for x in range(children)]
        failed = DBOS.start_workflow(child, -1) if failing else None
        total = sum(h.get_result() for h in handles)
        if failed is not None:
            try:
                failed.get_result()
            except ValueError:
                total += 1000
        waiting.set()
        release.wait(20)
        return total

    return parent, child, waiting, release


def test_reads_wait_for_the_next_write_and_a_step_writes_them_first(launched: str) -> None:
    g = Gatherer("dr_wait", 3)
    seen_by_step: list[list[str]] = []

    @DBOS.step(name="dr_probe")
    def probe(workflow_id: str) -> None:
        seen_by_step.append([s.function_name for s in DBOS.list_workflow_steps(workflow_id)])

    @DBOS.workflow(name="dr_then_step")
    def then_step() -> int:
        handle = DBOS.start_workflow(g.child, 5)
        value = handle.get_result()
        status = handle.get_status().status
        probe("dr-then-step")
        return value if status == "SUCCESS" else -1

    with SetWorkflowID("dr-wait"):
        handle = DBOS.start_workflow(g.parent)
    assert g.waiting.wait(20)
    # The three starts are recorded; the three reads wait.
    assert _recorded("dr-wait") == [
        (1, "dr_wait_child"),
        (2, "dr_wait_child"),
        (3, "dr_wait_child"),
    ]
    g.release.set()
    assert handle.get_result() == 3
    # Written before the outcome, in order.
    assert _recorded("dr-wait")[3:] == [(n, "DBOS.getResult") for n in (4, 5, 6)]

    with SetWorkflowID("dr-then-step"):
        assert then_step() == 5
    # The step ran after the two reads were written: it saw them.
    assert seen_by_step == [["dr_wait_child", "DBOS.getResult", "DBOS.getStatus"]]


def test_reads_wait_no_further_than_the_limit(
    launched: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deferred_reads, "MAX_DEFERRED", 2)
    g = Gatherer("dr_limit", 5)
    with SetWorkflowID("dr-limit"):
        handle = DBOS.start_workflow(g.parent)
    assert g.waiting.wait(20)
    reads = [n for n, name in _recorded("dr-limit") if name == "DBOS.getResult"]
    assert reads == [6, 7, 8, 9]  # two pairs written; the fifth read waits
    g.release.set()
    assert handle.get_result() == 10
    assert [n for n, name in _recorded("dr-limit") if name == "DBOS.getResult"] == [6, 7, 8, 9, 10]


def test_a_failed_read_is_recorded_at_once_after_those_before_it(launched: str) -> None:
    g = Gatherer("dr_fail", 2, failing=True)
    with SetWorkflowID("dr-fail"):
        handle = DBOS.start_workflow(g.parent)
    assert g.waiting.wait(20)
    assert _recorded("dr-fail") == [
        (1, "dr_fail_child"),
        (2, "dr_fail_child"),
        (3, "dr_fail_child"),
        (4, "DBOS.getResult"),
        (5, "DBOS.getResult"),
        (6, "DBOS.getResult"),
    ]
    failed = DBOS.list_workflow_steps("dr-fail")[5]
    assert isinstance(failed.error, ValueError) and failed.child_workflow_id == "dr-fail-3"
    g.release.set()
    assert handle.get_result() == 1001


def test_many_reads_are_written_together_with_their_outputs(launched: str) -> None:
    """More reads than one batch sends one by one (merged.MERGE_FROM): one statement over
    arrays on PostgreSQL."""
    queue = Queue("dr_many_queue")

    @DBOS.workflow(name="dr_many_child")
    def child(x: int) -> dict[str, int]:
        return {"x": x}

    @DBOS.workflow(name="dr_many_parent")
    def parent(n: int) -> int:
        handles = [queue.enqueue(child, x) for x in range(n)]
        return sum(h.get_result()["x"] for h in handles)

    with SetWorkflowID("dr-many"):
        assert parent(40) == sum(range(40))
    reads = DBOS.list_workflow_steps("dr-many")[40:]
    assert [(s.function_id, s.function_name, s.child_workflow_id) for s in reads] == [
        (41 + x, "DBOS.getResult", f"dr-many-{x + 1}") for x in range(40)
    ]
    assert [s.output for s in reads] == [{"x": x} for x in range(40)]


def test_an_execution_told_to_stop_does_not_write_its_reads(launched: str) -> None:
    """Cancelled while its reads wait: its next operation stops it before any write (the
    execution that goes on, after a resume, reads again)."""
    waiting, release = threading.Event(), threading.Event()

    @DBOS.workflow(name="dr_stop_child")
    def child(x: int) -> int:
        return x

    @DBOS.step(name="dr_stop_step")
    def after() -> None:
        return None

    @DBOS.workflow(name="dr_stop")
    def stopping() -> int:
        handles = [DBOS.start_workflow(child, x) for x in range(2)]
        total = sum(h.get_result() for h in handles)
        waiting.set()
        release.wait(20)
        after()
        return total

    with SetWorkflowID("dr-stop"):
        handle = DBOS.start_workflow(stopping)
    assert waiting.wait(20)
    DBOS.cancel_workflow("dr-stop")
    release.set()
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        handle.get_result()
    assert _recorded("dr-stop") == [(1, "dr_stop_child"), (2, "dr_stop_child")]


def test_reads_that_could_not_be_written_wait_on_and_leave_no_gap(
    launched: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workflow code that catches the failed write and goes on: the next write tries the
    reads' records again, before its own."""
    failures = [RuntimeError("database is locked")]
    real = StepRecords.record_steps

    def failing_once(self: StepRecords, *args: object) -> None:
        if failures:
            raise failures.pop()
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(StepRecords, "record_steps", failing_once)

    @DBOS.workflow(name="dr_gap_target")
    def target() -> int:
        return 7

    @DBOS.step(name="dr_gap_step")
    def step(x: int) -> int:
        return x

    @DBOS.workflow(name="dr_gap")
    def gap() -> int:
        value = DBOS.retrieve_workflow("dr-gap-target").get_result()  # two reads: 0 and 1
        with contextlib.suppress(RuntimeError):
            step(value)  # writing the reads fails: the step does not run
        return step(value + 1)

    with SetWorkflowID("dr-gap-target"):
        target()
    with SetWorkflowID("dr-gap"):
        assert gap() == 8
    assert failures == []
    assert _recorded("dr-gap") == [(1, "DBOS.getStatus"), (2, "DBOS.getResult"), (3, "dr_gap_step")]


def test_a_read_recorded_first_by_another_execution_sends_the_workflow_back(
    launched: str,
) -> None:
    """A stale execution (taken over, or cancelled and resumed meanwhile) recorded the
    operation of a read that waits here, with another answer. Nothing this execution did
    since has reached the world: it stops, and the workflow runs again from its records, so
    that what it does agrees with what they say."""
    waiting, release = threading.Event(), threading.Event()
    used: list[str] = []

    @DBOS.workflow(name="dr_other_target")
    def target() -> int:
        return 1

    @DBOS.step(name="dr_other_mark")
    def mark(status: str) -> str:
        return status

    @DBOS.workflow(name="dr_other")
    def reader() -> str:
        status = DBOS.get_workflow_status("dr-other-target").status  # operation 1, waits
        used.append(status)
        waiting.set()
        release.wait(20)
        return mark(status)  # operation 2: writes operation 1 first

    with SetWorkflowID("dr-other-target"):
        target()
    with SetWorkflowID("dr-other"):
        handle = DBOS.start_workflow(reader)
    assert waiting.wait(20)
    # What a stale execution does when its record of operation 1 is refused: it keeps it
    # for the execution that goes on (see `StepRecords.record_step`).
    rt = get_runtime()
    stale = DBOS.get_workflow_status("dr-other-target")
    assert stale is not None
    stale.status = "PENDING"
    with pytest.raises(WorkflowPreempted):
        rt.store.record_step(
            "dr-other",
            "a-stale-owner",
            1,
            "DBOS.getStatus",
            serialization.dumps(stale),
            None,
            rt.now_ms(),
            rt.now_ms(),
        )
    release.set()
    assert handle.get_result() == "PENDING"
    assert used == ["SUCCESS", "PENDING"]  # the second run replayed the record
    recorded = DBOS.list_workflow_steps("dr-other")
    assert [(s.function_name, s.output) for s in recorded[1:]] == [("dr_other_mark", "PENDING")]


def test_writing_reads_again_finds_them_and_refuses_other_answers(launched: str) -> None:
    """What `reconnect` does after a lost reply (the same records again), and what a
    write that finds another execution's records does."""
    store = get_runtime().store
    insert_pending(store, "dr-again", "own")
    records = [StepRecord(n, "DBOS.getResult", b"x", None, 1, 2, f"c{n}") for n in range(40)]
    store.record_steps("dr-again", "own", records)
    store.record_steps("dr-again", "own", records)  # every one found, as written
    assert len(store.list_steps("dr-again")) == 40
    with pytest.raises(WorkflowPreempted) as other_answer:
        store.record_steps("dr-again", "own", [records[0]._replace(output=b"y")])
    assert other_answer.value.reason == READ_RECORDED_ELSEWHERE
    with pytest.raises(WorkflowPreempted) as taken:
        store.record_steps(
            "dr-again", "other", [StepRecord(40, "DBOS.getStatus", b"y", None, 1, 2)]
        )
    assert taken.value.reason == "taken over by another execution"
    assert len(store.list_steps("dr-again")) == 40  # nothing kept for the execution that goes on


# -- the crash test: SIGKILL with reads waiting, recovery in a new process ----------------------


def _crash_app(mode: str, url: str, workdir: str) -> None:
    """Phase "crash": a workflow runs three children, waits for their results, then stops in
    its own code (after writing WORKDIR/ready) to be killed with the reads' records waiting.
    Phase "recover": the next launch recovers it; prints its result and recorded operations."""

    @DBOS.step(name="dr_crash_work")
    def work(x: int) -> int:
        append_effect(workdir, f"work{x}")  # a paid call: how often it runs is what matters
        return x * 10

    @DBOS.workflow(name="dr_crash_child")
    def child(x: int) -> int:
        return work(x)

    @DBOS.workflow(name="dr_crash_parent")
    def parent() -> int:
        handles = [DBOS.start_workflow(child, x) for x in (1, 2, 3)]
        total = sum(h.get_result() for h in handles)
        if mode == "crash":
            Path(workdir, "ready").write_text(str(os.getpid()))
            time.sleep(600)
        return total

    DBOS(
        config={
            "name": "deferred_app",
            "system_database_url": url,
            "executor_id": "deferred-exec",
            "polling_interval_sec": 0.05,
        }
    )
    DBOS.launch()
    if mode == "crash":
        with SetWorkflowID("dr-crash"):
            parent()
    else:
        result = DBOS.retrieve_workflow("dr-crash").get_result(timeout_sec=60)
        print(json.dumps({"result": result, "steps": _recorded("dr-crash")}))
    DBOS.destroy()


def test_a_crash_with_reads_waiting_reads_again_and_runs_no_child_twice(
    db_url: str, tmp_path: Path
) -> None:
    script = [sys.executable, __file__]
    kill_when_ready([*script, "crash", db_url, str(tmp_path)], tmp_path)
    assert sorted((tmp_path / "effects.log").read_text().split()) == ["work1", "work2", "work3"]
    (tmp_path / "ready").unlink()

    out = subprocess.run(
        [*script, "recover", db_url, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["result"] == 60
    assert sorted((tmp_path / "effects.log").read_text().split()) == ["work1", "work2", "work3"]
    # The starts were recorded before the crash; the reads, made again, by the recovery.
    assert report["steps"] == [[n, "dr_crash_child"] for n in range(1, 4)] + [
        [n, "DBOS.getResult"] for n in range(4, 7)
    ]


if __name__ == "__main__":
    _crash_app(*sys.argv[1:4])
