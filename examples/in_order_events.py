"""In-Order Processing: a FastAPI app that processes events one at a time, in order of arrival.

    python examples/in_order_events.py [EVENT ...]

The code between the `tutorial` markers is the DBOS queue tutorial's ("Queues & Parallelism",
"In-Order Processing") with only the import changed to `dbos_nb` and a configuration added to
`DBOS(fastapi=app)` to choose the database. The tutorial's placeholder `...` is kept; the line after
it records the events as they are processed. `DBOS(fastapi=app)` launches DBOS when the app starts
and destroys it when the app shuts down.

Run as a script, it posts a few events with FastAPI's TestClient (no server needed; `uvicorn
examples.in_order_events:app` would serve the same app) and prints the order in which they were
processed. The database is the SQLite file or PostgreSQL URL in DBOS_DATABASE_URL (default: a
SQLite file in the temp directory).

It needs FastAPI: `pip install -e ".[examples]"` (the `dev` extra includes it).
"""

import os
import sys
import tempfile
import threading
import time

try:
    import fastapi  # noqa: F401
except ImportError:
    sys.exit('this example needs FastAPI: pip install -e ".[examples]"')

# --- tutorial ---------------------------------------------------------------------------------
from fastapi import FastAPI

from dbos_nb import DBOS, Queue

# (added) the database: DBOS_DATABASE_URL, or a SQLite file in the temp directory
config = {
    "name": "in_order_events",
    "system_database_url": os.environ.get("DBOS_DATABASE_URL")
    or f"sqlite:///{os.path.join(tempfile.gettempdir(), 'dbos_nb_in_order_events.sqlite')}",
}

app = FastAPI()
DBOS(fastapi=app, config=config)

queue = Queue("in_order_queue", concurrency=1)


@DBOS.step()
def process_event(event: str):
    ...
    record(event)  # what this example adds: note the order (not in the tutorial)


@app.post("/events/{event}")
def event_endpoint(event: str):
    queue.enqueue(process_event, event)


# --- end of tutorial --------------------------------------------------------------------------

_lock = threading.Lock()
_running = 0
max_running = 0  # the most events seen being processed at the same time
processed: list[str] = []  # events in the order they were processed


def record(event: str) -> None:
    global _running, max_running
    with _lock:
        _running += 1
        max_running = max(max_running, _running)
    time.sleep(0.02)  # processing takes a while, so that overlapping events would show
    with _lock:
        _running -= 1
        processed.append(event)


def wait_until_processed(count: int, timeout_sec: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_sec
    while len(processed) < count and time.monotonic() < deadline:
        time.sleep(0.01)


if __name__ == "__main__":
    import warnings

    with warnings.catch_warnings():
        # Starlette's deprecation notice about the HTTP library behind its test client:
        # nothing a reader of this example can act on.
        warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
        from fastapi.testclient import TestClient

    events = sys.argv[1:] or ["signup", "login", "upload", "share", "logout"]
    with TestClient(app) as client:  # starting the app launches DBOS; leaving it destroys DBOS
        for event in events:
            client.post(f"/events/{event}").raise_for_status()
        wait_until_processed(len(events))
    print(f"posted:    {' '.join(events)}")
    print(f"processed: {' '.join(processed)}")
    print(f"at most {max_running} at once")
