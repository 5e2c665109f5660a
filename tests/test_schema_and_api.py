"""Schema set-up between processes, executor ids, methods as workflows, DBOS's names, and values
too long for their columns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa

import dbos_nb
from conftest import config, create_pg_database, drop_pg_database, libpq_dsn
from dbos_nb import (
    DBOS,
    DBOSClient,
    DBOSConfigError,
    DBOSExecutorIdInUseError,
    DbosNbError,
    EnqueueOptions,
    Queue,
    SetEnqueueOptions,
    SetWorkflowID,
    SetWorkflowTimeout,
    WorkflowStatus,
    WorkflowStatusString,
)
from dbos_nb.core.runtime import get_runtime
from dbos_nb.storage.database import Database
from dbos_nb.storage.schema import SCHEMA_VERSION, schema_migrations

MIGRATE = (
    "import sys, time\n"
    "from dbos_nb.storage.database import Database\n"
    "from dbos_nb.storage.migrations import migrate\n"
    "start = float(sys.argv[2])\n"
    "while time.time() < start: time.sleep(0.001)\n"
    "migrate(Database(sys.argv[1]))\n"
)


def test_processes_creating_the_schema_at_once(db_url: str) -> None:
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, db_url, str(start)], stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    db = Database(db_url)
    with db.read() as conn:
        versions = conn.execute(sa.select(schema_migrations.c.version)).scalars().all()
    db.dispose()
    assert versions == [SCHEMA_VERSION]
    DBOS(config=config(db_url))
    DBOS.launch()  # and the schema is usable


def _versions_and_index_names(db: Database) -> tuple[list[int], set[str]]:
    """The schema versions stamped in the database, and the names of workflow_status's indexes."""
    with db.read() as conn:
        versions = list(conn.execute(sa.select(schema_migrations.c.version)).scalars())
        names = {
            str(i["name"])
            for i in sa.inspect(conn).get_indexes(
                "workflow_status", schema=("dbos_nb" if db.is_postgres else None)
            )
        }
    return versions, names


def _stamp_only(conn: sa.Connection, version: int) -> None:
    """Leave `version` as the only schema version stamped, as a database it made has it."""
    conn.execute(sa.delete(schema_migrations))
    conn.execute(schema_migrations.insert().values(version=version, applied_at=1))


def _old_batch_template() -> Any:
    """The row template of batch 'old' of queue 'q', enqueued again by the upgrade tests."""
    from dbos_nb.storage.rows import NewWorkflow

    return NewWorkflow(
        workflow_id="old",
        name="fn",
        inputs=b"",
        status="ENQUEUED",
        created_at=2,
        queue_name="q",
        batch_id="old",
    )


def test_a_version_1_database_gains_the_fifo_index(db_url: str) -> None:
    """Version 2 adds the partial index that gives a queue's waiting rows in order; a database
    made by version 1 gets it at the next launch, and its rows stay as they were."""
    from dbos_nb.storage.migrations import migrate

    db = Database(db_url)
    migrate(db)
    table = "dbos_nb.workflow_status" if db.is_postgres else "workflow_status"
    with db.write() as conn:
        conn.execute(
            sa.text("DROP INDEX " + ("dbos_nb." if db.is_postgres else "") + "ix_ws_queue_fifo")
        )
        _stamp_only(conn, 1)
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (workflow_uuid, status, name, queue_name, created_at, "
                "updated_at) VALUES ('old', 'ENQUEUED', 'wf', 'q', 1, 1)"
            )
        )
    migrate(db)
    versions, names = _versions_and_index_names(db)
    with db.read() as conn:
        old = conn.execute(sa.text(f"SELECT status FROM {table} WHERE workflow_uuid = 'old'"))
        assert old.scalar() == "ENQUEUED"
    db.dispose()
    assert sorted(versions) == list(range(1, SCHEMA_VERSION + 1))
    assert "ix_ws_queue_fifo" in names


def test_a_version_3_database_gains_the_batch_items_digest(db_url: str) -> None:
    """Version 4 adds batches.items_digest; a batch recorded by version 3 keeps its row (NULL
    digest), takes the digest of the next items mapped under its name, and then refuses
    others."""
    from dbos_nb.errors import BatchConflictError
    from dbos_nb.storage.migrations import migrate
    from dbos_nb.storage.store import SystemStore

    db = Database(db_url)
    migrate(db)
    prefix = "dbos_nb." if db.is_postgres else ""
    with db.write() as conn:  # the schema as version 3 left it
        conn.execute(sa.text(f"DROP TABLE {prefix}batches"))
        conn.execute(
            sa.text(
                f"CREATE TABLE {prefix}batches (batch_id VARCHAR(255) PRIMARY KEY, "
                "queue_name VARCHAR(255) NOT NULL, function_name VARCHAR(512) NOT NULL, "
                "size INTEGER NOT NULL, created_at BIGINT NOT NULL)"
            )
        )
        conn.execute(sa.text(f"INSERT INTO {prefix}batches VALUES ('old', 'q', 'fn', 2, 1)"))
        _stamp_only(conn, 3)
    migrate(db)
    migrate(db)  # a second launch finds the column in place
    store = SystemStore(db)
    template = _old_batch_template()
    items = [("old/0", b"a", None), ("old/1", b"b", None)]
    store.insert_enqueued_batch(template, items, "d1")
    with pytest.raises(BatchConflictError, match="other items"):
        store.insert_enqueued_batch(template, items, "d2")
    store.insert_enqueued_batch(template, items, None)  # no digest to compare: attaches
    versions, _ = _versions_and_index_names(db)
    with db.read() as conn:
        digest = conn.execute(sa.text(f"SELECT items_digest FROM {prefix}batches")).scalar()
    db.dispose()
    assert sorted(versions) == list(range(3, SCHEMA_VERSION + 1)) and digest == "d1"


