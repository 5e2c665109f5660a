"""Queue benchmark: dbos_nb (and, when available, DBOS Transact) on SQLite and PostgreSQL.

Measures, per backend:

1. throughput of one-step workflows through a queue without limits: enqueue them all one by one,
   then wait for all (workflows/s of the whole run, and of the processing part: from the first
   start to the last completion), and the CPU time the process spent per workflow (all its
   threads; the database server's is not counted); the median of a few rounds, each in a new
   process on a fresh database, the libraries taking turns;
2. the same through a queue with `worker_concurrency=8`; and the DBOS tutorial's fan-out: a
   workflow enqueues the same number of one-step workflows on a queue without limits, then
   gathers their results (`handle.get_result()` one by one, each an operation of the parent);
3. enqueue throughput, one `queue.enqueue` at a time (items/s), and dbos_nb's
   `queue.enqueue_many(fn, items, batch_id=...)` of 100,000 items (DBOS has no enqueue_many);
4. enqueue-to-start latency on an idle queue (median and p95, ms): in one process (the step
   records `time.time()` when it starts; compared with the time just before the enqueue), and on
   PostgreSQL across processes (a worker process runs the work, a `DBOSClient` in the benchmark's
   process enqueues; the start time comes back as the workflow's result);
5. rate limiter accuracy and budget use: N tasks through a queue with a limiter; the most starts
   seen in any window of `period` (must be <= limit), and the achieved start rate
   N / (last start - first start + period) divided by the allowed rate limit / period.

Both libraries run with their defaults: DBOS Transact's queue workers poll every second (its
default `polling_interval_sec`), which is what the latency figures compare against. Between
latency samples the benchmark waits a random 0-1 s so that enqueues fall at random points of any
polling cycle. Enqueue rates (3) are measured on a queue whose limiter (1 start per hour) keeps
the worker idle, so they measure the enqueue path, not the competition with running work.

SQLite runs on a fresh temp file; PostgreSQL on a throwaway server started here with its durable
defaults (fsync on), or on the server given by DBOS_NB_BENCH_PG_URL (a dedicated database is
created on it for each run and dropped afterwards). Each library runs in its own subprocess; DBOS
Transact (`dbos`) is measured with `--dbos-python PYTHON` (an interpreter whose environment has
`dbos`; it never is a dependency of this project), or with this interpreter if it can import it.

    python benchmarks/bench_queues.py [--quick] [--backend sqlite|postgres|both]
                                      [--dbos-python /path/to/python]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_common import (
    REPO_ROOT,
    RESULT_MARKER,
    PostgresTarget,
    commit_floor,
    probe_dbos,
    run_measurement,
    sqlite_dir,
)

WAIT_TIMEOUT_SEC = 600.0
XPROC_QUEUE = "bench_xproc"
XPROC_WORKFLOW = "bench_xproc_wf"


@dataclass(frozen=True)
class Settings:
    """How much work one worker does."""

    throughput: int
    throughput_rounds: int
    enqueue: int
    enqueue_many: int
    latency_samples: int
    latency_warmup: int
    latency_gap_sec: float
    rate_limit: int
    rate_period: float
    rate_tasks: int
    # Measurement 1 alone (`--mode round`, bench_ab.py): the queue's worker_concurrency.
    round_worker_concurrency: int | None = None

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                throughput=500,
                throughput_rounds=1,
                enqueue=500,
                enqueue_many=100_000,
                latency_samples=20,
                latency_warmup=2,
                latency_gap_sec=1.0,
                rate_limit=25,
                rate_period=1.0,
                rate_tasks=100,
            )
        return cls(
            throughput=2000,
            throughput_rounds=3,
            enqueue=2000,
            enqueue_many=100_000,
            latency_samples=100,
            latency_warmup=3,
            latency_gap_sec=1.0,
            rate_limit=50,
            rate_period=2.0,
            rate_tasks=200,
        )


# -- worker: runs inside one subprocess, for one library on one database --------------------------


def _percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


class Tracker:
    """Collects the start times that running steps report, and wakes whoever waits for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._starts: list[float] = []
        self._done = 0
        self._last_done = 0.0

    def reset(self) -> None:
        with self._cond:
            self._starts = []
            self._done = 0
            self._last_done = 0.0

    def started(self, at: float) -> None:
        with self._cond:
            self._starts.append(at)
            self._cond.notify_all()

    def finished(self) -> None:
        with self._cond:
            self._done += 1
            self._last_done = time.time()
            self._cond.notify_all()

    def wait(self, starts: int = 0, done: int = 0, timeout: float = WAIT_TIMEOUT_SEC) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len(self._starts) >= starts and self._done >= done, timeout
            )
        if not ok:
            raise RuntimeError(
                f"timed out after {timeout} s waiting for {starts} starts / {done} completions "
                f"(saw {len(self._starts)} / {self._done})"
            )

    @property
    def starts(self) -> list[float]:
        with self._cond:
            return list(self._starts)

    @property
    def last_done(self) -> float:
        with self._cond:
            return self._last_done


