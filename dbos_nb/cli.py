"""The `dbos-nb` command: inspect a dbos_nb database, run workers for its queues, try a demo.

    dbos-nb status    --db URL            queues, their limits and counts per status
    dbos-nb workflows --db URL [filters]  recent workflows
    dbos-nb worker    --db URL [options]  run queued work until stopped (see dbos_nb/worker.py)
    dbos-nb demo      [--items N]         a durable LLM batch against a local fake LLM

`status` and `workflows` read through the store only and start no threads. They write nothing:
the database is opened read-only, neither created nor upgraded (see `_open`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from dbos_nb import __version__, serialization
from dbos_nb.clock import SystemClock
from dbos_nb.errors import DbosNbError, UnknownQueueError
from dbos_nb.models import (
    DATABASE_URL_ENV,
    INTERNAL_QUEUE,
    STATUSES,
    shown_function_name,
    status_value,
    stored_names,
)
from dbos_nb.storage.database import Database, shown_url
from dbos_nb.storage.migrations import check_schema
from dbos_nb.storage.schema import queues as queues_table
from dbos_nb.storage.store import SystemStore

# Exit status of a command whose stdout was closed early (`dbos-nb workflows | head -1`): what a
# shell reports for a process killed by SIGPIPE (128 + 13), as for other Unix tools in a pipe.
EXIT_BROKEN_PIPE = 141


class UnknownQueueFilterError(UnknownQueueError):
    """`workflows --queue Q` names a queue that is not declared and has no workflows (a typo
    would otherwise print an empty table, as if the queue had none)."""

    def __init__(self, name: str) -> None:
        DbosNbError.__init__(
            self,
            f"queue {name!r} is not declared in this database; `dbos-nb status` lists the "
            "declared queues",
        )
        self.name = name


def _open(url: str) -> tuple[Database, SystemStore]:
    """The database of an existing dbos_nb application, read-only: a typo in a SQLite path
    must not create an empty database (nor its folders), looking must work on a file the user
    may only read, and must not upgrade the schema behind the back of the installations that
    use it (see `check_schema`)."""
    db = Database(url, pool_size=1, max_overflow=2, read_only=True)
    try:
        check_schema(db)
    except BaseException:
        db.dispose()
        raise
    return db, SystemStore(db)


def _fmt_time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _active_pauses(db: Database, now_ms: int) -> dict[str, int]:
    """Queues under a back-off that has not yet run out (after a 429), with its end.

    `QueueSettings` holds only what processes declare, not this shared back-off state, so it is
    read from the queues table here."""
    stmt = select(queues_table.c.name, queues_table.c.paused_until_ms).where(
        queues_table.c.paused_until_ms > now_ms
    )
    with db.read() as conn:
        return {str(name): int(until) for name, until in conn.execute(stmt)}


# How many load-failure reports `dbos-nb status` shows.
LOAD_FAILURES_SHOWN = 10


def cmd_status(args: argparse.Namespace) -> int:
    db, store = _open(args.db)
    try:
        queues = store.list_queues()
        paused = _active_pauses(db, SystemClock().now_ms())
        print(
            f"{'queue':<28} {'limits':<34} {'ENQUEUED':>9} {'PENDING':>8} {'SUCCESS':>8} "
            f"{'ERROR':>6} {'CANCELLED':>9}"
        )
        for q in queues:
            counts = store.count_by_status(q.name)
            print(
                f"{q.name:<28} {q.limits():<34} {counts.get('ENQUEUED', 0):>9} "
                f"{counts.get('PENDING', 0):>8} {counts.get('SUCCESS', 0):>8} "
                f"{counts.get('ERROR', 0):>6} {counts.get('CANCELLED', 0):>9}"
            )
            if q.name in paused:
                # On a line of its own: it explains why ENQUEUED work is not starting, and
                # would not fit the limits column.
                print(
                    f"  paused until {_fmt_time(paused[q.name])} (the provider answered 429): "
                    "no process starts its work before then"
                )
        executors = store.list_executors()
        if executors:
            print("\nexecutors:")
            for ex in executors:
                print(
                    f"  {ex['executor_id']:<24} pid {ex['pid']:<8} on {ex['hostname']:<20} "
                    f"heartbeat {_fmt_time(ex['heartbeat_at'])}"
                )
        failures = store.list_load_failures()
        # Why a queue's work waits with workers alive: none of them can load it. A worker
        # tries every stored version (a notebook's old ones too): those with waiting work
        # first, newest first.
        waiting = store.waiting_versions(sorted({f["version"] for f in failures}))
        failures.sort(key=lambda f: (f["version"] in waiting, f["recorded_at"]), reverse=True)
        if failures:
            print("\ncannot load (as the executor reported; such work waits for one that can):")
            for f in failures[:LOAD_FAILURES_SHOWN]:
                idle = "" if f["version"] in waiting else " (no work of it waiting)"
                print(
                    f"  {f['name']} version {f['version']} on {f['executor_id']}: "
                    f"{f['reason']}{idle}"
                )
            if len(failures) > LOAD_FAILURES_SHOWN:
                print(f"  ... and {len(failures) - LOAD_FAILURES_SHOWN} more")
        return 0
    finally:
        db.dispose()


def cmd_workflows(args: argparse.Namespace) -> int:
    db, store = _open(args.db)
    try:
        rows = store.list_workflows(
            status=[args.status] if args.status else None,
            queue_name=[args.queue] if args.queue else None,
            name=stored_names(args.name) if args.name else None,
            limit=args.limit,
            sort_desc=True,
            load_input=False,
            load_output=False,
        )
        if (
            not rows
            and args.queue
            and args.queue != INTERNAL_QUEUE
            and store.get_queue(args.queue) is None
        ):
            # Only when nothing matched: work enqueued on a queue nobody declared (a client's
            # `allow_unregistered`) is still listed.
            raise UnknownQueueFilterError(args.queue)
        # The name comes last and whole: names are often long qualified names, and a name cut
        # short cannot be given back to --name.
        print(f"{'workflow id':<40} {'status':<10} {'queue':<20} {'created':<19} name")
        for r in rows:
            print(
                f"{r['workflow_uuid']:<40} {r['status']:<10} {r['queue_name'] or '-':<20} "
                f"{_fmt_time(r['created_at']):<19} {shown_function_name(r['name'])}"
            )
            if r["status"] == "ERROR":
                # Read for the failed rows alone: the listing leaves out every payload.
                print(f"    {_error_line(store, r['workflow_uuid'])}")
        return 0
    finally:
        db.dispose()


def _error_line(store: SystemStore, workflow_id: str) -> str:
    """A failed workflow's error in one line of at most 120 characters."""
    row = store.get_status_and_result(workflow_id)
    error = serialization.load_error(row["error"]) if row is not None else None
    if error is None:
        return "(no error recorded)"
    text = serialization.error_text(error).strip().splitlines()[0]
    return text if len(text) <= 120 else text[:119] + "…"


