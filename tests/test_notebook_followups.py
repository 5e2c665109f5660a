"""Follow-ups from a new user's session: a cancelled durable cell resumes with its own code, the
status frames show names and types as people expect, and `batch.wait()` does not warn about a
worker that is still starting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import dbos_nb
from conftest import HELD_STEP, launched_shell, wait_until
from conftest import run_cell as run
from dbos_nb import DBOS, DBOSAwaitedWorkflowCancelledError
from dbos_nb.core.runtime import get_runtime
from dbos_nb.notebook.frames import queues_frame

TESTS = Path(__file__).parent


@pytest.fixture
def shell(db_url: str) -> Iterator[InteractiveShell]:
    yield from launched_shell(db_url, "nbfollow")


ORIGINAL = "total = held(1) + held(2)\ntotal * 10\n"


def _cancelled_cell(shell: InteractiveShell, line: str) -> str:
    """Run ORIGINAL as `%%dbos_workflow LINE --background`, cancel it after its first step, and
    wait until nothing runs it any more; returns its workflow id."""
    gate = threading.Event()
    shell.user_ns.update(gate=gate, RUNS=[])
    run(shell, HELD_STEP)
    handle = run(shell, f"%%dbos_workflow {line} --background\n{ORIGINAL}")
    wid: str = handle.workflow_id
    wait_until(lambda: shell.user_ns["RUNS"] == [1])
    run(shell, f"%dbos_cancel {wid}")
    gate.set()
    rt = get_runtime()
    wait_until(lambda: not rt.is_running(wid))
    return wid


def test_an_edited_cell_does_not_replace_a_cancelled_runs_code(
    shell: InteractiveShell, capsys: Any
) -> None:
    wid = _cancelled_cell(shell, "bg2")
    capsys.readouterr()
    with pytest.raises(DBOSAwaitedWorkflowCancelledError, match="'bg2' was cancelled"):
        run(shell, '%%dbos_workflow bg2\n"EDITED"\n')
    out = capsys.readouterr().out
    assert "ended CANCELLED" in out and "the cell changed" in out
    handle = run(shell, f"%dbos_resume {wid}")
    # The run goes on with the code it started with, from its last completed step.
    assert handle.get_result(timeout_sec=20) == 30
    assert shell.user_ns["RUNS"] == [1, 2]


def test_resume_is_refused_when_the_cells_code_changed(
    shell: InteractiveShell, capsys: Any
) -> None:
    wid = _cancelled_cell(shell, "report --id run1")
    # The edited cell run under another id registers its code under the cell's name.
    assert run(shell, '%%dbos_workflow report --id run2\n"EDITED"\n') == "EDITED"
    with pytest.raises(UsageError, match=r"cell 'report' changed since its run 'run1'.*--rerun"):
        run(shell, f"%dbos_resume {wid}")
    assert DBOS.get_workflow_status(wid).status == "CANCELLED"  # type: ignore[union-attr]
    # Run the old code again (it says, and raises, that its run was cancelled, and registers
    # the old code): the run resumes with it.
    capsys.readouterr()
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        run(shell, f"%%dbos_workflow report --id run1\n{ORIGINAL}")
    assert f"or %dbos_resume {wid} to go on" in capsys.readouterr().out
    handle = run(shell, f"%dbos_resume {wid}")
    assert handle.get_result(timeout_sec=20) == 30


def test_a_cells_run_never_finishes_with_other_code(shell: InteractiveShell) -> None:
    """Resumed by another way than %dbos_resume (here DBOS.resume_workflow) while an edited
    version of the cell is registered, the run waits in its queue for its own code (it neither
    runs the edited code nor fails), and goes on once that code is run again."""
    wid = _cancelled_cell(shell, "report --id run1")
    run(shell, '%%dbos_workflow report --id run2\n"EDITED"\n')
    handle = DBOS.resume_workflow(wid)
    rt = get_runtime()
    # Claimed once at most, found to be another version and left queued, excluded from claims.
    wait_until(
        lambda: (
            rt.resolver.excluded_versions() != set() and handle.get_status().status == "ENQUEUED"
        )
    )
    assert shell.user_ns["RUNS"] == [1]
    run(shell, HELD_STEP)  # the old code again (its step, then the cell itself)
    run(shell, f"%%dbos_workflow report --id run1 --background\n{ORIGINAL}")
    assert handle.get_result(timeout_sec=30)["result"] == 30  # the cell body's own record
    assert shell.user_ns["RUNS"] == [1, 2]


# -- frames --------------------------------------------------------------------------------------

STEPS = """
from dbos_nb import DBOS
@DBOS.step()
def process_task(i):
    if i < 0:
        raise ValueError('negative')
    return i * 2
