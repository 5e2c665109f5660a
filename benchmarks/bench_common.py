"""Shared by the benchmark scripts: a PostgreSQL server to measure on.

Either the server in DBOS_NB_BENCH_PG_URL, or a throwaway one started here with PostgreSQL's
durable defaults (fsync and synchronous_commit on), so that figures are honest.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_URL_ENV = "DBOS_NB_BENCH_PG_URL"
# A measuring subprocess prints its figures as JSON on a line starting with this.
RESULT_MARKER = "BENCH_RESULT "
WORKER_TIMEOUT_SEC = 1800


def run_measurement(
    cmd: list[str], env: dict[str, str] | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """Run one measuring subprocess (with `env` as its environment, if given); (figures, None),
    or (None, what went wrong)."""
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_SEC,
            cwd=tempfile.gettempdir(),
            env=env,
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {WORKER_TIMEOUT_SEC} s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            figures: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
            return figures, None
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return None, f"worker exited with {proc.returncode}:\n{tail}"


def probe_dbos(python: str) -> tuple[bool, str]:
    """Whether `python` can import dbos; the version, or the reason it cannot."""
    probe = "import importlib.metadata as m, dbos; print(m.version('dbos'))"
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot run {python}: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        return False, f"{python} cannot import dbos ({last})"
    return True, proc.stdout.strip()


@contextmanager
def sqlite_dir(tmpdir: str | None) -> Iterator[str]:
    """A temporary folder for SQLite files, removed afterwards."""
    directory = tempfile.mkdtemp(prefix="dbos_nb_bench_sqlite_", dir=tmpdir)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _admin_dsn(server_url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)


def commit_floor(url: str, n: int = 2000) -> float:
    """Inserts per second when each is its own transaction, sent one after the other from
    psycopg with nothing else running: the server's round trip and durable commit (WAL flush)
    alone. An enqueue that returns only once its row is durable cannot go faster one at a time,
    whatever the library around it, so this bounds the throughput of workflows enqueued one by
    one (measurement 1 of bench_queues)."""
    import time

    import psycopg

    with psycopg.connect(_admin_dsn(url), autocommit=True) as conn:
        conn.execute("CREATE TABLE commit_floor (id bigserial PRIMARY KEY, v bytea)")
        insert = "INSERT INTO commit_floor (v) VALUES (%s)"
        for _ in range(50):  # warm: the statement is prepared from its fifth run
            conn.execute(insert, (b"w",))
        start = time.perf_counter()
        for _ in range(n):
            conn.execute(insert, (b"x" * 64,))
        return n / (time.perf_counter() - start)


class PostgresTarget:
    """A PostgreSQL server: the one in DBOS_NB_BENCH_PG_URL or a throwaway durable one."""

    def __init__(self, tmpdir: str | None) -> None:
        self._server: Any = None
        self._databases: list[str] = []
        url = os.environ.get(PG_URL_ENV)
        if url:
            self.server_url = url
            self.description = f"server from {PG_URL_ENV}"
        else:
            sys.path.insert(0, str(REPO_ROOT / "tests"))
            pgserver: Any = importlib.import_module("pgserver")
            directory = tempfile.mkdtemp(prefix="dbos_nb_bench_pg_", dir=tmpdir)
            self._server = pgserver.start(directory, durable=True)
            self.server_url = str(self._server.url)
            self.description = "throwaway server, durable (fsync=on, synchronous_commit=on)"
        try:
            self.version = self._server_version()
        except Exception:
            self.close()
            raise

    def _server_version(self) -> str:
        import psycopg

        with psycopg.connect(_admin_dsn(self.server_url), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            fsync = conn.execute("SHOW fsync").fetchone()
        return f"{row[0] if row else '?'}, fsync={fsync[0] if fsync else '?'}"

    def create_database(self, prefix: str) -> str:
        import psycopg
        from sqlalchemy.engine import make_url

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_admin_dsn(self.server_url), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._databases.append(name)
        url = make_url(self.server_url).set(drivername="postgresql", database=name)
        return url.render_as_string(hide_password=False)

    def close(self) -> None:
        import psycopg

        try:
            if self._databases:
                with psycopg.connect(_admin_dsn(self.server_url), autocommit=True) as conn:
                    for name in self._databases:
                        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            if self._server is not None:
                self._server.stop()