def test_a_version_2_database_gets_the_active_deadline_index(db_url: str) -> None:
    """Version 3 replaces the index of every row that ever had a deadline with one of active
    rows only; a version 2 database gets it at the next launch, its rows kept, and its overdue
    workflows are still found."""
    from dbos_nb.storage.migrations import migrate
    from dbos_nb.storage.store import SystemStore

    db = Database(db_url)
    migrate(db)
    prefix = "dbos_nb." if db.is_postgres else ""
    table = f"{prefix}workflow_status"
    with db.write() as conn:  # the schema as version 2 left it
        conn.execute(sa.text(f"DROP INDEX {prefix}ix_ws_active_deadline"))
        conn.execute(
            sa.text(
                f"CREATE INDEX ix_ws_deadline ON {table} (workflow_deadline_epoch_ms) "
                "WHERE workflow_deadline_epoch_ms IS NOT NULL"
            )
        )
        _stamp_only(conn, 2)
        for wid, status in (("done", "SUCCESS"), ("late", "PENDING")):
            conn.execute(
                sa.text(
                    f"INSERT INTO {table} (workflow_uuid, status, name, created_at, updated_at, "
                    f"workflow_deadline_epoch_ms) VALUES ('{wid}', '{status}', 'wf', 1, 1, 5)"
                )
            )
    migrate(db)
    versions, names = _versions_and_index_names(db)
    assert sorted(versions) == list(range(2, SCHEMA_VERSION + 1))
    assert "ix_ws_active_deadline" in names and "ix_ws_deadline" not in names
    assert SystemStore(db).cancel_overdue(10) == ["late"]
    with db.read() as conn:
        statuses = dict(conn.execute(sa.text(f"SELECT workflow_uuid, status FROM {table}")).all())
    db.dispose()
    assert statuses == {"done": "SUCCESS", "late": "CANCELLED"}


def test_a_version_4_database_gains_fork_lineage(db_url: str) -> None:
    """Version 5 adds workflow_status.forked_from and was_forked_from; rows made before keep
    their values (no lineage known), and a fork made after records its lineage. It also adds
    executors.lease_ms: an executor registered before has none (and is judged by the judge's
    lease), one registered after records its own."""
    from dbos_nb.core import management
    from dbos_nb.storage.migrations import migrate
    from dbos_nb.storage.store import SystemStore

    db = Database(db_url)
    migrate(db)
    prefix = "dbos_nb." if db.is_postgres else ""
    table = prefix + "workflow_status"
    with db.write() as conn:  # the tables as version 4 left them
        for column in ("forked_from", "was_forked_from"):
            conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(sa.text(f"ALTER TABLE {prefix}executors DROP COLUMN lease_ms"))
        _stamp_only(conn, 4)
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (workflow_uuid, status, name, created_at, updated_at) "
                "VALUES ('old', 'SUCCESS', 'wf', 1, 1)"
            )
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {prefix}executors (executor_id, hostname, pid, token, started_at, "
                "heartbeat_at) VALUES ('old-executor', 'h', 1, 't', 1000, 1000)"
            )
        )
    migrate(db)
    migrate(db)  # a second launch finds the columns in place
    store = SystemStore(db)
    store.register_executor("new-executor", "h", 2, "t2", 1000, lease_ms=60_000)
    leases = {e["executor_id"]: e["lease_ms"] for e in store.list_executors()}
    assert leases == {"old-executor": None, "new-executor": 60_000}
    assert store.take_over_expired(40_000, 30_000, keep="judge") == {"old-executor": []}
    (old,) = management.list_workflows(store)
    assert (old.workflow_id, old.status, old.forked_from, old.was_forked_from) == (
        "old",
        "SUCCESS",
        None,
        False,
    )
    new_id = management.fork(store, "old", 0, 2, None, None)
    lineage = {
        w.workflow_id: (w.forked_from, w.was_forked_from) for w in management.list_workflows(store)
    }
    versions, _ = _versions_and_index_names(db)
    db.dispose()
    assert lineage == {"old": (None, True), new_id: ("old", False)}
    assert sorted(versions) == list(range(4, SCHEMA_VERSION + 1))


