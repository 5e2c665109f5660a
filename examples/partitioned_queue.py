"""Partitioning queues: one queue, a concurrency limit for each user apart.

    python examples/partitioned_queue.py [TASKS_PER_USER]

DBOS's partitioned queues ("Queues & Parallelism", "Partitioning Queues"): each user's work is one
partition of the queue, named when it is enqueued, and `partition_concurrency=1` lets at most one
task of each user run at a time, while tasks of different users run side by side. The script
enqueues slow tasks for three users, then prints, for each user, the most of their tasks seen
running at once (1), and the most tasks running at once in all (3). The database is the SQLite file
or PostgreSQL URL in DBOS_DATABASE_URL (default: a SQLite file in the temp directory).
"""

import os
import sys
import tempfile
import threading
import time
from collections import Counter

from dbos_nb import DBOS, Queue, SetEnqueueOptions, WorkflowHandle

queue = Queue("per_user_queue", partition_concurrency=1)

_lock = threading.Lock()
_running: Counter[str] = Counter()
most_by_user: Counter[str] = Counter()
most_in_all = 0


@DBOS.step()
def user_task(user: str, task: int) -> str:
    global most_in_all
    with _lock:
        _running[user] += 1
        most_by_user[user] = max(most_by_user[user], _running[user])
        most_in_all = max(most_in_all, sum(_running.values()))
    time.sleep(0.05)  # work done on the user's behalf, one request at a time
    with _lock:
        _running[user] -= 1
    return f"{user}:{task}"


def enqueue_for(user: str, task: int) -> WorkflowHandle[str]:
    with SetEnqueueOptions(queue_partition_key=user):
        return queue.enqueue(user_task, user, task)


DATABASE_URL = os.environ.get("DBOS_DATABASE_URL") or (
    f"sqlite:///{os.path.join(tempfile.gettempdir(), 'dbos_nb_partitioned_queue.sqlite')}"
)

if __name__ == "__main__":
    DBOS(config={"name": "partitioned_queue", "system_database_url": DATABASE_URL})
    DBOS.launch()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    users = ["alice", "bob", "carol"]
    handles = [enqueue_for(user, task) for task in range(n) for user in users]
    results = [handle.get_result() for handle in handles]
    print(f"{len(results)} tasks done")
    for user in users:
        print(f"{user}: at most {most_by_user[user]} at once")
    print(f"all users: at most {most_in_all} at once")
    DBOS.destroy()
