"""SQLite's write-ahead log is checkpointed by a thread of the process, not by the commit that
happens to cross SQLite's limit (`storage/checkpointer.py`)."""

from __future__ import annotations

import gc
from pathlib import Path

from sqlalchemy import insert

from conftest import wait_until
from dbos_nb.storage.checkpointer import FALLBACK_PAGES
from dbos_nb.storage.database import Database
from dbos_nb.storage.migrations import migrate
from dbos_nb.storage.schema import workflow_status as ws


def _rows(prefix: str, n: int) -> list[dict[str, object]]:
    return [
        {
            "workflow_uuid": f"{prefix}{i}",
            "status": "ENQUEUED",
            "name": "wf",
            "inputs": b"x" * 200,
            "created_at": 1,
            "updated_at": 1,
            "queue_name": "q",
        }
        for i in range(n)
    ]


def test_the_log_is_checkpointed_in_the_background_until_the_database_is_disposed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ckpt.sqlite"
    db = Database(f"sqlite:///{path}")
    migrate(db)
    checkpointer = db.checkpointer
    assert checkpointer is not None and checkpointer.alive  # started by the first write
    with db.read() as conn:  # commits checkpoint themselves only far past SQLite's 1,000 pages
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == FALLBACK_PAGES
    before = checkpointer.checkpoints
    with db.write() as conn:
        conn.execute(insert(ws), _rows("a", 3000))
    wait_until(lambda: checkpointer.checkpoints > before)  # it copied the commit's pages
    with db.read() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM workflow_status").scalar() == 3000
    thread = checkpointer._thread
    assert thread is not None and thread.is_alive()
    db.dispose()
    assert not thread.is_alive() and not checkpointer.alive
    checkpointer.ensure_running()  # a disposed database's thread stays stopped
    assert not checkpointer.alive


def test_a_database_dropped_without_dispose_ends_its_thread(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'dropped.sqlite'}")
    migrate(db)
    checkpointer = db.checkpointer
    assert checkpointer is not None
    thread = checkpointer._thread
    assert thread is not None and thread.is_alive()
    del db
    gc.collect()
    thread.join(20)
    assert not thread.is_alive()