TRACKER = Tracker()


def _import_library(library: str) -> tuple[Any, str]:
    from importlib import metadata

    if library == "dbos_nb":
        # Last: a package put first on PYTHONPATH (bench_ab's other revision) must win. First,
        # this checkout shadowed it, and bench_ab compared the checkout with itself.
        sys.path.append(str(REPO_ROOT))
    module = importlib.import_module(library)
    try:
        version = metadata.version(library)
    except metadata.PackageNotFoundError:
        version = str(getattr(module, "__version__", "?"))
    return module, version


def _create_dbos(dbos: Any, name: str, url: str) -> None:
    dbos(
        config={
            "name": name,
            "system_database_url": url,
            "run_admin_server": False,
            "log_level": "WARNING",
        }
    )


def _throughput(queue: Any, workflow: Callable[[int], float], n: int) -> dict[str, float]:
    """Enqueue n one-step workflows one by one, then wait until all have finished."""
    TRACKER.reset()
    start = time.time()
    cpu_start = time.process_time()
    handles = [queue.enqueue(workflow, i) for i in range(n)]
    enqueued = time.time()
    TRACKER.wait(done=n)
    cpu = time.process_time() - cpu_start
    end = TRACKER.last_done
    first_start = min(TRACKER.starts)
    for handle in handles[-10:]:  # the results really are stored
        handle.get_result(polling_interval_sec=0.05)
    return {
        "total": n / (end - start),
        "processing": n / (end - first_start),
        "enqueue_phase": n / (enqueued - start),
        # All the threads of the process, per workflow (the database server's CPU not included).
        "cpu_us": cpu / n * 1e6,
    }


def _fan_out(dbos: Any, fan_out: Callable[[int], list[float]], n: int) -> dict[str, float]:
    """The tutorial's `process_tasks`: one workflow enqueues n one-step workflows, then waits
    for each result; workflows/s of the whole (from the start of the parent to its result) and
    of the parent's enqueue loop."""
    TRACKER.reset()
    start = time.time()
    loop_start, loop_end = dbos.start_workflow(fan_out, n).get_result()
    end = time.time()
    if len(TRACKER.starts) != n:
        raise RuntimeError(f"the fan-out ran {len(TRACKER.starts)} of {n} workflows")
    return {"total": n / (end - start), "enqueue_phase": n / (loop_end - loop_start)}


def _latency_in_process(
    queue: Any, workflow: Callable[[int], float], settings: Settings
) -> dict[str, float]:
    """Enqueue on an idle queue, one at a time; the step's start time minus the enqueue time."""
    rng = random.Random(1)
    samples: list[float] = []
    for i in range(settings.latency_warmup + settings.latency_samples):
        time.sleep(rng.uniform(0, settings.latency_gap_sec))
        TRACKER.reset()
        t0 = time.time()
        handle = queue.enqueue(workflow, i)
        TRACKER.wait(starts=1)
        started = TRACKER.starts[0]
        handle.get_result(polling_interval_sec=0.01)
        if i >= settings.latency_warmup:
            samples.append((started - t0) * 1000)
    return {"median": statistics.median(samples), "p95": _percentile(samples, 95)}


