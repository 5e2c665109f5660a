"""Queue Example: a workflow enqueues tasks so that they run concurrently, then gathers them.

    python examples/queue_example.py [NUMBER_OF_TASKS]

The code between the `tutorial` markers is the DBOS queue tutorial's ("Queues & Parallelism",
"Queue Example", with the intro's single enqueue in `main`) with only the import changed to
`dbos_nb`. The tutorial's placeholder `...` is kept; the line after it stands in for real work so
that the run has results to show. The database is the SQLite file or PostgreSQL URL in
DBOS_DATABASE_URL (default: a SQLite file in the temp directory).
"""

import os
import sys
import tempfile
import threading
import time

# --- tutorial ---------------------------------------------------------------------------------
from dbos_nb import DBOS, Queue

queue = Queue("example_queue")


@DBOS.step()
def process_task(task):
    ...
    return work(task)  # stand-in work (not in the tutorial)


@DBOS.workflow()
def process_tasks(tasks):
    task_handles = []
    # Enqueue each task so all tasks are processed concurrently.
    for task in tasks:
        handle = queue.enqueue(process_task, task)
        task_handles.append(handle)
    # Wait for each task to complete and retrieve its result.
    # Return the results of all tasks.
    return [handle.get_result() for handle in task_handles]


# --- end of tutorial --------------------------------------------------------------------------

_lock = threading.Lock()
_running = 0
max_running = 0  # the most tasks seen running at the same time in this process


def work(task):
    global _running, max_running
    with _lock:
        _running += 1
        max_running = max(max_running, _running)
    time.sleep(0.1)  # a slow call: a model, a web page, an API
    with _lock:
        _running -= 1
    return f"task {task} done"


DATABASE_URL = os.environ.get("DBOS_DATABASE_URL") or (
    f"sqlite:///{os.path.join(tempfile.gettempdir(), 'dbos_nb_queue_example.sqlite')}"
)

if __name__ == "__main__":
    DBOS(config={"name": "queue_example", "system_database_url": DATABASE_URL})
    DBOS.launch()
    # The tutorial's first snippet: enqueue one task and wait for it.
    task = "first"
    handle = queue.enqueue(process_task, task)
    print(f"single task: {handle.get_result()}")
    # The Queue Example: a workflow that fans the tasks out on the queue and gathers the results.
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    started = time.perf_counter()
    results = process_tasks(list(range(n)))
    elapsed = time.perf_counter() - started
    for result in results:
        print(result)
    print(f"{len(results)} tasks in {elapsed:.2f} s, at most {max_running} at once")
    DBOS.destroy()
