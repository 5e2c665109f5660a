"""Quickstart: the DBOS queue tutorial's example, durable on a local SQLite file.

    python examples/quickstart.py

A workflow enqueues ten tasks on a queue with a concurrency limit, waits for all of them and prints
their results. Run it twice: the second run finds the finished workflow by its id and prints the
recorded result without running anything again.
"""

import time

from dbos_nb import DBOS, Queue, SetWorkflowID

DBOS(config={"name": "quickstart", "system_database_url": "sqlite:///quickstart.sqlite"})

queue = Queue("example_queue", concurrency=4)


@DBOS.step()
def process_task(task: int) -> str:
    time.sleep(0.05)  # stands in for a slow call (an LLM, a web page, a model)
    return f"task {task} done"


@DBOS.workflow()
def process_tasks(tasks: list[int]) -> list[str]:
    # Enqueue each task so that they run concurrently, within the queue's limit.
    handles = [queue.enqueue(process_task, task) for task in tasks]
    # Wait for each task and return all results.
    return [handle.get_result() for handle in handles]


if __name__ == "__main__":
    DBOS.launch()
    started = time.perf_counter()
    with SetWorkflowID("quickstart-batch-1"):
        results = process_tasks(list(range(10)))
    elapsed = time.perf_counter() - started
    for line in results:
        print(line)
    print(f"{len(results)} tasks in {elapsed:.2f} s (workflow id quickstart-batch-1)")
    DBOS.destroy()
