"""IPython magics: launch DBOS, declare queues, run durable cells, inspect and manage work.

    %dbos_launch [--db URL] [--name NAME] [--executor-id ID]
    %dbos_queue NAME [--concurrency N] [--worker-concurrency N] [--limit 50/30s]
                [--partition-concurrency N] [--partition-limit 10/1m]
                [--tokens 90000/1m] [--priority] [--as VAR]
    %%dbos_workflow NAME [--id ID] [--queue Q] [--timeout S] [--background] [--rerun]
    %dbos_status [QUEUE]
    %dbos_cancel ID / %dbos_resume ID

Arguments are parsed with IPython's magic_arguments (so `%dbos_queue?` shows help) and bad ones
answer with a UsageError that says what is wrong. Quoted arguments (`%dbos_queue "llm-fast"`,
`--limit '10 / 30 s'`) are unquoted, as a shell would.
"""

from __future__ import annotations

import argparse
import builtins
import keyword
import os
import re
import socket
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from sqlalchemy.exc import SQLAlchemyError

from dbos_nb import serialization
from dbos_nb.core import versions
from dbos_nb.core.context import SetWorkflowID, SetWorkflowTimeout
from dbos_nb.core.handles import WorkflowHandle
from dbos_nb.core.registry import REGISTRY, Registration
from dbos_nb.core.runtime import Runtime, peek_runtime
from dbos_nb.core.workflows import Execution, dispatch, run_execution
from dbos_nb.dbos import DBOS
from dbos_nb.errors import DBOSExecutorIdInUseError, DbosNbError
from dbos_nb.ids import new_token
from dbos_nb.models import INTERNAL_QUEUE
from dbos_nb.notebook import cells, views
from dbos_nb.notebook.batch import Queue
from dbos_nb.storage.database import normalize_url, shown_url, sqlite_file