def test_a_version_6_database_gets_batch_keys(db_url: str) -> None:
    """Version 7 replaces the batch id on every row of a batch (and in its index) by the batch's
    64-bit key: an old database's batches keep their rows, counts and records, the old column
    and index go, and the batch can still be enqueued again (attached) or retried."""
    from dbos_nb.models import QueueSettings
    from dbos_nb.storage.migrations import migrate
    from dbos_nb.storage.schema import batch_key
    from dbos_nb.storage.store import SystemStore

    db = Database(db_url)
    migrate(db)
    prefix = "dbos_nb." if db.is_postgres else ""
    table = prefix + "workflow_status"
    with db.write() as conn:  # the schema as version 6 left it
        conn.execute(sa.text(f"DROP INDEX {prefix}ix_ws_batch"))
        conn.execute(sa.text(f"DROP INDEX {prefix}ux_batches_key"))
        conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN batch_key"))
        conn.execute(sa.text(f"ALTER TABLE {prefix}batches DROP COLUMN batch_key"))
        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN batch_id VARCHAR(255)"))
        conn.execute(
            sa.text(
                f"CREATE INDEX ix_ws_batch ON {table} (batch_id, status) WHERE batch_id IS NOT NULL"
            )
        )
        _stamp_only(conn, 6)
        conn.execute(sa.text(f"INSERT INTO {prefix}batches VALUES ('old', 'q', 'fn', 3, 1, NULL)"))
        for wid, status, batch in (
            ("old/0", "SUCCESS", "'old'"),
            ("old/1", "ERROR", "'old'"),
            ("old/2", "ENQUEUED", "'old'"),
            ("alone", "SUCCESS", "NULL"),
        ):
            conn.execute(
                sa.text(
                    f"INSERT INTO {table} (workflow_uuid, status, name, created_at, updated_at, "
                    f"queue_name, batch_id) VALUES ('{wid}', '{status}', 'fn', 1, 1, 'q', {batch})"
                )
            )
    migrate(db)
    migrate(db)  # a second launch finds the schema in place
    store = SystemStore(db)
    store.upsert_queue(QueueSettings(name="q"), 1)  # its queue, as the batch's process declared it
    assert store.batch_counts("old") == {"SUCCESS": 1, "ERROR": 1, "ENQUEUED": 1}
    record = store.get_batch("old")
    assert record is not None and record["batch_key"] == batch_key("old")
    template = _old_batch_template()
    store.insert_enqueued_batch(template, [(f"old/{i}", b"", None) for i in range(3)])
    assert store.run_again_in_batch("old", 3) == ["old/1"]
    assert store.batch_counts("old") == {"SUCCESS": 1, "ENQUEUED": 2}
    versions, names = _versions_and_index_names(db)
    with db.read() as conn:
        schema = "dbos_nb" if db.is_postgres else None
        columns = {c["name"] for c in sa.inspect(conn).get_columns("workflow_status", schema)}
        keys = dict(conn.execute(sa.text(f"SELECT workflow_uuid, batch_key FROM {table}")).all())
    db.dispose()
    assert sorted(versions) == list(range(6, SCHEMA_VERSION + 1))
    assert "ix_ws_batch" in names and "batch_id" not in columns
    assert keys == {
        "old/0": batch_key("old"),
        "old/1": batch_key("old"),
        "old/2": batch_key("old"),
        "alone": None,
    }


def test_the_deadline_sweep_reads_active_workflows_only(launched: str) -> None:
    """The scheduler's sweep for overdue workflows runs ten times a second while work runs; it
    must not read again every finished workflow that once had a timeout (the index it reads
    holds active workflows only)."""
    from dbos_nb.storage import workflow_control

    started, release = threading.Event(), threading.Event()

    @DBOS.workflow()
    def timed(i: int) -> int:
        if i < 0:
            started.set()
            release.wait(30)
        return i

    q = Queue("sweep_q")
    with SetWorkflowTimeout(600):
        finished = [q.enqueue(timed, i) for i in range(20)]
        running = q.enqueue(timed, -1)
    assert [h.get_result() for h in finished] == list(range(20))
    assert started.wait(20)  # dequeued: its deadline is set
    try:
        db = get_runtime().db
        far = 2**62  # every deadline has passed by then
        # The sweep's probe for one overdue row, then (when there is one) its full read.
        for stmt in (workflow_control._FIRST_OVERDUE, workflow_control._OVERDUE):
            sql = db.prepared(stmt).sql
            if db.is_postgres:
                _check_pg_sweep_plan(db, sql, far, probe=stmt is workflow_control._FIRST_OVERDUE)
                continue
            with db.read() as conn:
                args = (far, 0) if "OFFSET" in sql else (far,)
                plan = str(conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, args).all())
            assert "ix_ws_active_deadline" in plan and "TEMP B-TREE" not in plan, plan
        if not db.is_postgres:
            with db.write() as conn:  # ANALYZE writes: under the write lock
                conn.exec_driver_sql("ANALYZE")
                stat = conn.exec_driver_sql(
                    "SELECT stat FROM sqlite_stat1 WHERE idx = 'ix_ws_active_deadline'"
                ).scalar()
            # The index's entries: the running one only.
            assert stat is not None and stat.split()[0] == "1", stat
    finally:
        release.set()
    assert running.get_result() == -1