def _rate_limit(queue: Any, workflow: Callable[[int], float], settings: Settings) -> dict[str, Any]:
    """Push rate_tasks through a rate-limited queue; check the window and the budget use."""
    n, limit, period = settings.rate_tasks, settings.rate_limit, settings.rate_period
    TRACKER.reset()
    for i in range(n):
        queue.enqueue(workflow, i)
    TRACKER.wait(done=n)
    starts = sorted(TRACKER.starts)
    max_in_window = max(sum(1 for t in starts[i:] if t < s + period) for i, s in enumerate(starts))
    achieved = n / (starts[-1] - starts[0] + period)
    return {
        "max_in_window": max_in_window,
        "budget_use": achieved / (limit / period),
        "span": starts[-1] - starts[0],
    }


# The queue that the fan-out workflow enqueues on: queues are declared after the launch
# (DBOS 3.4 requires it), workflows before.
FAN_OUT_QUEUE: dict[str, Any] = {}


def _workflows(
    dbos: Any,
) -> tuple[Callable[[int], float], Callable[[int], int], Callable[[int], list[float]]]:
    """The benchmark's workflows: one step that reports its start, one without steps, and
    the fan-out of one-step workflows. Registered by calling the decorators: the library is
    only known at run time (Any)."""

    def stamp_body(_i: int) -> float:
        now = time.time()
        TRACKER.started(now)
        return now

    stamp: Callable[[int], float] = dbos.step(name="bench_stamp")(stamp_body)

    def one_step_body(i: int) -> float:
        started = stamp(i)
        TRACKER.finished()
        return started

    def park_body(i: int) -> int:
        return i

    one_step: Callable[[int], float] = dbos.workflow(name="bench_one_step")(one_step_body)
    park: Callable[[int], int] = dbos.workflow(name="bench_park")(park_body)

    def fan_out_body(n: int) -> list[float]:
        queue = FAN_OUT_QUEUE["queue"]
        loop_start = time.time()
        handles = [queue.enqueue(one_step, i) for i in range(n)]
        loop_end = time.time()
        for handle in handles:
            handle.get_result()
        return [loop_start, loop_end]

    fan_out: Callable[[int], list[float]] = dbos.workflow(name="bench_fan_out")(fan_out_body)
    return one_step, park, fan_out


def run_round(library: str, url: str, settings: Settings) -> dict[str, Any]:
    """One round of measurement 1 (no limits, or `round_worker_concurrency`), on a fresh
    database, in this process."""
    module, _version = _import_library(library)
    dbos: Any = module.DBOS
    _create_dbos(dbos, "bench_queues", url)
    one_step, _park, _fan_out_wf = _workflows(dbos)
    dbos.launch()
    try:
        unlimited = dbos.register_queue(
            "bench_unlimited", worker_concurrency=settings.round_worker_concurrency
        )
        _throughput(unlimited, one_step, 50)  # warm-up
        measured = _throughput(unlimited, one_step, settings.throughput)
    finally:
        dbos.destroy()
    figures: dict[str, Any] = {f"tp_{key}": value for key, value in measured.items()}
    figures["package"] = str(Path(module.__file__ or "").resolve().parent)
    return figures


