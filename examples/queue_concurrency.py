"""Managing Concurrency: a queue with a global and a per-process concurrency limit.

    python examples/queue_concurrency.py [NUMBER_OF_TASKS]

The tutorial's queue ("Queues & Parallelism", "Managing Concurrency") runs at most 10 functions at
once across all processes and at most 5 in any one process. This script is one process: it enqueues
slow tasks, counts how many run at the same time, and prints the highest count (5). The database is
the SQLite file or PostgreSQL URL in DBOS_DATABASE_URL (default: a SQLite file in the temp
directory); start the script in two terminals against one PostgreSQL database to see both limits.
"""

import os
import sys
import tempfile
import threading
import time

# --- tutorial ---------------------------------------------------------------------------------
from dbos_nb import DBOS, Queue

queue = Queue("example_queue", concurrency=10, worker_concurrency=5)
# --- end of tutorial --------------------------------------------------------------------------

_lock = threading.Lock()
_running = 0
max_running = 0  # the most tasks seen running at the same time in this process


@DBOS.step()
def slow_task(task: int) -> int:
    global _running, max_running
    with _lock:
        _running += 1
        max_running = max(max_running, _running)
    time.sleep(0.1)  # a call to an external service with limited capacity
    with _lock:
        _running -= 1
    return task * task


DATABASE_URL = os.environ.get("DBOS_DATABASE_URL") or (
    f"sqlite:///{os.path.join(tempfile.gettempdir(), 'dbos_nb_queue_concurrency.sqlite')}"
)

if __name__ == "__main__":
    DBOS(config={"name": "queue_concurrency", "system_database_url": DATABASE_URL})
    DBOS.launch()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    started = time.perf_counter()
    handles = [queue.enqueue(slow_task, task) for task in range(n)]
    results = [handle.get_result() for handle in handles]
    elapsed = time.perf_counter() - started
    print(f"results: {results}")
    print(f"{n} tasks in {elapsed:.2f} s, at most {max_running} at once")
    DBOS.destroy()
