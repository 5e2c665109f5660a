"""The `dbos-nb` command: inspect a dbos_nb database from a terminal.

    dbos-nb status    --db URL            queues, their limits and counts per status
    dbos-nb workflows --db URL [filters]  recent workflows

It reads through the store only and starts no worker threads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime

from dbos_nb import __version__
from dbos_nb.errors import DbosNbError
from dbos_nb.storage.database import Database
from dbos_nb.storage.migrations import migrate
from dbos_nb.storage.store import SystemStore


def _open(url: str) -> tuple[Database, SystemStore]:
    db = Database(url, pool_size=1, max_overflow=2)
    migrate(db)
    return db, SystemStore(db)


def _fmt_time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def cmd_status(args: argparse.Namespace) -> int:
    db, store = _open(args.db)
    try:
        queues = store.list_queues()
        print(
            f"{'queue':<28} {'limits':<34} {'ENQUEUED':>9} {'PENDING':>8} {'SUCCESS':>8} "
            f"{'ERROR':>6} {'CANCELLED':>9}"
        )
        for q in queues:
            counts = store.count_by_status(q.name)
            limits = []
            if q.concurrency is not None:
                limits.append(f"concurrency={q.concurrency}")
            if q.worker_concurrency is not None:
                limits.append(f"worker={q.worker_concurrency}")
            if q.limit is not None and q.period_ms is not None:
                limits.append(f"{q.limit}/{q.period_ms / 1000:g}s")
            print(
                f"{q.name:<28} {', '.join(limits) or '-':<34} {counts.get('ENQUEUED', 0):>9} "
                f"{counts.get('PENDING', 0):>8} {counts.get('SUCCESS', 0):>8} "
                f"{counts.get('ERROR', 0):>6} {counts.get('CANCELLED', 0):>9}"
            )
        executors = store.list_executors()
        if executors:
            print("\nexecutors:")
            for ex in executors:
                print(
                    f"  {ex['executor_id']:<24} pid {ex['pid']:<8} on {ex['hostname']:<20} "
                    f"heartbeat {_fmt_time(ex['heartbeat_at'])}"
                )
        return 0
    finally:
        db.dispose()


def cmd_workflows(args: argparse.Namespace) -> int:
    db, store = _open(args.db)
    try:
        rows = store.list_workflows(
            status=[args.status] if args.status else None,
            queue_name=args.queue,
            name=args.name,
            limit=args.limit,
            sort_desc=True,
            load_payloads=False,
        )
        print(f"{'workflow id':<40} {'status':<10} {'queue':<20} {'name':<30} created")
        for r in rows:
            print(
                f"{r['workflow_uuid']:<40} {r['status']:<10} {r['queue_name'] or '-':<20} "
                f"{r['name'][:30]:<30} {_fmt_time(r['created_at'])}"
            )
        return 0
    finally:
        db.dispose()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbos-nb", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dbos-nb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="queues, limits and counts per status")
    status.add_argument("--db", required=True, help="system database URL")
    status.set_defaults(func=cmd_status)
    wfs = sub.add_parser("workflows", help="recent workflows, newest first")
    wfs.add_argument("--db", required=True, help="system database URL")
    wfs.add_argument("--status", help="only this status (ENQUEUED, PENDING, SUCCESS, ...)")
    wfs.add_argument("--queue", help="only this queue")
    wfs.add_argument("--name", help="only this workflow name")
    wfs.add_argument("--limit", type=int, default=20)
    wfs.set_defaults(func=cmd_workflows)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except DbosNbError as exc:
        print(f"dbos-nb: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
