"""`dbos-nb worker`: a process that runs queued work for notebooks and other processes.

A worker launches DBOS with its own executor id, claims from the given queues (every queue when
none is given), and runs any function stored in the database: notebook-defined functions come from
there, cloudpickled at the version each workflow was enqueued with. Modules given with --import
are imported first (their decorated functions and queues register as usual); one that cannot be
imported stops the worker with a one-line error naming it (the traceback with --verbose).

`--app-db` is the application database (`application_database_url`), where `@DBOS.transaction`
functions run: a worker must be given the same one as the application, or its transactions would
run against the system database.

SIGTERM or Ctrl-C: stop claiming, give running workflows a grace period to finish (after it, they
stop at their next step), put what was claimed but not finished back in its queue, exit 0.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Sequence
from types import FrameType

from dbos_nb.core.runtime import get_runtime
from dbos_nb.dbos import DBOS
from dbos_nb.errors import DBOSConfigError
from dbos_nb.storage.database import sqlite_file
from dbos_nb.storage.store import SystemStore

logger = logging.getLogger("dbos_nb.worker")

PROGRESS_INTERVAL_SEC = 5.0


def default_executor_id() -> str:
    return f"worker:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def run_worker(
    db: str,
    *,
    app_db: str | None = None,
    queues: Sequence[str] = (),
    concurrency: int | None = None,
    executor_id: str | None = None,
    imports: Sequence[str] = (),
    lease_sec: float = 30.0,
    heartbeat_sec: float = 5.0,
    polling_interval_sec: float = 1.0,
    grace_sec: float = 10.0,
    stop: threading.Event | None = None,
) -> int:
    """Run until `stop` is set (or SIGTERM/SIGINT arrives); returns the exit code.

    `app_db`: the application database URL (None: the system database, as for an application
    configured without one)."""
    stop = stop or threading.Event()
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in imports:
        _import(module)
        logger.info("imported %s", module)
    executor = executor_id or default_executor_id()
    # SQLite files that do not exist yet: the launch creates them (a worker may be the first
    # process on a database), which is said, since a typo'd path makes a new, empty database
    # where the worker then waits for work that never comes.
    urls = [db] if app_db is None else [db, app_db]
    new_files = [p for p in map(sqlite_file, urls) if p is not None and not os.path.exists(p)]
    DBOS(
        config={
            "name": "dbos-nb-worker",
            "system_database_url": db,
            "application_database_url": app_db,
            "executor_id": executor,
            "listen_queues": list(queues) or ["*"],
            "run_stored_functions": True,
            "max_concurrent_workflows": concurrency,
            "executor_lease_sec": lease_sec,
            "heartbeat_interval_sec": heartbeat_sec,
            "polling_interval_sec": polling_interval_sec,
        }
    )
    DBOS.launch()
    for path in dict.fromkeys(new_files):
        logger.warning(
            "created a new database at %s (there was none: check the path if you meant an "
            "existing one)",
            path,
        )
    _install_signal_handlers(stop)
    logger.info(
        "worker %s running %s (%s)",
        executor,
        ", ".join(queues) if queues else "every queue",
        f"at most {concurrency} at once" if concurrency else "no concurrency limit",
    )
    rt = get_runtime()
    _warn_undeclared(rt.store, queues)
    last = ""
    while not stop.wait(PROGRESS_INTERVAL_SEC if last else 0.5):
        if rt.executor_id != executor:
            # Its id was taken while it could not renew it: it went on under a new one.
            logger.info("worker %s goes on as %s", executor, rt.executor_id)
            executor = rt.executor_id
        counts = rt.store.count_by_executor(executor)
        line = (
            f"running {len(rt.running_ids())}, done {counts.get('SUCCESS', 0)}, "
            f"failed {counts.get('ERROR', 0)}"
        )
        if line != last:
            logger.info("%s", line)
            last = line
    logger.info(
        "stopping: no new work; running workflows get %.0f s to finish, then stop at their next "
        "step; unfinished work goes back to its queue",
        grace_sec,
    )
    DBOS.destroy(workflow_completion_timeout_sec=grace_sec)
    logger.info("worker %s stopped", executor)
    return 0


def _import(module: str) -> None:
    """Import an `--import` module; a failure is a DBOSConfigError in one line naming the
    module (the traceback is logged at debug level: `--verbose` shows it)."""
    try:
        importlib.import_module(module)
    except SystemExit as exc:
        # A module that exits on import (a script's `sys.exit()`): said, not a silent exit.
        logger.debug("importing %s exited", module, exc_info=True)
        raise DBOSConfigError(
            f"--import {module}: importing it called sys.exit({exc.code!r}); import a module "
            "that defines the workflows, not a script that runs them"
        ) from exc
    except Exception as exc:
        logger.debug("importing %s failed", module, exc_info=True)
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None and (module == missing or module.startswith(missing + ".")):
            raise DBOSConfigError(
                f"--import {module}: no module named {missing!r} (looked in the current folder "
                "and on sys.path; set PYTHONPATH if it lives elsewhere)"
            ) from exc
        lines = str(exc).strip().splitlines()
        raise DBOSConfigError(
            f"--import {module}: importing it raised {type(exc).__name__}"
            + (f": {lines[0]}" if lines else "")
        ) from exc


def _warn_undeclared(store: SystemStore, queues: Sequence[str]) -> None:
    """Warn about each `--queue` that no process has declared (checked after launch, so the
    queues of `--import`ed modules count). The worker keeps running: a notebook may declare the
    queue later, and work enqueued on it then is served. But a typo would otherwise leave the
    worker silently idle."""
    for name in queues:
        if store.get_queue(name) is None:
            logger.warning(
                "no process has declared the queue %r in this database: this worker starts "
                "its work once a process declares it (a notebook may do so later); if that is "
                "a typo, `dbos-nb status` lists the declared queues",
                name,
            )


def _install_signal_handlers(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
