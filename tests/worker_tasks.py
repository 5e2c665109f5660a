"""Functions imported by `dbos-nb worker --import worker_tasks` in the worker tests.

Steps append "step task start end executor" to the file in WORKER_TASKS_LOG when they end.
"""

from __future__ import annotations

import os
import time

from dbos_nb import DBOS

SLEEP = float(os.environ.get("WORKER_TASKS_SLEEP", "0.02"))


def _record(step: str, task: int, start: float) -> None:
    with open(os.environ["WORKER_TASKS_LOG"], "a") as f:
        f.write(f"{step} {task} {start:.6f} {time.time():.6f} {DBOS.executor_id}\n")


@DBOS.step(name="wt_work")
def wt_work(task: int) -> int:
    start = time.time()
    time.sleep(SLEEP)
    _record("only", task, start)
    return task


@DBOS.step(name="wt_first")
def wt_first(task: int) -> int:
    start = time.time()
    time.sleep(SLEEP / 2)
    _record("first", task, start)
    return task


@DBOS.step(name="wt_second")
def wt_second(task: int) -> int:
    start = time.time()
    time.sleep(SLEEP / 2)
    _record("second", task, start)
    return task * 2


@DBOS.workflow(name="wt_two_steps")
def wt_two_steps(task: int) -> int:
    wt_first(task)
    return wt_second(task)


@DBOS.step(name="wt_tokens")
def wt_tokens(task: int) -> int:
    """Uses (and reports) WORKER_TASKS_TOKENS tokens."""
    start = time.time()
    DBOS.report_usage(tokens=int(os.environ.get("WORKER_TASKS_TOKENS", "25")))
    time.sleep(SLEEP)
    _record("tokens", task, start)
    return task
