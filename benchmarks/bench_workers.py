"""Throughput of one-step workflows on PostgreSQL with 1, 2 and 4 `dbos-nb worker` processes.

For each worker count: a fresh database, N worker processes (`dbos-nb worker --import
bench_tasks`), a batch enqueued with `enqueue_many` by a process that runs no work itself, and the
time until every workflow has finished. PostgreSQL runs with its durable defaults (fsync on), or is
the server in DBOS_NB_BENCH_PG_URL.

    python benchmarks/bench_workers.py [--quick] [--workers 1,2,4] [--items 3000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import bench_tasks  # noqa: E402
import pgserver  # noqa: E402

from dbos_nb import DBOS, Queue  # noqa: E402
from dbos_nb.core.runtime import get_runtime  # noqa: E402


def _new_database(server_url: str) -> str:
    name = "bw_" + uuid.uuid4().hex[:10]
    admin = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _start_workers(url: str, count: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for n in range(count):
        cmd = [
            sys.executable,
            "-m",
            "dbos_nb.cli",
            "worker",
            "--db",
            url,
            "--executor-id",
            f"bench-{n}",
            "--import",
            "bench_tasks",
            "--queue",
            "bench",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    return procs


def _wait_for_executors(count: int, timeout: float = 60) -> None:
    store = get_runtime().store
    deadline = time.monotonic() + timeout
    while len([e for e in store.list_executors() if e["executor_id"].startswith("bench-")]) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not start")
        time.sleep(0.05)


def measure(server_url: str, workers: int, items: int) -> float:
    """Workflows per second with `workers` worker processes."""
    url = _new_database(server_url)
    DBOS(config={"name": "bench", "system_database_url": url, "listen_queues": []})
    queue = Queue("bench")
    DBOS.launch()
    procs = _start_workers(url, workers)
    try:
        _wait_for_executors(workers)
        store = get_runtime().store
        started = time.perf_counter()
        queue.enqueue_many(bench_tasks.bench_noop, range(items), batch_id="run")
        while store.batch_counts("run").get("SUCCESS", 0) < items:
            time.sleep(0.01)
        return items / (time.perf_counter() - started)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
        DBOS.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, e.g. 1,2,4")
    parser.add_argument("--items", type=int, help="workflows per run (default 3000, quick 800)")
    args = parser.parse_args()
    items = args.items or (800 if args.quick else 3000)
    counts = [int(c) for c in args.workers.split(",")]
    env_url = os.environ.get("DBOS_NB_BENCH_PG_URL")
    server = None if env_url else pgserver.start(durable=True)
    server_url = env_url or (server.url if server else "")
    try:
        print(f"one-step workflows on PostgreSQL (fsync on), {items} per run, 2 CPU machine")
        print(f"{'workers':>8} {'workflows/s':>12} {'vs 1 worker':>12}")
        base = None
        for count in counts:
            rate = measure(server_url, count, items)
            base = base or rate
            print(f"{count:>8} {rate:>12.0f} {rate / base:>11.2f}x", flush=True)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