_LIMIT = re.compile(
    r"^\s*(?P<limit>\d+)\s*/\s*(?P<period>\d+(?:\.\d*)?|\.\d+)?\s*(?P<unit>ms|s|sec|m|min|h)?\s*$"
)
_UNITS = {None: 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_limit(text: str, flag: str = "--limit") -> dict[str, float]:
    """'50/30s' -> {"limit": 50, "period": 30}; also '500/1m', '10/s', '50/30'.

    `flag` names the option in error messages (--limit, --tokens)."""
    match = _LIMIT.match(text)
    if not match:
        raise UsageError(f"{flag} {text!r}: write LIMIT/PERIOD, e.g. 50/30s, 500/1m or 10/s")
    period = float(match["period"] or 1) * _UNITS[match["unit"]]
    if int(match["limit"]) < 1 or period <= 0:
        raise UsageError(f"{flag} {text!r}: the limit and the period must be positive")
    return {"limit": int(match["limit"]), "period": period}


def notebook_name(namespace: dict[str, Any]) -> str:
    """The notebook's file stem, as far as the kernel can tell."""
    for candidate in (os.environ.get("JPY_SESSION_NAME"), namespace.get("__vsc_ipynb_file__")):
        if candidate:
            return Path(str(candidate)).stem
    return "notebook"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "notebook"


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _args(magic: Any, line: str) -> argparse.Namespace:
    """Parse a magic's arguments, with quotes removed from quoted values.

    IPython splits the line without removing quotes (so Windows paths keep their backslashes):
    `"llm-fast"` would otherwise arrive with its quote characters. Options typed as numbers
    still have to be written unquoted."""
    try:
        args: argparse.Namespace = parse_argstring(magic, line)
    except ValueError as exc:  # an unclosed quote
        raise UsageError(f"cannot read the arguments {line.strip()!r}: {exc}") from exc
    for key, value in list(vars(args).items()):
        if isinstance(value, str):
            setattr(args, key, _unquote(value))
        elif isinstance(value, list):
            setattr(args, key, [_unquote(v) if isinstance(v, str) else v for v in value])
    return args


def _rt() -> Runtime:
    rt = peek_runtime()
    if rt is None:
        raise UsageError("DBOS is not launched in this kernel: run %dbos_launch first")
    return rt


_UNBOUND = object()


class CellHandle(WorkflowHandle[Any]):
    """The handle of a durable cell run with --queue or --background: its result is the cell's
    last value (the workflow records the cell's names beside it)."""

    def get_result(
        self, polling_interval_sec: float = 1.0, *, timeout_sec: float | None = None
    ) -> Any:
        out = super().get_result(polling_interval_sec, timeout_sec=timeout_sec)
        return out.get("result") if isinstance(out, dict) else out

    async def get_result_async(
        self, polling_interval_sec: float = 1.0, *, timeout_sec: float | None = None
    ) -> Any:
        out = await super().get_result_async(polling_interval_sec, timeout_sec=timeout_sec)
        return out.get("result") if isinstance(out, dict) else out


@magics_class
class DbosMagics(Magics):
    """The dbos_nb magics."""

    @property
    def _ns(self) -> dict[str, Any]:
        if self.shell is None:
            raise UsageError("dbos_nb magics need an IPython shell")
        namespace: dict[str, Any] = self.shell.user_ns
        return namespace

    # -- %dbos_launch ---------------------------------------------------------------------------

    @magic_arguments()
    @argument(
        "--db",
        help="system database URL (default: <notebook>.sqlite in $DBOS_NB_DIR, else in .dbos_nb/)",
    )
    @argument("--name", help="application name (default: the notebook's name)")
    @argument("--executor-id", help="executor id (default: stable for this notebook and host)")
    @argument(
        "--no-worker",
        action="store_true",
        help="run no queued work in this kernel (leave it to `dbos-nb worker` processes)",
    )
    @line_magic
    def dbos_launch(self, line: str) -> None:
        """Create and launch DBOS for this notebook; recovers its unfinished work."""
        args = _args(self.dbos_launch, line)
        name = _safe(args.name or notebook_name(self._ns))
        folder = Path(os.environ.get("DBOS_NB_DIR") or ".dbos_nb").resolve()
        url = args.db or f"sqlite:///{folder / (name + '.sqlite')}"
        executor = args.executor_id or f"nb:{name}@{socket.gethostname()}"
        config: dict[str, Any] = {"name": name, "system_database_url": url, "executor_id": executor}
        if args.no_worker:
            config["listen_queues"] = []
        rt = peek_runtime()
        if rt is not None:
            try:
                same = rt.db.url == normalize_url(url) and rt.executor_id == executor
            except DbosNbError as exc:
                raise UsageError(str(exc)) from exc
            engine = DBOS._engine
            serving = engine is not None and engine.config.listen_queues != ()
            if same and serving == (not args.no_worker):
                print(f"dbos_nb is already running on {shown_url(url)} (executor {executor})")
                return
            if same:
                now = "without running queued work (--no-worker)" if not serving else "as a worker"
                raise UsageError(
                    f"dbos_nb is already running here {now}; call DBOS.destroy() first to "
                    "launch it the other way"
                )
            raise UsageError(
                f"DBOS is already launched on {shown_url(rt.db.url)} as {rt.executor_id}; call "
                "DBOS.destroy() first to launch it on another database"
            )
        try:
            file = sqlite_file(url)
        except DbosNbError as exc:
            raise UsageError(str(exc)) from exc
        new_file = file is not None and not os.path.exists(file)
        try:
            DBOS(config=config)
            DBOS.launch()
        except BaseException as exc:
            # Whatever failed, leave nothing half-created: a corrected %dbos_launch must work.
            DBOS.destroy()
            if isinstance(exc, DBOSExecutorIdInUseError) and not args.executor_id:
                raise UsageError(
                    f"{exc}. Another kernel of notebook {name!r} is running on this machine "
                    "(a kernel that cannot tell its notebook's name calls it 'notebook'): "
                    "launch this one with its own name, %dbos_launch --name OTHER (its own "
                    "database and executor), or --executor-id ID to share the database"
                ) from exc
            if isinstance(exc, DbosNbError):
                raise UsageError(str(exc)) from exc
            if isinstance(exc, SQLAlchemyError | OSError):
                cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
                raise UsageError(
                    f"cannot launch dbos_nb on {shown_url(url)}: {type(exc).__name__}: "
                    + (cause[0] if cause else "")
                ) from exc
            raise
        waiting = len(DBOS.list_queued_workflows())
        # A new file is said so: a mistyped --db path would otherwise look like the database
        # of earlier work, and a batch mapped again would be paid for again.
        created = " (new: created now)" if new_file else ""
        print(
            f"dbos_nb launched: database {shown_url(url)}{created}, executor {executor}"
            + (f"; {waiting} queued or unfinished workflow(s)" if waiting else "")
        )

    # -- %dbos_queue ----------------------------------------------------------------------------

    @magic_arguments()
    @argument("name", help="queue name; also the variable it is bound to unless --as")
    @argument("--concurrency", type=int, help="at most N running at once, over all processes")
    @argument("--worker-concurrency", type=int, help="at most N running at once per process")
    @argument("--limit", help="rate limit LIMIT/PERIOD, e.g. 50/30s or 500/1m")
    @argument("--tokens", help="token budget TOKENS/PERIOD, e.g. 90000/1m")
    @argument("--priority", action="store_true", help="order waiting work by priority")
    @argument(
        "--partition-concurrency",
        type=int,
        help="at most N of each partition running at once (work names its partition with "
        "SetEnqueueOptions(queue_partition_key=...))",
    )
    @argument("--partition-limit", help="rate limit of each partition, e.g. 10/1m")
    @argument("--as", dest="var", help="variable to bind the queue to")
    @line_magic
    def dbos_queue(self, line: str) -> Queue:
        """Declare a queue (stored in the database) and bind it to a variable."""
        args = _args(self.dbos_queue, line)
        var = args.var or args.name
        if not var.isidentifier() or keyword.iskeyword(var):
            raise UsageError(f"{var!r} is not a valid variable name; pass --as VAR")
        # Rebinding a name to the queue must not silently replace the notebook's data, or a
        # builtin (`%dbos_queue print` broke print); a queue bound earlier is replaced.
        held = self._ns.get(var, _UNBOUND)
        if held is _UNBOUND and hasattr(builtins, var):
            raise UsageError(f"{var!r} is a Python builtin; bind the queue elsewhere: --as VAR")
        if held is not _UNBOUND and not isinstance(held, Queue):
            raise UsageError(
                f"{var!r} already holds a {type(held).__name__}; bind the queue elsewhere: --as VAR"
            )
        try:
            settings = {
                "concurrency": args.concurrency,
                "worker_concurrency": args.worker_concurrency,
                "limiter": parse_limit(args.limit, "--limit") if args.limit else None,
                "priority_enabled": args.priority,
                "token_limiter": parse_limit(args.tokens, "--tokens") if args.tokens else None,
                "partition_concurrency": args.partition_concurrency,
                "partition_limiter": parse_limit(args.partition_limit, "--partition-limit")
                if args.partition_limit
                else None,
            }
            # Only the name: the queue's stored settings apply (see `Queue`).
            given = any(v is not None and v is not False for v in settings.values())
            queue = Queue(args.name, **settings) if given else Queue(args.name)
        except DbosNbError as exc:
            raise UsageError(str(exc)) from exc
        self._ns[var] = queue
        return queue

    # -- %%dbos_workflow ------------------------------------------------------------------------

    @magic_arguments()
    @argument("name", help="the cell's workflow name (and its id unless --id)")
    @argument("--id", help="workflow id (default: NAME)")
    @argument("--queue", help="run on this queue (returns at once with a handle)")
    @argument("--timeout", type=float, help="cancel the run after this many seconds")
    @argument("--background", action="store_true", help="run in the background")
    @argument("--rerun", action="store_true", help="discard the recorded run and run afresh")
    @cell_magic
    def dbos_workflow(self, line: str, cell: str) -> Any:
        """Run the cell as a durable workflow with a stable id.

        Finished: the recorded variables and result come back and nothing runs. Unfinished (the
        kernel died): it resumes, completed steps are not run again. Failed or cancelled: the
        recorded error is raised again (as awaiting the run would); --rerun starts a fresh run.
        """
        __tracebackhide__ = True  # IPython and pytest leave this frame out of tracebacks
        args = _args(self.dbos_workflow, line)
        rt = _rt()
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError("--timeout must be a positive number of seconds")
        if args.queue and not rt.store.get_queue(args.queue):
            raise UsageError(f"queue {args.queue!r} is not declared; use %dbos_queue first")
        engine = DBOS._engine
        if args.queue and (engine is None or not engine.serves(args.queue)):
            # Only this kernel can run its cells (a worker process has not got the cell's code),
            # so a queued cell that this kernel does not claim from would wait forever.
            raise UsageError(
                f"this kernel runs no work from queue {args.queue!r} (launched with --no-worker, "
                "or the queue is not declared in this kernel), and worker processes cannot run "
                "notebook cells: run the cell without --queue, or declare the queue here with "
                "%dbos_queue in a kernel launched without --no-worker"
            )
        try:
            compiled = cells.compile_cell(args.name, cell)
        except DbosNbError as exc:
            raise UsageError(str(exc)) from exc
        wid = args.id or args.name
        namespace = self._ns
        body = cells.make_body(compiled, namespace)
        reg_name = f"{cells.CELL_PREFIX}{args.name}"
        # Not portable: the cell runs in this kernel's namespace, never in a worker.
        reg = Registration(name=reg_name, kind="workflow", func=body, wrapper=body, portable=False)
        body.__dbos_nb_registration__ = reg  # type: ignore[attr-defined]
        status = rt.store.get_workflow(wid)
        # The name check comes first: --rerun must never delete another workflow's record.
        if status is not None and status["name"] != reg_name:
            raise UsageError(
                f"workflow id {wid!r} belongs to {status['name']!r}; pass another --id"
            )
        if status is not None and args.rerun:
            _refuse_active_rerun(rt, status)
            # What the check let through is finished or abandoned by a dead kernel. Its named
            # batches stay: mapped again under the same name, they are found, and what was
            # paid for is not paid again.
            rt.store.delete_workflows([wid], refuse_active=False, keep_batch_items=True)
            status = None
        if status is None:
            REGISTRY.register(reg)
            return self._start(rt, args, wid, body, compiled, namespace)
        detached = bool(args.queue or args.background)
        return self._existing(rt, reg, status, compiled, namespace, detached)

    def _start(
        self,
        rt: Runtime,
        args: Any,
        wid: str,
        body: Any,
        compiled: cells.CompiledCell,
        namespace: dict[str, Any],
    ) -> Any:
        __tracebackhide__ = True
        with SetWorkflowID(wid), SetWorkflowTimeout(args.timeout):
            if args.queue:
                handle: WorkflowHandle[Any] = DBOS.enqueue_workflow(
                    args.queue, body, compiled.source_hash
                )
                return CellHandle(rt, handle.workflow_id)
            if args.background:
                started = DBOS.start_workflow(body, compiled.source_hash)
                return CellHandle(rt, started.workflow_id)
            out = body_call(body, compiled.source_hash)
        return self._finish(out, wid)

    def _existing(
        self,
        rt: Runtime,
        reg: Registration,
        row: dict[str, Any],
        compiled: cells.CompiledCell,
        namespace: dict[str, Any],
        detached: bool,
    ) -> Any:
        """A cell whose workflow exists. `detached` (--queue, --background): an unfinished run
        goes on (or resumes) in the background, and its handle comes back at once."""
        __tracebackhide__ = True
        wid = row["workflow_uuid"]
        status = row["status"]
        recorded_hash = _recorded_hash(row)
        if status == "SUCCESS":
            REGISTRY.register(reg)
            out = serialization.loads(row["output"])
            if recorded_hash != compiled.source_hash:
                print(
                    f"note: the cell changed since workflow {wid!r} ran; this is its recorded "
                    "result. Use --rerun to run the new code."
                )
            return cells.restore(compiled, out, namespace)
        if status in ("ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED"):
            changed = recorded_hash != compiled.source_hash
            if not changed:
                REGISTRY.register(reg)
            # else: a cancelled run can still be resumed (%dbos_resume), and must go on with
            # the code it started with, which registering the edited cell would replace.
            print(
                f"workflow {wid!r} ended {status}; its recorded outcome is raised again. Run the "
                "cell with --rerun to start a fresh run (completed steps of the old run are "
                "discarded)"
                + (
                    f", or %dbos_resume {wid} to go on from its last completed step."
                    if status == "CANCELLED" and not changed
                    else "."
                )
                + ("\nnote: the cell changed since that run started." if changed else "")
            )
            # Raised, not only shown, so that "Run All" stops here as it did the first time;
            # the same error as awaiting the run gives (its own error, or cancelled).
            out = WorkflowHandle(rt, wid).get_result()
            return cells.restore(compiled, out, namespace)  # resumed meanwhile, and finished
        if recorded_hash != compiled.source_hash:
            raise UsageError(
                f"the cell changed since its unfinished run {wid!r} started; resuming would mix "
                "old and new code. Run it with --rerun to start afresh, or restore the old code."
            )
        # Unfinished: resume in the foreground where we can, else wait for whoever runs it;
        # detached, return its handle at once either way.
        if detached and status == "ENQUEUED" and row["queue_name"] not in (None, INTERNAL_QUEUE):
            REGISTRY.register(reg)
            print(f"workflow {wid!r} waits in queue {row['queue_name']!r}")
            return CellHandle(rt, wid)
        if status == "PENDING" and row["executor_id"] == rt.executor_id and not rt.is_running(wid):
            rt.store.requeue_workflow(wid, rt.now_ms(), wake_others=False)
        owner = new_token()
        mark = rt.stop_mark()
        claimed = rt.store.claim_workflow(wid, rt.executor_id, owner, rt.now_ms())
        REGISTRY.register(reg)
        if claimed is None:
            where = "in the background" if rt.is_running(wid) else f"on {row['executor_id']}"
            if detached:
                print(f"workflow {wid!r} is running {where}")
                return CellHandle(rt, wid)
            print(f"workflow {wid!r} is running {where}; waiting for it")
            out = WorkflowHandle(rt, wid).get_result()
            return cells.restore(compiled, out, namespace)
        print(f"resuming workflow {wid!r}: completed steps return their recorded results")
        ex = Execution(
            reg,
            wid,
            owner,
            (compiled.source_hash,),
            {},
            claimed["workflow_deadline_epoch_ms"],
            stop_mark=mark,
        )
        if detached:
            dispatch(rt, ex)
            return CellHandle(rt, wid)
        return self._finish(run_execution(rt, ex), wid)

    def _finish(self, out: dict[str, Any], wid: str) -> Any:
        if out.get("skipped"):
            print(f"note: not recorded (cannot be serialized): {', '.join(out['skipped'])}")
        if out.get("unrecorded_changes"):
            print(
                "note: changes in place to "
                f"{', '.join(out['unrecorded_changes'])} are not recorded (modules, functions "
                "and values that cannot be serialized): a replay will not bring them back"
            )
        if out.get("result_not_recorded"):
            print(
                "note: the cell's last value is shown but not recorded (it cannot be "
                "serialized): a replay of this cell will show nothing"
            )
            return cells.take_live_result(wid)
        return out.get("result")

    # -- %dbos_workers --------------------------------------------------------------------------

    @magic_arguments()
    @argument("action", nargs="?", help="N to start N workers, 'stop' to stop this notebook's")
    @argument("--queue", action="append", help="a queue the workers run (repeat; default: all)")
    @argument("--concurrency", type=int, help="at most N workflows at once per worker")
    @line_magic
    def dbos_workers(self, line: str) -> Any:
        """Start detached `dbos-nb worker` processes (they outlive the kernel), list the live
        executors, or stop the workers this notebook started."""
        args = _args(self.dbos_workers, line)
        rt = _rt()
        from dbos_nb.notebook import workers

        if args.action is None:
            return workers.executors_table(rt)
        if args.action == "stop":
            stopped = workers.stop_workers(
                rt,
                announce=lambda n: print(
                    f"stopping {n} worker(s): each ends its running steps, up to 30 s, and "
                    "puts its unfinished workflows back in their queues",
                    flush=True,
                ),
            )
            print(f"stopped {len(stopped)} worker(s)" + (f": pids {stopped}" if stopped else ""))
            return None
        try:
            count = int(args.action)
        except ValueError:
            raise UsageError(
                f"%dbos_workers {args.action!r}: give a number of workers, 'stop', or nothing"
            ) from None
        if not 1 <= count <= 64:
            raise UsageError("start between 1 and 64 workers at a time")
        if args.concurrency is not None and args.concurrency < 1:
            raise UsageError("--concurrency must be a positive integer")
        started = workers.start_workers(rt, count, args.queue or [], args.concurrency)
        print(
            f"started {len(started)} worker(s): pids {[w['pid'] for w in started]}; logs in "
            f"{workers.state_dir(rt)}"
        )
        return None

    # -- status and management ------------------------------------------------------------------

    @magic_arguments()
    @argument("queue", nargs="?", help="only this queue")
    @line_magic
    def dbos_status(self, line: str) -> Any:
        """Queues (limits, counts per status), executors, and the latest workflows."""
        args = _args(self.dbos_status, line)
        rt = _rt()
        if (
            args.queue is not None
            and args.queue != INTERNAL_QUEUE
            and not rt.store.get_queue(args.queue)
        ):
            raise UsageError(
                f"queue {args.queue!r} is not declared in this database; %dbos_status without "
                "a name lists the declared queues"
            )
        from dbos_nb.notebook.frames import executors_frame, queues_frame, workflows_frame

        views.display(queues_frame(args.queue))
        views.display(executors_frame())
        return workflows_frame(queue_name=args.queue, limit=10, sort_desc=True, load_output=False)

    @magic_arguments()
    @argument("workflow_id", help="the workflow to cancel (with its children)")
    @line_magic
    def dbos_cancel(self, line: str) -> None:
        """Cancel a workflow and its children."""
        args = _args(self.dbos_cancel, line)
        _rt()
        try:
            DBOS.cancel_workflow(args.workflow_id, cancel_children=True)
            status = DBOS.get_workflow_status(args.workflow_id)
        except DbosNbError as exc:
            raise UsageError(str(exc)) from exc
        if status is None:
            raise UsageError(f"no workflow {args.workflow_id!r} in this database")
        if status.status != "CANCELLED":
            # A finished workflow keeps its outcome: nothing was cancelled.
            print(f"{args.workflow_id} had already ended {status.status}; nothing to cancel")
            return
        print(f"cancelled {args.workflow_id}")

    @magic_arguments()
    @argument("workflow_id", help="the workflow to resume from its last completed step")
    @line_magic
    def dbos_resume(self, line: str) -> WorkflowHandle[Any] | None:
        """Resume a cancelled or failed-over workflow from its last completed step.

        A finished workflow (SUCCESS or ERROR) keeps its outcome: nothing is resumed, it is
        said, and None comes back. A durable cell's handle gives the cell's last value."""
        args = _args(self.dbos_resume, line)
        rt = _rt()
        wid = args.workflow_id
        row = rt.store.get_workflow(wid)
        if row is None:
            raise UsageError(f"no workflow {wid!r} in this database")
        if row["status"] in ("SUCCESS", "ERROR"):
            cell_hint = (
                " (run the cell again for its recorded result, or with --rerun to run it afresh)"
                if str(row["name"]).startswith(cells.CELL_PREFIX)
                else ""
            )
            print(f"{wid} had already ended {row['status']}; nothing to resume{cell_hint}")
            return None
        is_cell = str(row["name"]).startswith(cells.CELL_PREFIX)
        reg = REGISTRY.get(row["name"])
        registered = versions.cell_source_hash(reg.func) if reg is not None else None
        if is_cell and reg is not None and registered != _recorded_hash(row):
            # The kernel runs the cell's registered body, the latest version run under its name.
            cell = row["name"][len(cells.CELL_PREFIX) :]
            raise UsageError(
                f"the cell {cell!r} changed since its run {wid!r} started; resuming would mix "
                "old and new code. Run the cell with --rerun to start afresh, or run its old "
                "code again first."
            )
        try:
            handle = DBOS.resume_workflow(wid)
        except DbosNbError as exc:
            raise UsageError(str(exc)) from exc
        print(f"resumed {wid} from its last completed step")
        if not is_cell:
            return handle
        if reg is None:
            # A cell's code lives only in the notebook: the run waits for the cell.
            print(f"it runs once the cell {row['name'][len(cells.CELL_PREFIX) :]!r} is run again")
        return CellHandle(rt, wid)


def _refuse_active_rerun(rt: Runtime, row: dict[str, Any]) -> None:
    """Refuse `--rerun` of a run that is still going: deleting it under its executor hangs the
    rerun (it would wait on the old execution) or loses the old run's result.

    Refused: a run executing in this process; a run waiting in a user queue (a worker or this
    kernel will claim it); a PENDING run of another executor whose registration is still live
    (its row disappears when it is declared dead or stops). Allowed: finished runs, and runs left
    PENDING (or requeued to the internal queue at launch) by a dead kernel with this notebook's
    executor id, which nothing runs any more: restarting them afresh is what --rerun is for.
    """
    wid = row["workflow_uuid"]
    status = row["status"]
    active = rt.is_running(wid)
    if status == "ENQUEUED" and row.get("queue_name") not in (None, INTERNAL_QUEUE):
        active = True
    executor = row.get("executor_id")
    if status == "PENDING" and executor and executor != rt.executor_id:
        record = rt.store.get_executor(executor)
        engine = DBOS._engine
        if record is not None and engine is not None and engine.executor_alive(record, rt.now_ms()):
            active = True
    if active:
        raise UsageError(
            f"workflow {wid!r} is still running ({status}); wait for it to finish, or cancel it "
            f"first with %dbos_cancel {wid}, then run the cell with --rerun"
        )


def body_call(body: Any, source_hash: str) -> dict[str, Any]:
    """Call a cell's registered workflow directly (the engine checkpoints it)."""
    __tracebackhide__ = True
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.core.workflows import call_workflow

    reg = body.__dbos_nb_registration__
    out: dict[str, Any] = call_workflow(get_runtime(), reg, (source_hash,), {})
    return out


def _recorded_hash(row: dict[str, Any]) -> str | None:
    try:
        args, _ = serialization.load_inputs(row["inputs"])
    except Exception:
        return None
    return str(args[0]) if args else None