"""


def test_status_frames_show_names_errors_and_integer_limits(shell: InteractiveShell) -> None:
    run(shell, STEPS)
    run(shell, "%dbos_queue work --concurrency 8")
    batch = run(shell, "work.map(process_task, [1, -1], batch='tasks')")
    batch.wait(timeout=20, show=False)
    frame = dbos_nb.workflows_frame(queue_name="work")
    assert frame["name"].tolist() == ["process_task", "process_task"]  # not the internal name
    assert frame["output"].tolist() == [2, None]
    status = run(shell, "%dbos_status work")
    assert set(status["name"]) == {"process_task"}
    # %dbos_status does not load outputs: no column of Nones, but the error is shown.
    assert "output" not in status.columns
    errors = dict(zip(status["workflow_id"], status["error"], strict=True))
    assert errors == {"tasks/0": None, "tasks/1": "ValueError: negative"}
    queues = queues_frame().set_index("queue")
    assert str(queues["concurrency"].dtype) == "Int64"
    assert queues.loc["work", "concurrency"] == 8
    assert queues["worker_concurrency"].isna().all()
    assert str(queues_frame("work")["worker_concurrency"].dtype) == "Int64"


# -- batch.wait() and a worker that is still starting --------------------------------------------


def test_wait_does_not_warn_about_a_worker_that_is_starting(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that runs no queued work waits on a batch that a `dbos-nb worker`, started just
    before, runs once it is up: no warning that nothing runs it."""
    import worker_tasks

    from dbos_nb.notebook import batch as batch_module

    # However slowly the worker starts on a loaded machine (the check at once is what failed).
    monkeypatch.setattr(batch_module, "IDLE_WARNING_AFTER_S", 60.0)

    DBOS(config={"name": "nbstarting", "system_database_url": db_url, "listen_queues": []})
    DBOS.launch()
    batch = dbos_nb.Queue("starting_q").map(worker_tasks.wt_work, [1, 2], batch="starting")
    env = dict(os.environ, WORKER_TASKS_LOG=os.devnull)
    cmd = [sys.executable, "-m", "dbos_nb.cli", "worker", "--db", db_url, "--queue"]
    cmd += ["starting_q", "--import", "worker_tasks", "--heartbeat", "0.3", "--poll", "0.05"]
    worker = subprocess.Popen(cmd, cwd=TESTS, env=env)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            batch.wait(timeout=120, show=False)
        assert batch.results() == [1, 2]
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        DBOS.destroy()


def test_frames_keep_integer_types_with_no_queue_declared(launched: str) -> None:
    frame = queues_frame("nothing-declared")
    assert frame.empty and str(frame["concurrency"].dtype) == "Int64"


def test_a_queue_magic_with_only_a_name_keeps_the_stored_settings(shell: InteractiveShell) -> None:
    run(shell, "%dbos_queue nb_kept --concurrency 4 --limit 10/2s")
    queue = run(shell, "%dbos_queue nb_kept --as again")  # e.g. another notebook's cell
    assert (queue.concurrency, queue.limiter) == (4, {"limit": 10, "period": 2.0})
    stored = get_runtime().store.get_queue("nb_kept")
    assert stored is not None and (stored.concurrency, stored.limit) == (4, 10)
    assert run(shell, "%dbos_queue nb_kept --worker-concurrency 1").concurrency is None


