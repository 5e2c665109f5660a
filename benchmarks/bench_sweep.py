"""Deadline-sweep benchmark: what the worker's sweep for overdue workflows costs once many
finished workflows had timeouts, with schema version 3's index and with version 2's.

While work runs, the scheduler looks for workflows past their deadline ten times a second. Per
backend, this script runs N one-step workflows under `SetWorkflowTimeout` to completion (their
deadlines then pass, as they do in a notebook an hour after a batch), keeps one timed workflow
running, and times the sweep (`cancel_overdue`): median wall and CPU time of one sweep, with the
index that holds active workflows only (schema version 3) and with version 2's index of every
workflow that ever had a deadline, put back for the comparison. On PostgreSQL the index still
points at the finished rows' old versions until (auto)vacuum passes: the sweep is timed right
after the batch and again after a VACUUM.

    python benchmarks/bench_sweep.py [--quick] [--backend sqlite|postgres|both] [--finished N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench_common import (
    REPO_ROOT,
    RESULT_MARKER,
    PostgresTarget,
    run_measurement,
    sqlite_dir,
)

TIMEOUT_SEC = 1.0  # each workflow's timeout: their deadlines pass soon after they finish
SWEEPS = 200


def _time_sweeps(sweep: Any) -> tuple[float, float]:
    """Median wall and CPU microseconds of one sweep, over SWEEPS runs after a warm-up."""
    for _ in range(20):
        sweep()
    walls, cpus = [], []
    for _ in range(SWEEPS):
        t, c = time.perf_counter(), time.thread_time()
        sweep()
        walls.append(time.perf_counter() - t)
        cpus.append(time.thread_time() - c)
    return 1e6 * statistics.median(walls), 1e6 * statistics.median(cpus)


def run_worker(url: str, finished: int) -> dict[str, Any]:
    """Measure on one fresh system database (run in a subprocess: DBOS is a singleton)."""
    sys.path.insert(0, str(REPO_ROOT))
    import sqlalchemy as sa

    from dbos_nb import DBOS, Queue, SetWorkflowTimeout
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.core.steps import cancel_overdue

    DBOS(config={"name": "bench_sweep", "system_database_url": url})
    started, release = threading.Event(), threading.Event()

    @DBOS.step()
    def one_step(i: int) -> int:
        return i

    @DBOS.workflow()
    def timed(i: int) -> int:
        if i < 0:
            started.set()
            release.wait(600)
            return i
        return int(one_step(i))

    queue = Queue("bench_sweep")
    DBOS.launch()
    rt = get_runtime()
    try:
        with SetWorkflowTimeout(TIMEOUT_SEC):
            queue.enqueue_many(timed, list(range(finished)))
        with SetWorkflowTimeout(3600):
            running = queue.enqueue(timed, -1)
        _wait_until_settled(rt, finished, started)
        time.sleep(TIMEOUT_SEC + 0.2)  # every finished workflow's deadline has passed

        def sweep() -> None:
            cancel_overdue(rt)

        figures: dict[str, Any] = {"finished": finished, "rows": []}
        rows = figures["rows"]
        rows.append(("v3", "right after the batch", *_time_sweeps(sweep)))
        prefix = "dbos_nb." if rt.db.is_postgres else ""
        if rt.db.is_postgres:
            # Until (auto)vacuum passes, PostgreSQL's indexes still point at the rows' old
            # versions (PENDING, with a deadline), which every sweep then visits.
            with rt.db.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql(f"VACUUM {prefix}workflow_status")
            rows.append(("v3", "after VACUUM", *_time_sweeps(sweep)))
        with rt.db.write() as conn:  # version 2's index, for the comparison
            conn.execute(sa.text(f"DROP INDEX {prefix}ix_ws_active_deadline"))
            conn.execute(
                sa.text(
                    f"CREATE INDEX ix_ws_deadline ON {prefix}workflow_status "
                    "(workflow_deadline_epoch_ms) WHERE workflow_deadline_epoch_ms IS NOT NULL"
                )
            )
        state = "after VACUUM" if rt.db.is_postgres else "right after the batch"
        rows.append(("v2", state, *_time_sweeps(sweep)))
        release.set()
        running.get_result()
        return figures
    finally:
        release.set()
        DBOS.destroy()


def _wait_until_settled(rt: Any, finished: int, started: threading.Event) -> None:
    """Until every batch workflow has ended and the long one runs."""
    import sqlalchemy as sa

    from dbos_nb.storage.schema import status_is
    from dbos_nb.storage.schema import workflow_status as ws

    query = sa.select(sa.func.count()).where(status_is(ws.c.status, "SUCCESS", "CANCELLED"))
    while True:
        with rt.db.read() as conn:
            if conn.execute(query).scalar() >= finished and started.is_set():
                return
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 finished workflows")
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--finished", type=int, help="finished workflows (default 50,000)")
    parser.add_argument("--tmpdir", help="where the SQLite files and PostgreSQL data go")
    parser.add_argument("--worker-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    finished = args.finished or (5_000 if args.quick else 50_000)
    if args.worker_url:
        print(RESULT_MARKER + json.dumps(run_worker(args.worker_url, finished)), flush=True)
        return 0
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    rows: list[tuple[str, dict[str, Any] | None, str | None]] = []
    for backend in backends:
        print(f"  {backend}: {finished:,} timed workflows, then the sweeps ...", file=sys.stderr)
        cmd = [sys.executable, os.path.abspath(__file__), "--finished", str(finished)]
        if backend == "sqlite":
            with sqlite_dir(args.tmpdir) as directory:
                url = f"sqlite:///{Path(directory) / 'sweep.sqlite'}"
                rows.append((backend, *run_measurement([*cmd, "--worker-url", url])))
        else:
            target = PostgresTarget(args.tmpdir)
            try:
                url = target.create_database("bench_sweep")
                rows.append((backend, *run_measurement([*cmd, "--worker-url", url])))
            finally:
                target.close()
    print()
    print(f"{'backend':10}{'finished':>9}  {'index':6}{'state':23}{'wall us':>9}{'cpu us':>8}")
    for backend, fig, error in rows:
        if fig is None:
            print(f"{backend:10} failed: {error}")
            continue
        for index, state, wall, cpu in fig["rows"]:
            print(f"{backend:10}{fig['finished']:>9,}  {index:6}{state:23}{wall:>9.0f}{cpu:>8.0f}")
    print(
        f"One sweep = `cancel_overdue`, median of {SWEEPS}; CPU is the calling thread's (on "
        "PostgreSQL the server's work is in the wall time). v3: schema version 3's index of "
        "active workflows; v2: version 2's index of every workflow that had a deadline."
    )
    print(f"Python {platform.python_version()} on {platform.system()} {platform.release()}.")
    return 0 if all(fig is not None for _, fig, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