def _check_pg_sweep_plan(db: Database, sql: str, far: int, *, probe: bool) -> None:
    """PostgreSQL's generic plan of a sweep statement (as dbos_nb runs it: prepared) reads the
    index of active workflows, finds the running one only and reads no finished row; the probe
    walks the index itself (no bitmap), which marks dead row versions' entries as it goes."""
    with db.read() as conn:
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        conn.exec_driver_sql("PREPARE sweep_test(bigint) AS " + sql.replace("%(now)s", "$1"))
        plan = conn.exec_driver_sql(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE sweep_test({far})"
        ).scalar()
        conn.exec_driver_sql("DEALLOCATE sweep_test")
        conn.exec_driver_sql("RESET plan_cache_mode")
    nodes, stack = [], [plan[0]["Plan"]]
    while stack:
        nodes.append(stack.pop())
        stack.extend(nodes[-1].get("Plans", []))
    scans = [n for n in nodes if "Index Name" in n]
    assert [n["Index Name"] for n in scans] == ["ix_ws_active_deadline"], nodes
    assert scans[0]["Actual Rows"] == 1, nodes  # the running one, not the 20 finished
    assert all(n.get("Rows Removed by Filter", 0) == 0 for n in nodes), nodes
    assert all(n.get("Rows Removed by Index Recheck", 0) == 0 for n in nodes), nodes
    if probe:
        assert scans[0]["Node Type"] == "Index Scan", nodes


def test_a_claim_reads_waiting_rows_in_index_order(tmp_path: Path) -> None:
    """SQLite's plan for a claim's ready rows uses the FIFO index and sorts nothing (a sort of
    every waiting row at each claim made claims on a long queue slow)."""
    from dbos_nb.storage import claims
    from dbos_nb.storage.migrations import migrate

    db = Database(f"sqlite:///{tmp_path / 'plan.sqlite'}")
    migrate(db)
    for by_name in (False, True):
        stmt = claims._candidates_statement(False, False, by_name, False)
        compiled = stmt.compile(dialect=db.engine.dialect)
        sql = compiled.string.replace("(__[POSTCOMPILE_names])", "('wf')")
        values = {name: bind.value for name, bind in compiled.binds.items()}
        values.update(q="q", n=8)
        args = tuple(values[name] for name in compiled.positiontup or [] if name != "names")
        with db.read() as conn:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, args).all()
        plan = " | ".join(str(row[-1]) for row in rows)
        assert "ix_ws_queue_fifo" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
    db.dispose()


