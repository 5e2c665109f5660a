"""A worker process for the multi-process queue tests.

    python queue_worker_app.py URL EXECUTOR_ID WORKDIR QUEUE_JSON TASK_SLEEP

It declares the queue (settings from QUEUE_JSON), launches DBOS (which claims and runs queued work
on background threads), writes WORKDIR/ready-EXECUTOR_ID, and runs until WORKDIR/stop exists.

Every step appends "step task start end executor" to WORKDIR/events-EXECUTOR_ID.log when it ends,
with wall-clock times, so the test can check limits as measured where the work really runs.
"""

from __future__ import annotations

import json
import os
import sys
import time

from dbos_nb import DBOS, Queue

URL, EXECUTOR, WORKDIR, QUEUE_JSON, TASK_SLEEP = sys.argv[1:6]
SLEEP = float(TASK_SLEEP)
EVENTS = os.path.join(WORKDIR, f"events-{EXECUTOR}.log")


def record(step: str, task: int, start: float) -> None:
    with open(EVENTS, "a") as f:
        f.write(f"{step} {task} {start:.6f} {time.time():.6f} {EXECUTOR}\n")
        f.flush()


@DBOS.step(name="first_half")
def first_half(task: int) -> int:
    start = time.time()
    time.sleep(SLEEP / 2)
    record("first", task, start)
    return task


@DBOS.step(name="second_half")
def second_half(task: int) -> int:
    start = time.time()
    time.sleep(SLEEP / 2)
    record("second", task, start)
    return task * 2


@DBOS.workflow(name="two_step_task")
def two_step_task(task: int) -> int:
    first_half(task)
    return second_half(task)


@DBOS.step(name="one_step_task")
def one_step_task(task: int) -> int:
    start = time.time()
    time.sleep(SLEEP)
    record("only", task, start)
    return task


def main() -> None:
    settings = json.loads(QUEUE_JSON)
    name = settings.pop("name")
    DBOS(
        config={
            "name": "mp",
            "system_database_url": URL,
            "executor_id": EXECUTOR,
            "polling_interval_sec": 0.05,
            "heartbeat_interval_sec": 0.5,
        }
    )
    Queue(name, **settings)
    DBOS.launch()
    with open(os.path.join(WORKDIR, f"ready-{EXECUTOR}"), "w") as f:
        f.write(str(os.getpid()))
    stop = os.path.join(WORKDIR, "stop")
    while not os.path.exists(stop):
        time.sleep(0.05)
    DBOS.destroy(workflow_completion_timeout_sec=5)


if __name__ == "__main__":
    main()
