"""Crash tests with real processes killed by SIGKILL, on SQLite and PostgreSQL.

A child process runs a workflow and is killed right after a checkpoint; a new process launches,
recovers the workflow and finishes it. Side effects are recorded outside the database, so the test
sees how often each step really ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from conftest import kill_when_ready

HERE = Path(__file__).parent
APP = HERE / "crash_app.py"


def _run_until_ready_then_kill(workflow: str, url: str, workdir: Path) -> None:
    kill_when_ready([sys.executable, str(APP), "crash", workflow, url, str(workdir)], workdir)


def _recover(workflow: str, url: str, workdir: Path) -> object:
    out = subprocess.run(
        [sys.executable, str(APP), "recover", workflow, url, str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _effects(workdir: Path) -> list[str]:
    return (workdir / "effects.log").read_text().split()


def test_killed_workflow_resumes_after_its_last_checkpoint(db_url: str, tmp_path: Path) -> None:
    _run_until_ready_then_kill("five_steps", db_url, tmp_path)
    assert _effects(tmp_path) == ["step1", "step2", "step3"]
    (tmp_path / "ready").unlink()
    result = _recover("five_steps", db_url, tmp_path)
    assert result == [10, 20, 30, 40, 50]
    # Steps 1-3 ran exactly once; 4 and 5 ran once, in the recovering process.
    assert _effects(tmp_path) == ["step1", "step2", "step3", "step4", "step5"]


def test_killed_after_commit_transaction_is_not_committed_twice(
    db_url: str, tmp_path: Path
) -> None:
    _run_until_ready_then_kill("transaction", db_url, tmp_path)
    assert _effects(tmp_path) == ["txn"]
    (tmp_path / "ready").unlink()
    result = _recover("transaction", db_url, tmp_path)
    assert result == [1, "after"]
    assert _effects(tmp_path) == ["txn", "after"]
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM ledger")).scalar_one() == 1
    engine.dispose()
