"""Rate Limiting: a queue that starts at most 50 functions in any 30 seconds.

    python examples/queue_rate_limit.py [NUMBER_OF_TASKS]
    EXAMPLE_LIMITER_PERIOD=0.5 python examples/queue_rate_limit.py 60

The tutorial's queue ("Queues & Parallelism", "Rate Limiting") is declared as written. By default
the script enqueues 5 tasks, well under the limit, so they all start at once. To watch the limiter
hold tasks back without waiting 30 seconds, set EXAMPLE_LIMITER_PERIOD to a shorter period and
enqueue more than 50 tasks: the 51st starts one period after the first. The database is the SQLite
file or PostgreSQL URL in DBOS_DATABASE_URL (default: a SQLite file in the temp directory).
"""

import os
import sys
import tempfile
import time

from dbos_nb import DBOS, Queue

if "EXAMPLE_LIMITER_PERIOD" not in os.environ:
    # --- tutorial -----------------------------------------------------------------------------
    queue = Queue("example_queue", limiter={"limit": 50, "period": 30})
    # --- end of tutorial ----------------------------------------------------------------------
else:  # the same limit over a shorter period, to see the limiter at work in seconds
    period = float(os.environ["EXAMPLE_LIMITER_PERIOD"])
    queue = Queue("example_queue", limiter={"limit": 50, "period": period})


@DBOS.step()
def call_api(task: int) -> float:
    return time.time()  # when the task started (a rate-limited API call would go here)


DATABASE_URL = os.environ.get("DBOS_DATABASE_URL") or (
    f"sqlite:///{os.path.join(tempfile.gettempdir(), 'dbos_nb_queue_rate_limit.sqlite')}"
)

if __name__ == "__main__":
    DBOS(config={"name": "queue_rate_limit", "system_database_url": DATABASE_URL})
    DBOS.launch()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(f"limiter: {queue.limiter}")
    handles = [queue.enqueue(call_api, task) for task in range(n)]
    starts = [handle.get_result() for handle in handles]
    first = min(starts)
    for task, start in enumerate(starts):
        print(f"task {task} started at +{start - first:.3f} s")
    print(f"{n} tasks started within {max(starts) - first:.3f} s")
    DBOS.destroy()