def run_worker(library: str, url: str, settings: Settings) -> dict[str, Any]:
    """Measurements 2-5 of one library on one system database, in this process; returns the
    figures (measurement 1 runs in rounds of its own, see `run_round`)."""
    module, version = _import_library(library)
    dbos: Any = module.DBOS
    _create_dbos(dbos, "bench_queues", url)
    one_step, park, fan_out = _workflows(dbos)
    dbos.launch()
    figures: dict[str, Any] = {"library": library, "version": version}
    try:
        wc8 = dbos.register_queue("bench_wc8", worker_concurrency=8)
        idle = dbos.register_queue("bench_idle")
        rated = dbos.register_queue(
            "bench_rate", limiter={"limit": settings.rate_limit, "period": settings.rate_period}
        )
        parked = dbos.register_queue("bench_parked", limiter={"limit": 1, "period": 3600})
        _throughput(idle, one_step, 50)  # warm-up (on a queue without limits: DBOS runs 8/s on wc8)
        for key, value in _throughput(wc8, one_step, settings.throughput).items():
            figures[f"wc8_{key}"] = value
        FAN_OUT_QUEUE["queue"] = idle
        _fan_out(dbos, fan_out, 50)  # warm-up
        for key, value in _fan_out(dbos, fan_out, settings.throughput).items():
            figures[f"fan_{key}"] = value
        for key, value in _latency_in_process(idle, one_step, settings).items():
            figures[f"lat_{key}"] = value
        for key, value in _rate_limit(rated, one_step, settings).items():
            figures[f"rate_{key}"] = value

        start = time.perf_counter()
        for i in range(settings.enqueue):
            parked.enqueue(park, i)
        figures["enqueue_one"] = settings.enqueue / (time.perf_counter() - start)
        if hasattr(parked, "enqueue_many"):
            items = list(range(settings.enqueue_many))
            start = time.perf_counter()
            handles = parked.enqueue_many(park, items, batch_id=f"bench-{uuid.uuid4().hex}")
            figures["enqueue_many"] = settings.enqueue_many / (time.perf_counter() - start)
            if len(handles) != settings.enqueue_many:
                raise RuntimeError(f"enqueue_many returned {len(handles)} handles")
    finally:
        dbos.destroy()
    return figures


# -- across processes: a serving worker process and a DBOSClient --------------------------------


def run_server(library: str, url: str, workdir: Path) -> None:
    """The worker process of the cross-process latency test: runs the queue until told to stop."""
    module, _version = _import_library(library)
    dbos: Any = module.DBOS
    _create_dbos(dbos, "bench_queues_server", url)

    def stamp_body(_i: int) -> float:
        return time.time()

    stamp: Callable[[int], float] = dbos.step(name="bench_xproc_stamp")(stamp_body)

    def workflow_body(i: int) -> float:
        return stamp(i)

    dbos.workflow(name=XPROC_WORKFLOW)(workflow_body)
    dbos.launch()
    try:
        dbos.register_queue(XPROC_QUEUE)
        (workdir / "ready").write_text(str(os.getpid()))
        while not (workdir / "stop").exists():
            time.sleep(0.05)
    finally:
        dbos.destroy()


