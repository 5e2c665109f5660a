"""The `dbos-nb` command's `status`, `workflows` and `worker`: options refused with a clear
message, a closed stdout, token limits and 429 pauses, step names as users know them; on both
backends."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import cli_command, config, start_cli_worker
from dbos_nb import DBOS, Queue
from dbos_nb.cli import EXIT_BROKEN_PIPE, LOAD_FAILURES_SHOWN, main
from dbos_nb.clock import SystemClock
from dbos_nb.models import STEP_WORKFLOW_PREFIX
from dbos_nb.serialization import dump_inputs
from dbos_nb.storage.database import Database
from dbos_nb.storage.migrations import migrate
from dbos_nb.storage.store import NewWorkflow, SystemStore

# Longer than the 30 characters the name column used to keep.
STEP_NAME = "cli_summarize_a_step_with_a_long_name"

# A worker that got past the parser would fail on it at once instead of running until stopped.
NO_MODULE = ("--import", "no_such_module_here")


@DBOS.step(name=STEP_NAME)
def cli_step(x: int) -> int:
    return x + 1


@DBOS.workflow()
def cli_workflow(x: int) -> int:
    return cli_step(x)


def _rows(out: str) -> list[list[str]]:
    """The rows of a `workflows` table, split into columns (the header left out)."""
    return [line.split() for line in out.strip().splitlines()[1:]]


def _declare(url: str) -> None:
    """Create the database, as an application's launch would."""
    DBOS(config=config(url))
    DBOS.launch()
    DBOS.destroy()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["workflows", "--limit", "-1"], "argument --limit: must be a positive integer up to"),
        (["workflows", "--limit", "0"], "argument --limit: must be a positive integer up to"),
        # Beyond what a bound parameter holds: a traceback (SQLite), a DataError (PostgreSQL).
        (["workflows", "--limit", "99999999999999999999"], "up to 2147483647, got 9999"),
        (["workflows", "--limit", "ten"], "argument --limit: must be a positive integer"),
        (
            ["worker", *NO_MODULE, "--poll", "nan"],
            "argument --poll: must be a positive number, got nan",
        ),
        (
            ["worker", *NO_MODULE, "--lease", "inf"],
            "argument --lease: must be a positive number, got inf",
        ),
        (
            ["worker", *NO_MODULE, "--concurrency", "x"],
            "argument --concurrency: must be a positive integer",
        ),
    ],
)
def test_numeric_options_are_refused_by_the_parser(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before the database is opened: a negative LIMIT used to reach PostgreSQL (a
    DataError) or list everything on SQLite."""
    with pytest.raises(SystemExit) as exit_info:
        main([argv[0], "--db", f"sqlite:///{tmp_path / 'none.sqlite'}", *argv[1:]])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["workflows", "status"])
def test_a_closed_stdout_ends_the_command_quietly(db_url: str, command: str) -> None:
    """`dbos-nb workflows | head -1`: the reader is gone before anything is written (the read
    end is closed before the command starts, so this does not depend on timing)."""
    _declare(db_url)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            cli_command(command, "--db", db_url),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == EXIT_BROKEN_PIPE


def test_status_shows_load_failure_reports_of_waiting_work_first(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker tries every stored version (a notebook's old ones too): the reports of
    versions with work waiting come first, then the newest; how many were left out is said."""
    db = Database(db_url)
    try:
        migrate(db)
        store = SystemStore(db)
        now = SystemClock().now_ms()
        store.register_executor("w-nomod", "h", 1, "t", now)
        for i in range(LOAD_FAILURES_SHOWN + 2):
            reason = f"ModuleNotFoundError: No module named 'm{i}'"
            store.record_load_failure("w-nomod", "t", "score", f"v{i:02d}", reason, now + i)
        store.insert_workflow(  # work of the oldest version waits in a queue
            NewWorkflow(
                workflow_id="waits",
                name="score",
                inputs=dump_inputs("score", (), {}),
                status="ENQUEUED",
                created_at=now,
                queue_name="cli_scores",
                function_hash="v00",
            )
        )
    finally:
        db.dispose()
    assert main(["status", "--db", db_url]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("cannot load (") :].splitlines()[1:]
    assert lines[0] == "  score version v00 on w-nomod: ModuleNotFoundError: No module named 'm0'"
    newest = LOAD_FAILURES_SHOWN + 1
    assert lines[1] == (
        f"  score version v{newest} on w-nomod: ModuleNotFoundError: No module named "
        f"'m{newest}' (no work of it waiting)"
    )
    assert len(lines) == LOAD_FAILURES_SHOWN + 1 and lines[-1] == "  ... and 2 more"
    assert "version v01 " not in out and "version v02 " not in out and "version v03 " in out


def test_status_shows_token_limits_and_an_active_pause(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    DBOS(config=config(db_url))
    Queue("cli_tokens", token_limiter={"limit": 5000, "period": 60})
    Queue("cli_both", concurrency=2, limiter={"limit": 10, "period": 1})
    DBOS.launch()
    DBOS.destroy()
    db = Database(db_url)
    try:
        migrate(db)
        store = SystemStore(db)
        # A 429 back-off an hour from now, and one that is over: only the first is shown.
        store.pause_queue("cli_tokens", SystemClock().now_ms() + 3_600_000)
        store.pause_queue("cli_both", 1)
    finally:
        db.dispose()
    assert main(["status", "--db", db_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    tokens = next(i for i, line in enumerate(lines) if line.startswith("cli_tokens "))
    assert re.match(r"cli_tokens\s+tokens=5000/60s\s+0", lines[tokens])
    assert lines[tokens + 1].strip().startswith("paused until ")
    assert "429" in lines[tokens + 1]
    assert any(re.match(r"cli_both\s+concurrency=2, 10/1s\s+0", line) for line in lines)
    assert sum("paused until" in line for line in lines) == 1


def test_steps_are_shown_and_found_by_their_own_names(
    launched: str, capsys: pytest.CaptureFixture[str]
) -> None:
    q = Queue("cli_names")
    assert q.enqueue(cli_step, 1).get_result() == 2
    assert q.enqueue(cli_workflow, 2).get_result() == 3
    assert main(["workflows", "--db", launched]) == 0
    out = capsys.readouterr().out
    assert STEP_WORKFLOW_PREFIX not in out
    names = [row[-1] for row in _rows(out)]
    assert STEP_NAME in names and len(names) == 2  # whole, not cut at 30 characters
    workflow_name = next(name for name in names if name != STEP_NAME)
    # Each found by the name shown; the step also by its stored name.
    for name, shown in [
        (STEP_NAME, STEP_NAME),
        (STEP_WORKFLOW_PREFIX + STEP_NAME, STEP_NAME),
        (workflow_name, workflow_name),
    ]:
        assert main(["workflows", "--db", launched, "--name", name]) == 0
        assert [row[-1] for row in _rows(capsys.readouterr().out)] == [shown]


def test_status_filter_takes_any_case_and_refuses_unknown_ones(
    launched: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Queue("cli_status_q").enqueue(cli_step, 5).get_result()
    for spelling in ("success", "Success", "SUCCESS"):
        assert main(["workflows", "--db", launched, "--status", spelling]) == 0
        assert [row[1] for row in _rows(capsys.readouterr().out)] == ["SUCCESS"]
    with pytest.raises(SystemExit) as exit_info:
        main(["workflows", "--db", launched, "--status", "sucess"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown status 'sucess'" in err
    assert "ENQUEUED, PENDING, SUCCESS, ERROR, CANCELLED, MAX_RECOVERY_ATTEMPTS_EXCEEDED" in err


@DBOS.step(name="cli_failing_step")
def cli_failing_step(x: int) -> int:
    raise ValueError(f"bad input {x}\nsecond line")


def test_workflows_show_a_failed_ones_error_under_it(
    launched: str, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = Queue("cli_errors_q")
    failed = queue.enqueue(cli_failing_step, 7)
    with pytest.raises(ValueError):
        failed.get_result()
    queue.enqueue(cli_step, 1).get_result()
    assert main(["workflows", "--db", launched, "--queue", "cli_errors_q"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    # Newest first: the success, then the failure with its error's first line beneath it.
    assert [line.split()[1] for line in lines if not line.startswith(" ")] == ["SUCCESS", "ERROR"]
    assert lines[-1] == "    ValueError: bad input 7"


def test_a_worker_warns_about_a_queue_nobody_declared_and_keeps_running(db_url: str) -> None:
    DBOS(config=config(db_url))
    Queue("cli_declared")
    DBOS.launch()
    DBOS.destroy()
    # Read up to its first progress line, logged after the warnings: it is running.
    proc, log = start_cli_worker("--db", db_url, "--queue", "nosuch", "--queue", "cli_declared")
    try:
        assert proc.poll() is None, "".join(log)
        warnings = [line for line in log if " WARNING " in line]
        assert len(warnings) == 1, "".join(log)
        assert "'nosuch'" in warnings[0] and "declared" in warnings[0]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_empty_queue_name_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'none.sqlite'}"
    assert main(["worker", "--db", url, *NO_MODULE, "--queue", " "]) == 2
    assert "--queue needs a queue name" in capsys.readouterr().err
    assert not (tmp_path / "none.sqlite").exists()
