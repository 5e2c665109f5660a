"""Engine overhead benchmark: dbos_nb (and, when available, DBOS Transact) on SQLite and PostgreSQL.

Measures, per backend:

1. the time per step of one workflow that runs 1,000 sequential steps, each returning a small
   value (median over several repetitions, in ms/step);
2. the latency of a direct workflow call with 0 steps and with 1 step (median and p95 in ms over
   a few hundred calls, after a warm-up).

SQLite runs on a fresh temp file; PostgreSQL on a throwaway server started here with its durable
defaults (fsync on), or on the server given by DBOS_NB_BENCH_PG_URL (a dedicated database is
created on it for each run and dropped afterwards).

Each library runs in its own subprocess: both keep process-wide singletons. DBOS Transact (`dbos`)
is measured with `--dbos-python PYTHON` (an interpreter whose environment has `dbos`; it never is
a dependency of this project), or with this interpreter if it can import `dbos`.

SQLite durability differs between the two libraries: dbos_nb ships WAL with synchronous=NORMAL (a
commit survives a crash of the process, not of the OS), DBOS uses SQLite's defaults (rollback
journal, synchronous=FULL, fsync on every commit). With `--nb-sqlite-sync both` (the default)
dbos_nb is also measured with synchronous=FULL, patched in by this script, for a like-for-like
figure.

    python benchmarks/bench_engine.py [--quick] [--backend sqlite|postgres|both]
                                      [--dbos-python /path/to/python]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_common import (
    REPO_ROOT,
    RESULT_MARKER,
    PostgresTarget,
    probe_dbos,
    run_measurement,
    sqlite_dir,
)


@dataclass(frozen=True)
class Settings:
    """How much work one worker does."""

    steps: int
    step_reps: int
    calls: int
    warmup_calls: int

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(steps=1000, step_reps=2, calls=50, warmup_calls=10)
        return cls(steps=1000, step_reps=5, calls=200, warmup_calls=30)


# -- worker: runs inside one subprocess, for one library on one database --------------------------


def _percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _time_calls(func: Callable[[], Any], calls: int, warmup: int) -> list[float]:
    """Per-call latencies in ms, after `warmup` unmeasured calls."""
    for _ in range(warmup):
        func()
    samples: list[float] = []
    for _ in range(calls):
        start = time.perf_counter()
        func()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _force_sqlite_synchronous_full() -> None:
    """Make dbos_nb open SQLite with synchronous=FULL (fsync at every commit), like DBOS.

    Benchmark-only: wraps the hook installer so that one more `connect` listener runs after
    dbos_nb's own (listeners on one engine run in registration order).
    """
    from sqlalchemy import Engine, event

    from dbos_nb.storage import database

    original = database.install_sqlite_hooks

    def install(engine: Engine) -> None:
        original(engine)

        @event.listens_for(engine, "connect")
        def _full_sync(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

    database.install_sqlite_hooks = install


def run_worker(library: str, url: str, settings: Settings, sqlite_full: bool) -> dict[str, Any]:
    """Measure one library on one system database; returns the figures."""
    from importlib import metadata

    if library == "dbos_nb":
        sys.path.insert(0, str(REPO_ROOT))
        if sqlite_full:
            _force_sqlite_synchronous_full()
    module = importlib.import_module(library)
    try:
        version = metadata.version(library)
    except metadata.PackageNotFoundError:
        version = str(getattr(module, "__version__", "?"))
    dbos: Any = module.DBOS

    dbos(
        config={
            "name": "bench_engine",
            "system_database_url": url,
            "run_admin_server": False,
            "log_level": "WARNING",
        }
    )

    # Registered by calling the decorators: the library is only known at run time (Any).
    def small_value(i: int) -> int:
        return i

    bench_step: Callable[[int], int] = dbos.step(name="bench_step")(small_value)

    def steps_body(n: int) -> int:
        total = 0
        for i in range(n):
            total += bench_step(i)
        return total

    def zero_body() -> int:
        return 0

    def one_body() -> int:
        return bench_step(1)

    bench_steps: Callable[[int], int] = dbos.workflow(name="bench_steps")(steps_body)
    bench_zero_steps: Callable[[], int] = dbos.workflow(name="bench_zero_steps")(zero_body)
    bench_one_step: Callable[[], int] = dbos.workflow(name="bench_one_step")(one_body)

    dbos.launch()
    try:
        n = settings.steps
        expected = n * (n - 1) // 2
        bench_steps(50)  # warm-up
        per_step: list[float] = []
        for _ in range(settings.step_reps):
            start = time.perf_counter()
            result = bench_steps(n)
            elapsed = time.perf_counter() - start
            if result != expected:
                raise RuntimeError(f"bench_steps({n}) returned {result}, expected {expected}")
            per_step.append(elapsed * 1000 / n)
        zero = _time_calls(bench_zero_steps, settings.calls, settings.warmup_calls)
        one = _time_calls(bench_one_step, settings.calls, settings.warmup_calls)
    finally:
        dbos.destroy()
    return {
        "library": library,
        "version": version,
        "step_ms": statistics.median(per_step),
        "step_ms_all": per_step,
        "wf0_median": statistics.median(zero),
        "wf0_p95": _percentile(zero, 95),
        "wf1_median": statistics.median(one),
        "wf1_p95": _percentile(one, 95),
    }


# -- orchestration: databases, subprocesses, the table ------------------------------------------


@dataclass(frozen=True)
class Job:
    """One row of the table: a library on a backend, run by an interpreter."""

    backend: str
    label: str
    library: str
    python: str
    sqlite_full: bool = False


@dataclass
class Row:
    job: Job
    figures: dict[str, Any] | None
    error: str | None = None


def _run_job(job: Job, url: str, settings: Settings, script: str) -> Row:
    options = {
        "--worker": job.library,
        "--url": url,
        "--steps": settings.steps,
        "--step-reps": settings.step_reps,
        "--calls": settings.calls,
        "--warmup-calls": settings.warmup_calls,
    }
    cmd = [job.python, script, *(part for o, v in options.items() for part in (o, str(v)))]
    if job.sqlite_full:
        cmd.append("--sqlite-full")
    print(f"  running {job.label} on {job.backend} ...", file=sys.stderr, flush=True)
    figures, error = run_measurement(cmd)
    return Row(job, figures, error)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


METRICS = ("step_ms", "wf0_median", "wf0_p95", "wf1_median", "wf1_p95")
HEADERS = ("ms/step", "0-step med", "0-step p95", "1-step med", "1-step p95")
STEP_GOAL_MS = 0.5


def _table_lines(rows: list[Row]) -> list[tuple[str, str, list[str]]]:
    """(backend, label, cells) for every figure row and every dbos / dbos_nb ratio row."""
    lines: list[tuple[str, str, list[str]]] = []
    for backend in ("sqlite", "postgres"):
        group = [r for r in rows if r.job.backend == backend]
        for row in group:
            figures = row.figures
            cells = [_fmt(figures[m]) for m in METRICS] if figures else ["failed"]
            lines.append((backend, row.job.label, cells))
        reference = next((r.figures for r in group if r.job.library == "dbos" and r.figures), None)
        if reference is None:
            continue
        for row in group:
            if row.job.library == "dbos_nb" and row.figures is not None:
                ratios = [_ratio(reference[m], row.figures[m]) for m in METRICS]
                lines.append((backend, f"dbos / {row.job.label}", ratios))
    return lines


def _print_table(rows: list[Row], notes: list[str]) -> None:
    lines = _table_lines(rows)
    width = max(len(label) for _, label, _ in lines) if lines else 10
    header = f"{'backend':<9}{'library':<{width + 2}}" + "".join(f"{h:>12}" for h in HEADERS)
    rule = "-" * len(header)
    print()
    print(header)
    print(rule)
    previous = None
    for backend, label, cells in lines:
        if previous is not None and backend != previous:
            print(rule)
        previous = backend
        print(f"{backend:<9}{label:<{width + 2}}" + "".join(f"{c:>12}" for c in cells))
    print(rule)
    print("Times in ms. 'N-step med/p95': latency of a direct call of a workflow with N steps;")
    print("'dbos / X' rows: DBOS Transact's figure divided by X's (above 1: dbos_nb is faster).")
    for row in rows:
        if row.job.library == "dbos_nb" and row.figures is not None:
            step = row.figures["step_ms"]
            verdict = "met" if step < STEP_GOAL_MS else "NOT met"
            print(
                f"Goal < {STEP_GOAL_MS} ms/step, {row.job.backend} {row.job.label}: "
                f"{step:.3f} ms/step, {verdict}."
            )
    for note in notes:
        print(note)
    for row in rows:
        if row.error:
            print(f"\n{row.job.label} on {row.job.backend} failed: {row.error}")


def run_benchmarks(args: argparse.Namespace) -> int:
    settings = Settings.for_mode(args.quick)
    script = str(Path(__file__).resolve())
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    notes = [
        f"Python {platform.python_version()} on {platform.system()} {platform.release()}; "
        f"{settings.steps} steps x {settings.step_reps} reps (median); "
        f"{settings.calls} calls after {settings.warmup_calls} warm-up calls per latency figure.",
    ]

    dbos_python = args.dbos_python or sys.executable
    dbos_ok, dbos_info = probe_dbos(dbos_python)
    if dbos_ok:
        notes.append(f"DBOS Transact {dbos_info} measured with {dbos_python}.")
    else:
        hint = "" if args.dbos_python else "; pass --dbos-python PATH to use another interpreter"
        notes.append(f"DBOS Transact skipped: {dbos_info}{hint}.")

    jobs: list[Job] = []
    for backend in backends:
        if backend == "sqlite":
            if args.nb_sqlite_sync in ("shipped", "both"):
                jobs.append(Job(backend, "dbos_nb sync=NORMAL", "dbos_nb", sys.executable))
            if args.nb_sqlite_sync in ("full", "both"):
                jobs.append(Job(backend, "dbos_nb sync=FULL", "dbos_nb", sys.executable, True))
            if dbos_ok:
                jobs.append(Job(backend, f"dbos {dbos_info}", "dbos", dbos_python))
        else:
            jobs.append(Job(backend, "dbos_nb", "dbos_nb", sys.executable))
            if dbos_ok:
                jobs.append(Job(backend, f"dbos {dbos_info}", "dbos", dbos_python))

    rows: list[Row] = []
    for backend in backends:
        backend_jobs = [j for j in jobs if j.backend == backend]
        if backend == "sqlite":
            with sqlite_dir(args.tmpdir) as directory:
                notes.append(f"SQLite: fresh file per run in {Path(directory).parent}.")
                for i, job in enumerate(backend_jobs):
                    url = f"sqlite:///{directory}/{job.library}_{i}.sqlite"
                    rows.append(_run_job(job, url, settings, script))
            continue
        print("  setting up PostgreSQL ...", file=sys.stderr, flush=True)
        try:
            target = PostgresTarget(args.tmpdir)
        except Exception as exc:
            rows.extend(Row(job, None, f"no PostgreSQL server: {exc!r}") for job in backend_jobs)
            continue
        try:
            notes.append(f"PostgreSQL {target.version}: {target.description}.")
            for job in backend_jobs:
                url = target.create_database(f"bench_{job.library}")
                rows.append(_run_job(job, url, settings, script))
        finally:
            target.close()

    _print_table(rows, notes)
    return 0 if all(r.figures is not None for r in rows) else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 minute)")
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--dbos-python",
        metavar="PYTHON",
        help="interpreter whose environment has DBOS Transact (default: this one, if it can)",
    )
    parser.add_argument(
        "--nb-sqlite-sync",
        choices=["shipped", "full", "both"],
        default="both",
        help="measure dbos_nb on SQLite as shipped (synchronous=NORMAL), with FULL, or both",
    )
    parser.add_argument("--tmpdir", help="where the SQLite files and PostgreSQL data go")
    # Internal: one measurement in a subprocess.
    parser.add_argument("--worker", choices=["dbos_nb", "dbos"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--step-reps", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-calls", type=int, default=30, help=argparse.SUPPRESS)
    parser.add_argument("--sqlite-full", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        settings = Settings(args.steps, args.step_reps, args.calls, args.warmup_calls)
        figures = run_worker(args.worker, args.url, settings, args.sqlite_full)
        print(RESULT_MARKER + json.dumps(figures), flush=True)
        return 0
    return run_benchmarks(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
