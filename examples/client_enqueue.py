"""Enqueue with DBOSClient: enqueue a workflow from code that is not part of the DBOS application.

    python examples/client_enqueue.py          # the application and the client in one process
    python examples/client_enqueue.py app 30   # only the application, for 30 s (Ctrl-C stops it)
    python examples/client_enqueue.py client 7 # only the client: enqueue task 7, print its result

`enqueue_from_outside` is the tutorial's snippet ("Queues & Parallelism", "Enqueue with
DBOSClient") with only the import changed to `dbos_nb`. The client needs no application code: it
names the queue and the workflow, and the application (any process using the same database) runs
it. The database is the SQLite file or PostgreSQL URL in DBOS_DATABASE_URL (default: a SQLite file
in the temp directory); the client reads it from there, as in the tutorial.
"""

import contextlib
import os
import sys
import tempfile
import time

from dbos_nb import DBOS, DBOSClient, EnqueueOptions, Queue

os.environ.setdefault(
    "DBOS_DATABASE_URL",
    f"sqlite:///{os.path.join(tempfile.gettempdir(), 'dbos_nb_client_enqueue.sqlite')}",
)

# --- the application --------------------------------------------------------------------------
# The tutorial's snippet swaps the two names: its queue is called "process_task" and its workflow
# "example_queue". To keep the snippet exactly as written, this application declares a queue and a
# workflow with those names. With names that no process using the database has declared, dbos_nb's
# client.enqueue raises UnknownQueueError or UnknownWorkflowNameError at once, where DBOS would
# silently enqueue work that nobody ever runs.
queue = Queue("process_task")


@DBOS.workflow(name="example_queue")
def process_task(task):
    return f"task {task} done by the application (workflow {DBOS.workflow_id})"


# --- the client: code outside the application -------------------------------------------------
def enqueue_from_outside(task):
    # --- tutorial -----------------------------------------------------------------------------
    client = DBOSClient(os.environ["DBOS_DATABASE_URL"])

    options: EnqueueOptions = {
        "queue_name": "process_task",
        "workflow_name": "example_queue",
    }
    handle = client.enqueue(options, task)
    result = handle.get_result()
    # --- end of tutorial ----------------------------------------------------------------------
    client.destroy()
    return result


def launch_application() -> None:
    config = {
        "name": "client_enqueue",
        "system_database_url": os.environ["DBOS_DATABASE_URL"],
        # How often the worker looks for work that other processes enqueued in a SQLite file
        # (default 1 s); on PostgreSQL they notify it at once.
        "polling_interval_sec": 0.1,
    }
    DBOS(config=config)
    DBOS.launch()


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "both"
    if mode == "app":  # the application alone: its worker runs what clients enqueue
        launch_application()
        print("application ready", flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops it early
            time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 30.0)
        DBOS.destroy()
    elif mode == "client":  # the client alone: an application must be running somewhere
        print(enqueue_from_outside(int(sys.argv[2]) if len(sys.argv) > 2 else 7))
    else:
        launch_application()
        print(enqueue_from_outside(7))
        DBOS.destroy()