def test_retry_failed_runs_the_fixed_code(shell: InteractiveShell) -> None:
    run(shell, "from dbos_nb import DBOS\n@DBOS.step()\ndef parse(s):\n    return int(s)\n")
    run(shell, "%dbos_queue fixq")
    batch = run(shell, "b = fixq.map(parse, ['1', 'x3'], batch='fix')\nb")
    batch.wait(timeout=20, show=False)
    assert batch.counts()["failed"] == 1
    # The fix is in the code: the failed item runs the edited function.
    run(shell, "@DBOS.step()\ndef parse(s):\n    return int(s.lstrip('x'))\n")
    assert batch.retry_failed() == 1
    batch.wait(timeout=20, show=False)
    assert batch.results() == [1, 3]
    # A cause outside the code: the version each item was enqueued with.
    again = run(shell, "fixq.map(parse, ['y4'], batch='keep')")
    again.wait(timeout=20, show=False)
    run(shell, "@DBOS.step()\ndef parse(s):\n    return int(s.lstrip('xy'))\n")
    assert again.retry_failed(current_code=False) == 1
    again.wait(timeout=20, show=False)
    assert again.counts()["failed"] == 1
    assert again.retry_failed() == 1
    again.wait(timeout=20, show=False)
    assert again.results() == [4]


def test_launch_says_when_it_creates_the_database(tmp_path: Path, capsys: Any) -> None:
    from conftest import new_shell

    sh = new_shell()
    url = f"sqlite:///{tmp_path / 'typo' / 'nb.sqlite'}"
    try:
        run(sh, f"%dbos_launch --db {url} --name created")
        assert "nb.sqlite (new: created now), executor" in capsys.readouterr().out
        DBOS.destroy()
        run(sh, f"%dbos_launch --db {url} --name created")
        out = capsys.readouterr().out
        assert "dbos_nb launched: database" in out and "new:" not in out
    finally:
        DBOS.destroy()


def test_wait_counts_only_reports_of_the_versions_its_items_need(db_url: str) -> None:
    """A live worker that reported it cannot load an older version of the function may run
    the version the batch's items wait for: no warning; a report of that version is quoted."""
    from conftest import config
    from dbos_nb import Queue
    from dbos_nb.models import shown_function_name

    DBOS(config=config(db_url, listen_queues=[]))  # this process serves no queue
    try:
        queue = Queue("versions_q")
        DBOS.launch()

        @DBOS.step()
        def versioned(x: int) -> int:
            return x

        batch = queue.map(versioned, [1, 2], batch="versions")
        rt = get_runtime()
        [version] = rt.store.waiting_versions(batch_id="versions")
        function = shown_function_name(batch.function_name)
        now = rt.now_ms()
        rt.store.register_executor("w-1", "h", 1, "t-1", now, lease_ms=600_000)
        rt.store.record_load_failure("w-1", "t-1", function, "an-older-one", "ImportError: x", now)
        assert batch._why_nothing_runs() is None
        rt.store.record_load_failure("w-1", "t-1", function, version, "ImportError: gone", now)
        said = batch._why_nothing_runs()
        assert said is not None and "(w-1 on h (pid 1): ImportError: gone)" in said
        assert "ImportError: x" not in said
        rt.store.register_executor("w-2", "h", 2, "t-2", now, lease_ms=600_000)
        assert batch._why_nothing_runs() is None  # w-2 reported nothing: it may run them
    finally:
        DBOS.destroy()


def test_wait_names_workers_that_cannot_load_the_function(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of a function from a module the workers cannot import waits; `wait()` says why,
    from what the workers reported to the database (only their logs told)."""
    from dbos_nb.notebook import batch as batch_module

    monkeypatch.setattr(batch_module, "IDLE_WARNING_AFTER_S", 0.3)
    shells = launched_shell(db_url, "noload", "--no-worker")
    sh = next(shells)
    folder = tmp_path / "gone"
    folder.mkdir()
    (folder / "gone_helpers.py").write_text(
        "from dbos_nb import DBOS\n@DBOS.step()\ndef vanish(x):\n    return x\n"
    )
    try:
        run(sh, f"import sys\nsys.path.insert(0, {str(folder)!r})\nimport gone_helpers")
        run(sh, "%dbos_queue goneq")
        batch = run(sh, "goneq.map(gone_helpers.vanish, [1, 2], batch='gone')")
        for file in folder.iterdir():  # the module is gone before the workers start
            file.unlink()
        folder.rmdir()
        run(sh, "%dbos_workers 1")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the warning ends the wait
            with pytest.raises(
                RuntimeWarning,
                match=r"cannot load 'vanish' \(nb:noload\S*/worker-\w+ on .*\(pid \d+\): "
                r"ModuleNotFoundError: No module named 'gone_helpers'\)",
            ):
                batch.wait(timeout=60, show=False)
    finally:
        run(sh, "%dbos_workers stop")
        next(shells, None)
