"""`dbos-nb demo`, the README's main job: it finishes, and resumes without paying twice."""

from __future__ import annotations

import io
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _demo(db: str, items: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dbos_nb.cli", "demo", "--db", db, "--items", str(items)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _calls(output: str) -> int:
    match = re.search(r"the server answered (\d+) calls|in this run: (\d+) answered", output)
    assert match, output
    return int(match.group(1) or match.group(2))


def test_demo_runs_and_a_second_run_calls_nothing(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'demo.sqlite'}"
    out, _ = _demo(db, 120).communicate(timeout=120)
    assert "done: 120 answered, 0 failed" in out and _calls(out) == 120
    assert "0 refused with 429" in out
    again, _ = _demo(db, 120).communicate(timeout=120)
    assert "done: 120 answered" in again and _calls(again) == 0


def test_interrupted_demo_resumes_without_calling_twice(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'demo.sqlite'}"
    proc = _demo(db, 600)
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    first, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, first
    assert "interrupted" in first
    second, _ = _demo(db, 600).communicate(timeout=120)
    assert "done: 600 answered, 0 failed" in second
    first_calls, second_calls = _calls(first), _calls(second)
    assert 0 < first_calls < 600
    assert first_calls + second_calls == 600  # no prompt was sent twice


def test_status_reads_an_existing_database_and_says_what_is_wrong_otherwise(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dbos_nb import DBOS, Queue
    from dbos_nb.cli import main

    DBOS(config={"name": "clistatus", "system_database_url": db_url})
    Queue("cli_q", concurrency=3)
    DBOS.launch()
    DBOS.destroy()
    assert main(["status", "--db", db_url]) == 0
    assert re.search(r"cli_q\s+concurrency=3", capsys.readouterr().out)
    # A typo in a SQLite path: no new empty database, a one-line error.
    typo = tmp_path / "typo.sqlite"
    assert main(["status", "--db", f"sqlite:///{typo}"]) == 2
    assert f"no database at {typo}" in capsys.readouterr().err and not typo.exists()
    # An unreachable server: one line, the password hidden.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["status", "--db", f"postgresql://u:secret-pw@127.0.0.1:{port}/x"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("dbos-nb: cannot use postgresql://u:***@127.0.0.1")
        and "OperationalError" in err
    )
    assert "secret-pw" not in err and len(err.strip().splitlines()) == 1


def test_a_demo_that_fails_leaves_no_executor_behind(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only Ctrl-C: any exception (here a bug in the progress display) destroys DBOS, so
    that the run's executor row does not stay behind as a live executor."""
    from dbos_nb.llm import demo
    from dbos_nb.storage.database import Database
    from dbos_nb.storage.store import SystemStore

    def broken_watch(batch: object, out: object) -> None:
        raise RuntimeError("the display broke")

    monkeypatch.setattr(demo, "_watch", broken_watch)
    # The demo takes over SIGINT and SIGTERM in the main thread; the test process keeps its own.
    monkeypatch.setattr(demo.signal, "signal", lambda *args: None)
    with pytest.raises(RuntimeError, match="the display broke"):
        demo.run_demo(db_url, 5, out=io.StringIO())
    db = Database(db_url)
    try:
        assert SystemStore(db).list_executors() == []
    finally:
        db.dispose()