def run_client(library: str, url: str, settings: Settings) -> dict[str, Any]:
    """Start a worker process, enqueue from a DBOSClient here, and time enqueue-to-start."""
    module, version = _import_library(library)
    workdir = Path(tempfile.mkdtemp(prefix="dbos_nb_bench_xproc_"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", library, "--url", url]
    cmd += ["--workdir", str(workdir)]
    log = (workdir / "server.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "ready").exists():
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (workdir / "server.log").read_text().strip().splitlines()[-10:]
                raise RuntimeError("worker process did not start:\n" + "\n".join(tail))
            time.sleep(0.02)
        client: Any = module.DBOSClient(system_database_url=url)
        try:
            rng = random.Random(2)
            samples: list[float] = []
            options = {"queue_name": XPROC_QUEUE, "workflow_name": XPROC_WORKFLOW}
            for i in range(settings.latency_warmup + settings.latency_samples):
                time.sleep(rng.uniform(0, settings.latency_gap_sec))
                t0 = time.time()
                handle = client.enqueue(options, i)
                started = float(handle.get_result(polling_interval_sec=0.01))
                if i >= settings.latency_warmup:
                    samples.append((started - t0) * 1000)
            # Then a client's loop of enqueues, served by the worker process.
            start = time.perf_counter()
            handles = [client.enqueue(options, i) for i in range(settings.enqueue)]
            enqueued = time.perf_counter()
            for handle in handles[::-1]:  # the last ones first: most are done by then
                handle.get_result(polling_interval_sec=0.05)
            end = time.perf_counter()
        finally:
            client.destroy()
    finally:
        (workdir / "stop").touch()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "library": library,
        "version": version,
        "xlat_median": statistics.median(samples),
        "xlat_p95": _percentile(samples, 95),
        "xenq_one": settings.enqueue / (enqueued - start),
        "xtp_total": settings.enqueue / (end - start),
    }


# -- orchestration: databases, subprocesses, the table ------------------------------------------


@dataclass(frozen=True)
class Job:
    """One measurement subprocess: a library on a backend, in one mode, run by an interpreter."""

    backend: str
    library: str
    python: str
    # "round": one round of measurement 1; "local": measurements 2-5 in one process;
    # "xproc": the cross-process latency (client here, worker process)
    mode: str


def _run_job(job: Job, url: str, settings: Settings) -> tuple[dict[str, Any] | None, str | None]:
    """Run one measurement subprocess; (figures, None) or (None, error)."""
    cmd = [job.python, str(Path(__file__).resolve()), "--worker", job.library, "--url", url]
    cmd += ["--mode", job.mode, "--settings", json.dumps(asdict(settings))]
    print(f"  running {job.library} {job.mode} on {job.backend} ...", file=sys.stderr, flush=True)
    return run_measurement(cmd)


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 0


METRICS = (
    Metric("tp_total", "1 no limits: whole run", "wf/s", True),
    Metric("tp_processing", "1 no limits: processing", "wf/s", True),
    Metric("tp_enqueue_phase", "1 no limits: enqueue phase", "wf/s", True),
    Metric("tp_cpu_us", "1 no limits: CPU per workflow", "us/wf", False),
    Metric("wc8_total", "2 worker_conc=8: whole run", "wf/s", True),
    Metric("wc8_processing", "2 worker_conc=8: processing", "wf/s", True),
    Metric("fan_total", "2 fan-out in a workflow: whole", "wf/s", True),
    Metric("fan_enqueue_phase", "2 fan-out: parent's enqueue loop", "wf/s", True),
    Metric("enqueue_one", "3 enqueue one by one", "items/s", True),
    Metric("enqueue_many", "3 enqueue_many", "items/s", True),
    Metric("xenq_one", "3 client enqueue one by one", "items/s", True),
    Metric("xtp_total", "3 client enqueue: until all done", "wf/s", True),
    Metric("lat_median", "4 latency 1 process: median", "ms", False, 1),
    Metric("lat_p95", "4 latency 1 process: p95", "ms", False, 1),
    Metric("xlat_median", "4 latency 2 processes: median", "ms", False, 1),
    Metric("xlat_p95", "4 latency 2 processes: p95", "ms", False, 1),
    Metric("rate_max_in_window", "5 limiter: max starts/window", "starts", False),
    Metric("rate_budget_use", "5 limiter: achieved/allowed", "ratio", True, 2),
)


# What the cross-process job measures (on PostgreSQL only).
XPROC_KEYS = {"xenq_one", "xtp_total", "xlat_median", "xlat_p95"}

# The goals that are ratios to DBOS Transact measured in the same run, on both backends.
RATIO_GOALS = {"tp_total": 10.0, "wc8_total": 100.0}


def _goal(key: str, backend: str, settings: Settings) -> str:
    goals = {
        ("enqueue_many", "sqlite"): "> 100,000",
        ("lat_median", "sqlite"): "< 5",
        ("lat_median", "postgres"): "< 5",
        ("xlat_median", "postgres"): "< 20",
        ("rate_max_in_window", "sqlite"): f"<= {settings.rate_limit}",
        ("rate_max_in_window", "postgres"): f"<= {settings.rate_limit}",
        ("rate_budget_use", "sqlite"): "~ 1",
        ("rate_budget_use", "postgres"): "~ 1",
    }
    if key in RATIO_GOALS:
        return f">= {RATIO_GOALS[key]:g}x dbos"
    return goals.get((key, backend), "")


def _cell(figures: dict[str, Any] | None, metric: Metric) -> str:
    if figures is None:
        return "failed"
    value = figures.get(metric.key)
    if value is None:
        return "n/a"
    return f"{value:,.{metric.digits}f}"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> str:
    x = a.get(key) if a else None
    y = b.get(key) if b else None
    if x is None or y is None or y == 0:
        return "-"
    return f"{x / y:.2f}x"


def _print_table(
    results: dict[tuple[str, str], dict[str, Any] | None],
    backends: list[str],
    with_dbos: bool,
    settings: Settings,
) -> None:
    columns = ["dbos_nb", "dbos", "nb/dbos"] if with_dbos else ["dbos_nb"]
    width = max(len(m.label) for m in METRICS) + 2
    header = f"{'metric':<{width}}{'unit':<9}{'better':<8}"
    for backend in backends:
        header += f"| {backend + ' goal':<17}" + "".join(f"{c:>11}" for c in columns) + " "
    rule = "-" * len(header)
    print()
    print(header)
    print(rule)
    for metric in METRICS:
        better = "higher" if metric.higher_is_better else "lower"
        line = f"{metric.label:<{width}}{metric.unit:<9}{better:<8}"
        for backend in backends:
            nb = results.get((backend, "dbos_nb"))
            cells = [_cell(nb, metric)]
            if with_dbos:
                ref = results.get((backend, "dbos"))
                cells += [_cell(ref, metric), _ratio(nb, ref, metric.key)]
            if metric.key in XPROC_KEYS and backend != "postgres":
                cells = ["-"] * len(cells)
            line += f"| {_goal(metric.key, backend, settings):<17}"
            line += "".join(f"{c:>11}" for c in cells) + " "
        print(line)
    print(rule)


def _verdicts(
    results: dict[tuple[str, str], dict[str, Any] | None], settings: Settings
) -> list[str]:
    checks: list[tuple[str, str, Callable[[float], bool]]] = [
        ("enqueue_many", "sqlite", lambda v: v > 100_000),
        ("lat_median", "sqlite", lambda v: v < 5),
        ("lat_median", "postgres", lambda v: v < 5),
        ("xlat_median", "postgres", lambda v: v < 20),
        ("rate_max_in_window", "sqlite", lambda v: v <= settings.rate_limit),
        ("rate_max_in_window", "postgres", lambda v: v <= settings.rate_limit),
    ]
    lines = []
    for key, backend, ok in checks:
        figures = results.get((backend, "dbos_nb"))
        if figures is None or figures.get(key) is None:
            continue
        value = float(figures[key])
        metric = next(m for m in METRICS if m.key == key)
        verdict = "met" if ok(value) else "NOT met"
        lines.append(
            f"Goal {_goal(key, backend, settings)} {metric.unit} for '{metric.label}' on "
            f"{backend}: {value:,.{metric.digits}f}, {verdict}."
        )
    for key, goal in RATIO_GOALS.items():
        for backend in ("sqlite", "postgres"):
            nb, ref = results.get((backend, "dbos_nb")), results.get((backend, "dbos"))
            if not nb or not ref or not nb.get(key) or not ref.get(key):
                continue
            ratio = nb[key] / ref[key]
            metric = next(m for m in METRICS if m.key == key)
            verdict = "met" if ratio >= goal else "NOT met"
            lines.append(
                f"Goal >= {goal:g}x DBOS for '{metric.label}' on {backend}: {ratio:.2f}x, "
                f"{verdict}."
            )
    return lines


def _rounds(results: dict[tuple[str, str], dict[str, Any] | None]) -> list[str]:
    """Each round of measurement 1 (whole run, wf/s), of which the table shows the median."""
    lines = []
    for (backend, library), figures in sorted(results.items()):
        if figures and figures.get("tp_rounds"):
            rounds = ", ".join(f"{r:,}" for r in figures["tp_rounds"])
            lines.append(f"1 no limits, whole run of each round on {backend}, {library}: {rounds}.")
    return lines


def _floor_note(floor: float, figures: dict[str, Any] | None) -> str:
    """What the server allows one enqueue at a time (see `commit_floor`), and how close to it
    measurement 1 of dbos_nb came."""
    note = (
        f"PostgreSQL floor for one-by-one enqueues: one INSERT + commit at a time from psycopg, "
        f"nothing else running: {floor:,.0f}/s ({1000 / floor:.2f} ms each)"
    )
    if figures and figures.get("tp_total"):
        share = figures["tp_total"] / floor
        note += f"; dbos_nb's measurement 1 (whole run) reached {share:.0%} of it"
    return note + "."


def run_benchmarks(args: argparse.Namespace) -> int:
    settings = Settings.for_mode(args.quick)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    dbos_python = args.dbos_python or sys.executable
    dbos_ok, dbos_info = probe_dbos(dbos_python)
    notes = [
        f"Python {platform.python_version()} on {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs.",
        f"1-2: {settings.throughput} one-step workflows enqueued one by one, then awaited; "
        "'processing' counts from the first start to the last completion. 1: "
        + (
            f"the median of {settings.throughput_rounds} rounds, each in a new process on a "
            "fresh database, the libraries taking turns (each round's whole run below the table)."
            if settings.throughput_rounds > 1
            else "one round, in a new process on a fresh database."
        ),
        f"2 fan-out: a workflow enqueues {settings.throughput} one-step workflows on a queue "
        "without limits, then waits for each result (the DBOS tutorial's process_tasks).",
        f"3: {settings.enqueue} single enqueues and one enqueue_many of {settings.enqueue_many:,} "
        "items, on a queue kept idle by its limiter (1 start per hour); client: "
        f"{settings.enqueue} enqueues from a DBOSClient to a queue without limits that the "
        "worker process of 4 serves (PostgreSQL only).",
        f"4: {settings.latency_samples} samples after {settings.latency_warmup} warm-ups, a "
        f"random 0-{settings.latency_gap_sec:g} s pause before each; across processes: "
        "DBOSClient here, worker in another process (PostgreSQL only).",
        f"5: {settings.rate_tasks} tasks, limiter {{'limit': {settings.rate_limit}, 'period': "
        f"{settings.rate_period:g}}}; achieved/allowed = N / (last start - first start + period) "
        "/ (limit / period).",
        "Both libraries with their defaults: DBOS polls each queue every 1 s "
        "(polling_interval_sec=1.0); dbos_nb starts work on a queue without limits at the "
        "enqueue, wakes its worker on other enqueues (LISTEN/NOTIFY across processes on "
        "PostgreSQL). SQLite: dbos_nb uses WAL + synchronous=NORMAL, DBOS SQLite's defaults.",
        "'nb/dbos' = dbos_nb's figure / DBOS's; whether higher is better is in column 'better'.",
    ]
    if dbos_ok:
        notes.append(f"DBOS Transact {dbos_info} measured with {dbos_python}.")
    else:
        hint = "" if args.dbos_python else "; pass --dbos-python PATH to use another interpreter"
        notes.append(f"DBOS Transact skipped: {dbos_info}{hint}.")
    libraries = [("dbos_nb", sys.executable)] + ([("dbos", dbos_python)] if dbos_ok else [])

    results: dict[tuple[str, str], dict[str, Any] | None] = {}
    errors: list[str] = []

    def record(job: Job, url: str) -> None:
        figures, error = _run_job(job, url, settings)
        key = (job.backend, job.library)
        if error is not None:
            errors.append(f"{job.library} {job.mode} on {job.backend} failed: {error}")
            if job.mode == "local":
                results[key] = None
            return
        if job.mode == "local":
            results[key] = figures
        elif results.get(key) is not None and figures is not None:
            results[key] = {**(results[key] or {}), **figures}

    def rounds(backend: str, fresh_url: Callable[[str, int], str]) -> None:
        """Measurement 1: the libraries take turns, a round each in its own process on a fresh
        database (the order reversed every other round), so that the machine's drift over the
        minutes of a run weighs on both alike; each keeps the median of its rounds."""
        measured: dict[str, list[dict[str, Any]]] = {library: [] for library, _ in libraries}
        for turn in range(settings.throughput_rounds):
            for library, python in libraries if turn % 2 == 0 else libraries[::-1]:
                job = Job(backend, library, python, "round")
                figures, error = _run_job(job, fresh_url(library, turn), settings)
                if error is not None or figures is None:
                    errors.append(f"{library} round {turn + 1} on {backend} failed: {error}")
                    continue
                measured[library].append(figures)
        for library, done in measured.items():
            figures = results.get((backend, library))
            if figures is None or len(done) != settings.throughput_rounds:
                continue  # a failed round leaves the measurement out, not a median of the rest
            for key, value in done[0].items():
                if isinstance(value, int | float):  # not the package's path
                    figures[key] = statistics.median(r[key] for r in done)
            figures["tp_rounds"] = [round(r["tp_total"]) for r in done]

    for backend in backends:
        if backend == "sqlite":
            with sqlite_dir(args.tmpdir) as directory:
                notes.append(f"SQLite: fresh file per run in {Path(directory).parent}.")
                for library, python in libraries:
                    url = f"sqlite:///{directory}/{library}.sqlite"
                    record(Job(backend, library, python, "local"), url)

                def fresh_file(library: str, turn: int, folder: str = directory) -> str:
                    return f"sqlite:///{folder}/{library}-{turn}.sqlite"

                rounds(backend, fresh_file)
            continue
        print("  setting up PostgreSQL ...", file=sys.stderr, flush=True)
        try:
            target = PostgresTarget(args.tmpdir)
        except Exception as exc:
            errors.append(f"no PostgreSQL server: {exc!r}")
            for library, _python in libraries:
                results[(backend, library)] = None
            continue
        try:
            notes.append(f"PostgreSQL {target.version}: {target.description}.")
            for library, python in libraries:
                for mode in ("local", "xproc"):
                    url = target.create_database(f"benchq_{library}")
                    record(Job(backend, library, python, mode), url)

            def fresh_database(library: str, turn: int, on: PostgresTarget = target) -> str:
                return on.create_database(f"benchq_{library}_{turn}")

            floor = commit_floor(target.create_database("benchq_floor"), settings.throughput)
            rounds(backend, fresh_database)
            notes.append(_floor_note(floor, results.get((backend, "dbos_nb"))))
        finally:
            target.close()

    _print_table(results, backends, dbos_ok, settings)
    for line in _verdicts(results, settings) + _rounds(results) + notes:
        print(line)
    for error in errors:
        print(f"\n{error}")
    return 1 if errors else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="less work (about a minute)")
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--dbos-python",
        metavar="PYTHON",
        help="interpreter whose environment has DBOS Transact (default: this one, if it can)",
    )
    parser.add_argument("--tmpdir", help="where the SQLite files and PostgreSQL data go")
    # Internal: one measurement in a subprocess, or the worker process of the cross-process test.
    parser.add_argument("--worker", choices=["dbos_nb", "dbos"], help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=["dbos_nb", "dbos"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["round", "local", "xproc"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.serve:
        run_server(args.serve, args.url, Path(args.workdir))
        return 0
    if args.worker:
        settings = Settings(**json.loads(args.settings))
        if args.mode == "xproc":
            figures = run_client(args.worker, args.url, settings)
        elif args.mode == "round":
            figures = run_round(args.worker, args.url, settings)
        else:
            figures = run_worker(args.worker, args.url, settings)
        print(RESULT_MARKER + json.dumps(figures), flush=True)
        return 0
    return run_benchmarks(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