def _seq_scans_of_workflow_status(url: str) -> int:
    """Sequential scans of workflow_status so far, once every other session has ended (a
    session reports its counts when it ends)."""
    import psycopg

    dsn = libpq_dsn(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "sessions of the database never ended"
            time.sleep(0.05)
        row = conn.execute(
            "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'workflow_status'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_prepared_statements_never_scan_the_workflow_table(pg_server_url: str) -> None:
    """With PostgreSQL planning every prepared statement generically (as it may choose to after
    five runs), enqueueing, claiming and running work reads workflow_status through its indexes.
    A status passed as a parameter made the enqueue's FIFO check scan the whole table: 8.7 ms
    per enqueue with 20,000 finished rows, growing with the table."""
    from conftest import create_pg_database, drop_pg_database

    url = create_pg_database(pg_server_url)
    try:
        dsn = sa.make_url(url)
        engine = sa.create_engine(dsn.set(drivername="postgresql+psycopg"))
        with engine.begin() as conn:
            conn.execute(
                sa.text(f'ALTER DATABASE "{dsn.database}" SET plan_cache_mode = force_generic_plan')
            )
        engine.dispose()
        DBOS(config=config(url))
        unlimited = Queue("plain")
        limited = Queue("limited", concurrency=2)
        per_worker = Queue("per_worker", worker_concurrency=2)
        rated = Queue("rated", limiter={"limit": 1000, "period": 1.0}, priority_enabled=True)

        @DBOS.workflow()
        def plus_one(x: int) -> int:
            return x + 1

        DBOS.launch()
        engine = sa.create_engine(dsn.set(drivername="postgresql+psycopg"))
        with engine.begin() as conn:  # a long history of finished work on every queue
            conn.execute(
                sa.text(
                    "INSERT INTO dbos_nb.workflow_status (workflow_uuid, status, name, queue_name,"
                    " created_at, updated_at) SELECT 'old-' || i, 'SUCCESS', 'old',"
                    " (ARRAY['plain', 'limited', 'per_worker', 'rated'])[1 + i % 4], i, i"
                    " FROM generate_series(1, 30000) AS i"
                )
            )
            conn.execute(sa.text("ANALYZE dbos_nb.workflow_status"))
        engine.dispose()
        DBOS.destroy()
        before = _seq_scans_of_workflow_status(url)
        DBOS(config=config(url))
        DBOS.launch()
        for queue in (unlimited, limited, per_worker, rated):
            handles = [queue.enqueue(plus_one, i) for i in range(30)]
            assert [h.get_result(timeout_sec=60) for h in handles] == list(range(1, 31))
        DBOS.destroy()
        assert _seq_scans_of_workflow_status(url) == before
    finally:
        DBOS.destroy()
        drop_pg_database(pg_server_url, url)


def _rows_read_from_workflow_status(url: str) -> int:
    """Rows and index entries of workflow_status read so far, by scans of any kind, once the
    counts have settled (an idle session reports its counts within about a second)."""
    import psycopg

    dsn = libpq_dsn(url)
    query = (
        "SELECT (SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'workflow_status')"
        " + (SELECT sum(idx_tup_read) FROM pg_stat_user_indexes"
        " WHERE relname = 'workflow_status')"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 30
        last, since = None, time.monotonic()
        while True:
            row = conn.execute(query).fetchone()
            assert row is not None
            if row[0] != last:
                last, since = row[0], time.monotonic()
            elif time.monotonic() - since > 1.5:
                return int(last)
            assert time.monotonic() < deadline, "the counts never settled"
            time.sleep(0.1)


@pytest.mark.parametrize("analyzed_young", [False, True], ids=["never-analyzed", "analyzed-young"])
def test_plans_made_on_a_young_table_do_not_scan_it_once_it_has_grown(
    pg_server_url: str, analyzed_young: bool
) -> None:
    """PostgreSQL keeps a prepared statement's plan until the table's next ANALYZE, which
    autovacuum runs a minute or more apart: thousands of rows later, in a busy queue.
    - Never analyzed: the merged step record of a batch (one statement over arrays) was
      planned as a scan of the whole table, and every batch read it all (throughput fell as
      the table grew).
    - Analyzed while it held a few rows (a notebook's first small batch, then a large one):
      looking a workflow up by id was planned as a scan, and every handle's wait read the
      whole table."""
    from conftest import create_pg_database, drop_pg_database

    url = create_pg_database(pg_server_url)
    # Far more rows than the index look-ups of a batch of 200 read (20,000-30,000 entries,
    # mostly of the partial index of this executor's running workflows, more on a busy
    # machine): one scan stands out.
    grown = 100_000
    try:
        DBOS(config=config(url))
        queue = Queue("growing")

        @DBOS.step()
        def double(x: int) -> int:
            return 2 * x

        @DBOS.workflow()
        def twice(x: int) -> int:
            return double(x)

        DBOS.launch()
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        with engine.begin() as conn:
            # No ANALYZE during the test: it would make every session plan again.
            conn.execute(
                sa.text("ALTER TABLE dbos_nb.workflow_status SET (autovacuum_enabled = false)")
            )
        committer = get_runtime().db.committer
        before = (committer.batches, committer.statements)
        for i in range(20):  # the young table: statements are prepared and planned
            if analyzed_young and i == 2:
                with engine.begin() as conn:
                    conn.execute(sa.text("ANALYZE dbos_nb.workflow_status"))
            handles = queue.enqueue_many(twice, range(8))
            assert [h.get_result(timeout_sec=60) for h in handles] == [2 * x for x in range(8)]
        with engine.begin() as conn:  # the table grows, its statistics stay those of none
            conn.execute(
                sa.text(
                    "INSERT INTO dbos_nb.workflow_status (workflow_uuid, status, name, queue_name,"
                    " created_at, updated_at) SELECT 'old-' || i, 'SUCCESS', 'old', 'growing', i, i"
                    f" FROM generate_series(1, {grown}) AS i"
                )
            )
        engine.dispose()
        read_young = _rows_read_from_workflow_status(url)
        handles = queue.enqueue_many(twice, range(200))
        assert [h.get_result(timeout_sec=60) for h in handles] == [2 * x for x in range(200)]
        # Workflows shared commits, so merged statements ran.
        assert committer.statements - before[1] > committer.batches - before[0]
        DBOS.destroy()
        # Index look-ups read a row or two each; one scan of the grown table (or of one of its
        # indexes) reads them all.
        assert _rows_read_from_workflow_status(url) - read_young < grown
    finally:
        DBOS.destroy()
        drop_pg_database(pg_server_url, url)


def test_a_newer_schema_is_refused(db_url: str) -> None:
    DBOS(config=config(db_url))
    DBOS.launch()
    DBOS.destroy()
    db = Database(db_url)
    with db.write() as conn:
        conn.execute(schema_migrations.insert().values(version=SCHEMA_VERSION + 1, applied_at=0))
    db.dispose()
    DBOS(config=config(db_url))
    with pytest.raises(DBOSConfigError, match="newer"):
        DBOS.launch()


HOLDER = (
    "import sys, time\n"
    "from dbos_nb import DBOS\n"
    "DBOS(config={'name': 'holder', 'system_database_url': sys.argv[1],"
    " 'executor_id': 'shared-id', 'heartbeat_interval_sec': 0.2})\n"
    "DBOS.launch()\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


def test_executor_id_held_by_a_live_process_is_refused(db_url: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        DBOS(config=config(db_url, executor_id="shared-id"))
        with pytest.raises(DBOSExecutorIdInUseError, match="shared-id"):
            DBOS.launch()
        DBOS.destroy()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
    # Its holder is dead: the id can be taken over (and its work recovered).
    DBOS(config=config(db_url, executor_id="shared-id"))
    DBOS.launch()


@DBOS.dbos_class()
class Greeter:
    """Workflows and steps as static, class and instance methods."""

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    @staticmethod
    @DBOS.workflow()
    def static_wf(name: str) -> str:
        return Greeter.shout(name)

    @staticmethod
    @DBOS.step()
    def shout(name: str) -> str:
        return name.upper()

    @classmethod
    @DBOS.workflow()
    def class_wf(cls, name: str) -> str:
        return f"{cls.__name__}:{name}"

    @DBOS.workflow()
    def instance_wf(self, name: str) -> str:
        return f"{self.greeting}, {name}"


def test_methods_as_workflows(launched: str) -> None:
    with SetWorkflowID("static"):
        assert Greeter.static_wf("ada") == "ADA"
    assert Greeter.class_wf("bob") == "Greeter:bob"
    assert Greeter("hello").instance_wf("cy") == "hello, cy"
    assert DBOS.get_workflow_status("static").name == "Greeter.static_wf"  # type: ignore[union-attr]
    handle = DBOS.start_workflow(Greeter("hi").instance_wf, "dee")
    assert handle.get_result() == "hi, dee"


def test_recover_pending_and_get_result(launched: str) -> None:
    @DBOS.workflow(name="recoverable")
    def recoverable(x: int) -> int:
        return x * 3

    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.serialization import dump_inputs
    from dbos_nb.storage.store import NewWorkflow

    rt = get_runtime()
    rt.store.insert_workflow(
        NewWorkflow(
            workflow_id="stuck",
            name="recoverable",
            inputs=dump_inputs("recoverable", (7,), {}),
            status="PENDING",
            created_at=rt.now_ms(),
            executor_id="some-dead-executor",
            owner_xid="gone",
        )
    )
    handles = DBOS.recover_pending_workflows(["some-dead-executor"])
    assert [h.workflow_id for h in handles] == ["stuck"]
    assert DBOS.get_result("stuck") == 21


def test_dbos_names_are_exported() -> None:
    for name in [
        "DBOS",
        "Queue",
        "SetWorkflowID",
        "SetWorkflowTimeout",
        "SetEnqueueOptions",
        "DBOSClient",
        "EnqueueOptions",
        "WorkflowHandle",
        "WorkflowStatus",
        "WorkflowStatusString",
        "DBOSConfig",
        "DBOSException",
        "DBOSAwaitedWorkflowCancelledError",
        "DBOSMaxStepRetriesExceeded",
        "DBOSNonExistentWorkflowError",
        "DBOSConflictingRegistrationError",
        "DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded",
    ]:
        assert hasattr(dbos_nb, name), name
        assert name in dbos_nb.__all__
    assert {s.value for s in WorkflowStatusString} == {
        "ENQUEUED",
        "PENDING",
        "SUCCESS",
        "ERROR",
        "CANCELLED",
        "MAX_RECOVERY_ATTEMPTS_EXCEEDED",
    }
    assert WorkflowStatusString.SUCCESS == "SUCCESS"
    fields = set(WorkflowStatus.__dataclass_fields__)
    assert {
        "workflow_id",
        "status",
        "name",
        "input",
        "output",
        "error",
        "created_at",
        "updated_at",
        "dequeued_at",
        "queue_name",
        "priority",
        "deduplication_id",
        "app_version",
        "parent_workflow_id",
        "recovery_attempts",
    } <= fields
    for error in [
        "DBOSAwaitedWorkflowCancelledError",
        "DBOSMaxStepRetriesExceeded",
        "DBOSNonExistentWorkflowError",
        "DBOSConflictingRegistrationError",
    ]:
        assert issubclass(getattr(dbos_nb, error), dbos_nb.DBOSException)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": ""}, "name"),
        ({"name": "x", "bogus_key": 1}, "bogus_key"),
        ({"name": "x", "system_database_url": "mysql://h/db"}, "unsupported database URL"),
        ({"name": "x", "system_database_url": "sqlite://"}, "in-memory"),
        ({"name": "x", "system_database_url": "sqlite:///:memory:"}, "in-memory"),
        ({"name": "x", "system_database_url": "sqlite:///f.db?mode=memory"}, "in-memory"),
        ({"name": "x", "polling_interval_sec": 0}, "polling_interval_sec"),
        # NaN passes a `<= 0` check: it stopped the scheduler's thread after a clean launch.
        ({"name": "x", "polling_interval_sec": float("nan")}, "polling_interval_sec.*nan"),
        ({"name": "x", "polling_interval_sec": float("inf")}, "polling_interval_sec.*inf"),
        ({"name": "x", "heartbeat_interval_sec": float("nan")}, "heartbeat_interval_sec"),
        ({"name": "x", "executor_lease_sec": float("inf")}, "executor_lease_sec"),
        ({"name": "x", "executor_id": "e" * 256}, "executor_id"),
        ({"name": "x", "executor_id": 7}, "executor_id"),
    ],
)
def test_bad_config_is_a_clear_error(cfg: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(DBOSConfigError, match=message):
        DBOS(config=cfg)
        DBOS.launch()


def test_second_dbos_with_other_config_is_refused(tmp_path: Path) -> None:
    DBOS(config={"name": "a", "system_database_url": f"sqlite:///{tmp_path / 'a.sqlite'}"})
    DBOS(config={"name": "a", "system_database_url": f"sqlite:///{tmp_path / 'a.sqlite'}"})
    with pytest.raises(DBOSConfigError, match="destroy"):
        DBOS(config={"name": "b", "system_database_url": f"sqlite:///{tmp_path / 'b.sqlite'}"})


# -- values too long for their columns -----------------------------------------------------------
# PostgreSQL's VARCHAR columns refuse an over-long value with a raw DataError carrying the SQL;
# SQLite keeps it whole. Each is refused by name, with its limit, before anything is written, on
# both backends; a value at the limit is stored whole on both.


def _stored_rows(url: str) -> dict[str, dict[str, Any]]:
    """Every workflow row, by id, as stored."""
    from dbos_nb.storage.store import SystemStore

    db = Database(url)
    try:
        return {r["workflow_uuid"]: r for r in SystemStore(db).list_workflows(load_input=False)}
    finally:
        db.dispose()


def test_an_over_long_deduplication_id_is_refused(launched: str) -> None:
    q = Queue("dedup_len_q")

    @DBOS.workflow(name="dedup_len_wf")
    def dedup_len_wf() -> int:
        return 1

    with (
        pytest.raises(DbosNbError, match="a deduplication_id can have at most 512 characters"),
        SetEnqueueOptions(deduplication_id="d" * 513),
    ):
        q.enqueue(dedup_len_wf)
    assert _stored_rows(launched) == {}
    with SetEnqueueOptions(deduplication_id="d" * 512):  # fits (PostgreSQL would refuse more)
        handle = q.enqueue(dedup_len_wf)
    assert handle.get_result(timeout_sec=30) == 1


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("queue_name", "q" * 256, "a queue name can have at most 255 characters, got 256"),
        ("workflow_name", "w" * 513, "a workflow name can have at most 512 characters, got 513"),
        ("deduplication_id", "d" * 513, "a deduplication_id can have at most 512 characters"),
        ("app_version", "v" * 256, "an app_version can have at most 255 characters, got 256"),
    ],
)
def test_over_long_client_enqueue_options_are_refused(
    db_url: str, option: str, value: str, message: str
) -> None:
    with DBOSClient(db_url, create=True) as client:
        options: dict[str, Any] = {
            "queue_name": "client_len_q",
            "workflow_name": "client_len_wf",
            "allow_unregistered": True,
        }
        with pytest.raises(DbosNbError, match=message):
            client.enqueue(cast(EnqueueOptions, {**options, option: value}))
        assert _stored_rows(db_url) == {}
        at_limit = {**options, option: value[:-1]}
        workflow_id = client.enqueue(cast(EnqueueOptions, at_limit)).workflow_id
    column = {"workflow_name": "name", "app_version": "application_version"}.get(option, option)
    assert _stored_rows(db_url)[workflow_id][column] == value[:-1]


def test_a_client_refuses_a_sqlite_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "system.sqlite"
    with pytest.raises(DBOSConfigError, match=r"no database at .*typo.*create=True"):
        DBOSClient(f"sqlite:///{missing}")
    assert not (tmp_path / "typo").exists()  # nothing created on the way
    with DBOSClient(f"sqlite:///{missing}", create=True) as client:
        assert client.list_workflows() == []
    with DBOSClient(f"sqlite:///{missing}") as client:  # now it exists
        assert client.list_workflows() == []


def test_an_over_long_application_version_is_refused(db_url: str) -> None:
    with pytest.raises(DBOSConfigError, match="'application_version' can have at most 255"):
        DBOS(config=config(db_url, application_version="v" * 256))
    DBOS(config=config(db_url, application_version="v" * 255))

    @DBOS.workflow(name="versioned_len_wf")
    def versioned_len_wf() -> int:
        return 1

    DBOS.launch()
    handle = DBOS.start_workflow(versioned_len_wf)
    assert handle.get_result() == 1
    status = handle.get_status()
    assert status is not None and status.app_version == "v" * 255
    # A fork given a version checks it too, before writing anything (DBOS and the client).
    with pytest.raises(DbosNbError, match="an application_version can have at most 255"):
        DBOS.fork_workflow(handle.workflow_id, 1, application_version="v" * 256)
    with DBOSClient(db_url) as client, pytest.raises(DbosNbError, match="at most 255"):
        client.fork_workflow(handle.workflow_id, 1, application_version="v" * 256)
    assert len(DBOS.list_workflows()) == 1


def test_over_long_function_names_are_refused_at_registration(launched: str) -> None:
    """A step's row, when it runs as a workflow of its own, is named with a 17-character
    prefix: its name has 495 characters of the column's 512."""
    with pytest.raises(DbosNbError, match="a workflow name can have at most 512 characters"):

        @DBOS.workflow(name="w" * 513)
        def too_long_wf() -> None:
            pass

    with pytest.raises(DbosNbError, match="a step name can have at most 495 characters"):

        @DBOS.step(name="s" * 496)
        def too_long_step() -> None:
            pass

    with pytest.raises(DbosNbError, match="a transaction name can have at most 495 characters"):

        @DBOS.transaction(name="t" * 496)
        def too_long_tx() -> None:
            pass

    @DBOS.workflow(name="w" * 512)
    def longest_wf() -> int:
        return longest_step() + 1

    @DBOS.step(name="s" * 495)
    def longest_step() -> int:
        return 1

    q = Queue("names_len_q")
    assert q.enqueue(longest_step).get_result(timeout_sec=30) == 1
    assert q.enqueue(longest_wf).get_result(timeout_sec=30) == 2
    assert sorted(len(r["name"]) for r in _stored_rows(launched).values()) == [512, 512]


def test_a_postgres_claim_reads_no_finished_history_of_its_queue(pg_server_url: str) -> None:
    """A queue that ran a big batch yesterday and holds a big one today: once PostgreSQL's
    statistics count many waiting rows in it, a claim must still start at the waiting ones
    (the FIFO index), not walk the primary key through yesterday's finished rows, which made
    every claim read all of them (100,000 finished rows: 27 ms a claim, 60 workflows/s)."""
    import psycopg

    from dbos_nb.models import QueueSettings
    from dbos_nb.storage import claims
    from dbos_nb.storage.migrations import migrate
    from dbos_nb.storage.store import SystemStore

    url = create_pg_database(pg_server_url)
    db = Database(url)
    try:
        migrate(db)
        SystemStore(db).upsert_queue(QueueSettings(name="again"), 0)
        insert = (
            "INSERT INTO dbos_nb.workflow_status (workflow_uuid, status, name, queue_name,"
            " created_at, updated_at) SELECT '{0}-' || i, 'ENQUEUED', 'w', 'again', i, i"
            " FROM generate_series(1, {1}) AS i"
        )
        with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
            conn.execute(insert.format("yesterday", 20_000))  # ran through the queue ...
            conn.execute("UPDATE dbos_nb.workflow_status SET status = 'SUCCESS'")  # ... and ended
            conn.execute(insert.format("today", 10_000))
            conn.execute("ANALYZE dbos_nb.workflow_status")
        params = {"q": "again", "n": 8, "executor": "e", "owner": "o", "now": 1, "wc": None}
        params["prio"] = False
        for stmt in (
            claims._candidates_statement(True, False, False, False),
            claims._unshared_claim_statement(True, False, False, False),
        ):
            prepared = db.prepared(stmt)
            explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + prepared.sql
            with psycopg.connect(libpq_dsn(url)) as conn:  # rolled back: EXPLAIN ANALYZE writes
                plan = conn.execute(explain, prepared.arguments(params)).fetchone()
                conn.rollback()
            assert plan is not None
            nodes, stack = [], [plan[0][0]["Plan"]]
            while stack:
                nodes.append(stack.pop())
                stack.extend(nodes[-1].get("Plans", []))
            assert sum(n.get("Rows Removed by Filter", 0) for n in nodes) < 100, nodes
            assert "ix_ws_queue_fifo" in {n.get("Index Name") for n in nodes}, nodes
    finally:
        db.dispose()
        drop_pg_database(pg_server_url, url)


def test_cancel_and_delete_reach_more_children_than_a_statement_takes_parameters(
    pg_server_url: str,
) -> None:
    """A workflow that enqueued 66,000 children (PostgreSQL takes at most 65,535 parameters in
    a statement): cancelling it with its children cancels them all, with one notification
    each for their waiters, and deleting it deletes them all."""
    import psycopg

    from dbos_nb.storage.database import NOTIFY_CHANNEL
    from dbos_nb.storage.migrations import migrate
    from dbos_nb.storage.store import SystemStore

    url = create_pg_database(pg_server_url)
    db = Database(url, notifications=True)
    try:
        migrate(db)
        store = SystemStore(db)
        children = 66_000
        with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO dbos_nb.workflow_status (workflow_uuid, status, name, created_at,"
                " updated_at) VALUES ('parent', 'PENDING', 'p', 0, 0)"
            )
            conn.execute(
                "INSERT INTO dbos_nb.workflow_status (workflow_uuid, status, name, queue_name,"
                " parent_workflow_id, created_at, updated_at) SELECT 'kid-' || i, 'ENQUEUED',"
                f" 'k', 'kids', 'parent', i, i FROM generate_series(1, {children}) AS i"
            )
        with psycopg.connect(libpq_dsn(url), autocommit=True) as listener:
            listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            changed = store.cancel_workflows(["parent"], 1, cancel_children=True)
            assert len(changed) == children + 1
            heard = sum(
                "done:" in n.payload for n in listener.notifies(timeout=30, stop_after=children + 1)
            )
        assert heard == children + 1
        with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM dbos_nb.workflow_status WHERE status = 'CANCELLED'"
            ).fetchone()
        assert row == (children + 1,)
        assert len(store.delete_workflows(["parent"], with_children=True)) == children + 1
    finally:
        db.dispose()
        drop_pg_database(pg_server_url, url)
