"""A small application run as a child process by the crash tests.

    python crash_app.py MODE WORKFLOW SYSTEM_URL WORKDIR

MODE "crash": start the workflow and block inside the step that follows the checkpoint we want to
survive (writing WORKDIR/ready first), so the test can SIGKILL the process there.
MODE "recover": launch (which recovers this executor's unfinished work), wait for the workflow's
result and print it.

Every step records its side effect in WORKDIR/effects.log (outside the database), so the test can
count how many times each step really ran.
"""

from __future__ import annotations

import json
import os
import sys
import time

from sqlalchemy import create_engine, text

from dbos_nb import DBOS, SetWorkflowID
from dbos_nb.storage.database import normalize_url

MODE, WORKFLOW, URL, WORKDIR = sys.argv[1:5]
EFFECTS = os.path.join(WORKDIR, "effects.log")


def effect(line: str) -> None:
    with open(EFFECTS, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def block_here_if_crashing() -> None:
    if MODE == "crash":
        with open(os.path.join(WORKDIR, "ready"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)


@DBOS.step()
def numbered_step(i: int) -> int:
    if i == 4:
        # Step 3's checkpoint is committed before step 4 starts: the crash happens right after it.
        block_here_if_crashing()
    effect(f"step{i}")
    return i * 10


@DBOS.workflow()
def five_steps() -> list[int]:
    return [numbered_step(i) for i in range(1, 6)]


@DBOS.transaction()
def add_ledger_row(amount: int) -> int:
    DBOS.sql_session.execute(text("INSERT INTO ledger (amount) VALUES (:a)"), {"a": amount})
    effect("txn")
    return int(DBOS.sql_session.execute(text("SELECT COUNT(*) FROM ledger")).scalar_one())


@DBOS.step()
def after_transaction() -> str:
    block_here_if_crashing()
    effect("after")
    return "after"


@DBOS.workflow()
def transaction_then_step() -> list[object]:
    count = add_ledger_row(7)
    return [count, after_transaction()]


def main() -> None:
    DBOS(
        config={
            "name": "crash_app",
            "system_database_url": URL,
            "executor_id": "crash-exec",
            "polling_interval_sec": 0.05,
        }
    )
    DBOS.launch()
    engine = create_engine(normalize_url(URL))
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS ledger (amount INTEGER NOT NULL)"))
    engine.dispose()
    workflow = {"five_steps": five_steps, "transaction": transaction_then_step}[WORKFLOW]
    if MODE == "crash":
        with SetWorkflowID(f"crash-{WORKFLOW}"):
            workflow()
    else:
        result = DBOS.retrieve_workflow(f"crash-{WORKFLOW}").get_result(timeout_sec=60)
        print(json.dumps(result))
    DBOS.destroy()


if __name__ == "__main__":
    main()