def cmd_worker(args: argparse.Namespace) -> int:
    from dbos_nb.engine import lease_too_short, min_lease_sec
    from dbos_nb.worker import configure_logging, run_worker

    # Refused before any module is imported or anything registered, in the flags' own words
    # (the configuration would refuse it too, naming its keys). See engine.LEASE_HEARTBEATS.
    if lease_too_short(args.lease, args.heartbeat):
        raise DbosNbError(
            f"--lease ({args.lease:g} s) must be at least twice --heartbeat ({args.heartbeat:g} "
            f"s), that is {min_lease_sec(args.heartbeat):g} s: with a shorter lease, other "
            "processes take over this worker's running workflows while it is alive (their "
            "steps would run twice)"
        )

    for name in args.queue or ():
        if not name.strip():
            raise DbosNbError("--queue needs a queue name, got an empty one")
    configure_logging(args.verbose)
    return run_worker(
        args.db,
        app_db=args.app_db,
        queues=list(dict.fromkeys(args.queue or ())),  # each once, in the order given
        concurrency=args.concurrency,
        executor_id=args.executor_id,
        imports=args.imports or (),
        lease_sec=args.lease,
        heartbeat_sec=args.heartbeat,
        polling_interval_sec=args.poll,
        grace_sec=args.grace,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from dbos_nb.llm.demo import run_demo

    return run_demo(args.db, args.items)


_MAX_COUNT = 2**31 - 1


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count or a limit; 0 or less would mean nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    # At most what the database's integer columns and bound parameters hold.
    if not 1 <= value <= _MAX_COUNT:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer up to {_MAX_COUNT}, got {text}"
        )
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (`nan` and `inf` parse as floats but
    would make every comparison with them meaningless)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _status(text: str) -> str:
    """argparse type: a workflow status in any case; an unknown one is refused with the list
    (a typo would otherwise match no row and look like an empty result)."""
    value = status_value(text)
    if value is None:
        raise argparse.ArgumentTypeError(
            f"unknown status {text!r}; valid: {', '.join(STATUSES)} (any case)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    # The module docstring's first line, as a sentence of its own.
    what = __doc__.splitlines()[0].partition(": ")[2]
    parser = argparse.ArgumentParser(prog="dbos-nb", description=what[:1].upper() + what[1:])
    parser.add_argument("--version", action="version", version=f"dbos-nb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="queues, limits and counts per status")
    status.add_argument("--db", required=True, help="system database URL (opened read-only)")
    status.set_defaults(func=cmd_status)
    wfs = sub.add_parser("workflows", help="recent workflows, newest first")
    wfs.add_argument("--db", required=True, help="system database URL (opened read-only)")
    wfs.add_argument(
        "--status", type=_status, help=f"only this status, in any case ({', '.join(STATUSES)})"
    )
    wfs.add_argument("--queue", help="only this queue")
    wfs.add_argument("--name", help="only this workflow (or step) name, as shown")
    wfs.add_argument(
        "--limit",
        type=_positive_int,
        default=20,
        help="at most N workflows (default: %(default)s)",
    )
    wfs.set_defaults(func=cmd_workflows)
    worker = sub.add_parser(
        "worker", help="run queued work (of notebooks and other processes) until stopped"
    )
    worker.add_argument(
        "--db",
        default=os.environ.get(DATABASE_URL_ENV),
        required=not os.environ.get(DATABASE_URL_ENV),
        help=f"system database URL (default: ${DATABASE_URL_ENV}, which keeps a password out "
        "of the process list)",
    )
    worker.add_argument(
        "--app-db",
        metavar="URL",
        help="application database URL, where @DBOS.transaction functions run: the "
        "application's application_database_url (default: the system database, as for an "
        "application without one)",
    )
    worker.add_argument("--queue", action="append", help="a queue to run (repeat; default: all)")
    worker.add_argument(
        "--concurrency",
        type=_positive_int,
        help="at most N workflows at once in this worker (default: no limit)",
    )
    worker.add_argument("--executor-id", help="this worker's executor id (default: generated)")
    worker.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import a module first (repeat), e.g. the one defining your workflows",
    )
    worker.add_argument(
        "--lease",
        type=_positive_float,
        default=30.0,
        help="seconds without a heartbeat after which this worker's work is taken over "
        "(at least twice --heartbeat; default: %(default)g)",
    )
    worker.add_argument(
        "--heartbeat",
        type=_positive_float,
        default=5.0,
        help="seconds between heartbeats (default: %(default)g)",
    )
    worker.add_argument(
        "--poll",
        type=_positive_float,
        default=1.0,
        help="fallback polling interval, in seconds (default: %(default)g)",
    )
    worker.add_argument(
        "--grace",
        type=_positive_float,
        default=10.0,
        help="on SIGTERM/Ctrl-C, seconds running workflows get to finish (default: %(default)g)",
    )
    worker.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and the traceback of a failed --import",
    )
    worker.set_defaults(func=cmd_worker)
    demo = sub.add_parser(
        "demo", help="a durable batch of LLM calls under a rate limit, against a local fake LLM"
    )
    demo.add_argument(
        "--db",
        default="sqlite:///dbos_nb_demo.sqlite",
        help="system database URL (default: %(default)s)",
    )
    demo.add_argument(
        "--items", type=_positive_int, default=500, help="how many prompts (default: %(default)s)"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still
    buffered does not fail again on the closed pipe (and print "Exception ignored")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for errors, as argparse does)."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        # Flushed here, not at exit: a reader that has gone away (`| head -1`) must be seen
        # while the BrokenPipeError below can still end the command quietly.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader of stdout stopped reading: nothing is wrong, so no message (the usual
        # handling of SIGPIPE in a Python command; see the `signal` module's documentation).
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except DbosNbError as exc:
        print(f"dbos-nb: {exc}", file=sys.stderr)
        return 2
    except (SQLAlchemyError, OSError) as exc:
        # An unreachable server, a refused password: one line, not the driver's traceback.
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        where = getattr(args, "db", None)
        shown = shown_url(where) if where else "the database"
        app_db = getattr(args, "app_db", None)
        if app_db:  # the error may be either's: name both
            shown = f"{shown} or the application database {shown_url(app_db)}"
        print(
            f"dbos-nb: cannot use {shown}: {type(exc).__name__}: {cause[0] if cause else ''}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
