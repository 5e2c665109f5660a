"""Durable operations inside a workflow: steps, transactions and sleeps.

Every operation takes the workflow's next operation number, then makes one read
(`begin_operation`): is the workflow still PENDING, still ours and within its deadline, and is this
operation already recorded? A recorded operation returns (or raises) its recorded outcome without
running: this is how a resumed workflow skips the steps it completed. Otherwise the operation runs
and its outcome is written in one more transaction.

A transaction's checkpoint is written in the application database inside the user's own database
transaction, so its writes and its checkpoint commit together, exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dbos_nb import serialization
from dbos_nb.core.context import (
    Context,
    RunningWorkflow,
    StepFrame,
    amount,
    current,
    derive,
    using,
    whole_number,
)
from dbos_nb.core.deferred_reads import DEFERRABLE, defer_read, write_deferred
from dbos_nb.core.registry import Registration
from dbos_nb.core.runtime import Runtime
from dbos_nb.errors import (
    MAX_RETRY_AFTER_SEC,
    DBOSMaxStepRetriesExceeded,
    DbosNbError,
    DBOSUnexpectedStepError,
    RateLimited,
    WorkflowPreempted,
    waiting_does_not_cure,
)
from dbos_nb.models import WorkflowStatusString as S
from dbos_nb.storage import rate_ledger
from dbos_nb.storage.schema import transaction_outputs
from dbos_nb.storage.store import StepPreflight

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_RETRY_WAIT_SEC = 3600.0


def check_live(rt: Runtime, wf: RunningWorkflow, pre: StepPreflight | None = None) -> None:
    """Raise WorkflowPreempted if this execution must stop before its next operation."""
    if rt.stopping.is_set():
        raise WorkflowPreempted(wf.workflow_id, "shutdown")
    if wf.preempt_reason is not None:
        raise WorkflowPreempted(wf.workflow_id, wf.preempt_reason)
    # Past its deadline before anything else: the sweep that cancels it may have been first,
    # and then it reads CANCELLED, but it timed out.
    deadline = wf.deadline_ms
    if deadline is not None and rt.now_ms() >= deadline:
        cancel_overdue(rt)
        raise WorkflowPreempted(wf.workflow_id, "timed out")
    if pre is not None and pre.status is not None and pre.status != S.PENDING.value:
        reason = "cancelled" if pre.status == S.CANCELLED.value else f"now {pre.status}"
        raise WorkflowPreempted(wf.workflow_id, reason)
    if pre is not None and pre.owner_xid is not None and pre.owner_xid != wf.owner_xid:
        raise WorkflowPreempted(wf.workflow_id, "taken over by another execution")


def cancel_overdue(rt: Runtime) -> None:
    """Cancel every workflow past its deadline: its children that share the deadline (they
    inherited it) with it, in one transaction, so that the parent never sees a child's
    cancellation as an ordinary error; those that opted out of it run on."""
    cancelled = rt.store.cancel_overdue(rt.now_ms())
    rt.ended_elsewhere(cancelled, "timed out")


def preempt_lost(rt: Runtime) -> None:
    """Stop, at their next operation, local executions whose workflow was cancelled or taken
    over by another process. PostgreSQL tells us by notification; without notifications (SQLite)
    the scheduler calls this on every sweep."""
    owners = rt.running_owners()
    if not owners:
        return
    by_reason: dict[str, list[str]] = {}
    for wid, reason in rt.store.lost_executions(owners).items():
        by_reason.setdefault(reason, []).append(wid)
    for reason, ids in by_reason.items():
        rt.preempt(ids, reason)


def begin_operation(rt: Runtime, wf: RunningWorkflow, name: str) -> tuple[int, StepPreflight]:
    """Take the next operation number and read what is recorded for it. Any operation but a
    read first writes the records of the reads before it (see `defer_read`)."""
    if wf.deferred and name not in DEFERRABLE:
        check_live(rt, wf)  # an execution told to stop writes nothing more
        write_deferred(rt, wf)
    fid = wf.take_function_id()
    if fid > wf.last_recorded_fid:
        # Nothing can be recorded past what this execution found at its start (another
        # execution's record would make our own insert return it). A cancel from this process
        # preempts us directly; one from another process arrives by notification (PostgreSQL)
        # or the scheduler's sweep (`preempt_lost`): the in-memory checks suffice.
        pre = StepPreflight(S.PENDING.value, None, False, None, None, None, None, wf.owner_xid)
    else:
        pre = rt.store.step_preflight(wf.workflow_id, fid)
    check_live(rt, wf, pre)
    if pre.recorded and pre.function_name != name:
        raise DBOSUnexpectedStepError(
            f"workflow {wf.workflow_id!r} recorded {pre.function_name!r} as operation {fid} but "
            f"replay called {name!r}: the workflow's code is not deterministic or has changed"
        )
    if wf.ledger_entry is not None:
        # The work really starts now: count the rate-limited start from here, not the claim.
        queue_name, claimed_at = wf.ledger_entry
        wf.ledger_entry = None
        rate_ledger.record_real_start(rt.db, queue_name, wf.workflow_id, claimed_at, rt.now_ms)
    return fid, pre


def replay(pre: StepPreflight) -> Any:
    """Return or raise a recorded outcome."""
    if pre.error is not None:
        error = serialization.load_error(pre.error)
        if error is not None:
            raise error
    return serialization.loads(pre.output)


def call_step(rt: Runtime, reg: Registration, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a step: checkpointed, with its retries, inside a workflow. Outside one, or inside
    another step, it is a plain call of the function, as in DBOS: no retries (the enclosing
    step's retries already cover it) and no step of its own for `DBOS.step_id`."""
    __tracebackhide__ = True  # IPython and pytest leave this frame out of tracebacks
    ctx = current()
    wf = ctx.workflow
    if wf is None or ctx.step is not None:
        return reg.func(*args, **kwargs)
    fid, pre = begin_operation(rt, wf, reg.name)
    if pre.recorded:
        return replay(pre)
    started = rt.now_ms()
    try:
        value = _run_attempts(rt, reg, ctx, fid, args, kwargs)
    except Exception as exc:
        return record_step_error(rt, wf, fid, reg.name, started, exc)
    return record_step_value(rt, wf, fid, reg.name, started, value)


def record_step_value(
    rt: Runtime,
    wf: RunningWorkflow,
    fid: int,
    name: str,
    started: int,
    value: Any,
    child_workflow_id: str | None = None,
) -> Any:
    """Checkpoint a step's result; returns the recorded one (another execution's, if first)."""
    output = serialization.dumps(value)
    existing = _record(rt, wf, fid, name, started, output, None, child_workflow_id)
    return replay(existing) if existing is not None else value


def record_step_error(
    rt: Runtime,
    wf: RunningWorkflow,
    fid: int,
    name: str,
    started: int,
    exc: Exception,
    child_workflow_id: str | None = None,
) -> Any:
    """Checkpoint a step's failure and raise it (or return another execution's record)."""
    __tracebackhide__ = True
    error, stored = serialization.dump_error_as_stored(exc)
    existing = _record(rt, wf, fid, name, started, None, error, child_workflow_id)
    if existing is not None:
        return replay(existing)
    if stored is not exc:
        # The workflow sees what a replay will see (the stand-in of an error that does not
        # survive pickling), so that its `except` clauses take the same path in both: else a
        # workflow that succeeded would fail once recovered, resumed or forked.
        raise serialization.mark_recorded(stored) from exc
    raise serialization.mark_recorded(exc)


def _record(
    rt: Runtime,
    wf: RunningWorkflow,
    fid: int,
    name: str,
    started: int,
    output: bytes | None,
    error: bytes | None,
    child_workflow_id: str | None,
) -> StepPreflight | None:
    """Record an operation's outcome for this execution (see `store.record_step`), after
    the reads that came before it (see `defer_read`)."""
    if wf.deferred:
        write_deferred(rt, wf)
    return rt.store.record_step(
        wf.workflow_id,
        wf.owner_xid,
        fid,
        name,
        output,
        error,
        started,
        rt.now_ms(),
        child_workflow_id=child_workflow_id,
    )


# -- DBOS calls made by workflow code -----------------------------------------------------------


def workflow_code() -> RunningWorkflow | None:
    """The workflow whose own code is running here: None outside a workflow and inside a step
    or transaction, where DBOS's calls are plain calls."""
    ctx = current()
    return ctx.workflow if ctx.step is None else None


def call_as_operation(
    rt: Runtime, name: str, call: Callable[[], T], child_workflow_id: str | None = None
) -> T:
    """Make a DBOS call (`DBOS.fork_workflow`, `handle.get_result`, ...) an operation of the
    workflow whose code makes it, under DBOS's name for it ("DBOS.forkWorkflow"), as DBOS
    does: a replay returns or raises what the first run got and acts no second time (a fork
    would otherwise be made, and paid for, once per recovery). Elsewhere a plain call.
    `child_workflow_id`: the workflow it waits for, shown in the step listing."""
    __tracebackhide__ = True
    wf = workflow_code()
    if wf is None:
        return call()
    fid, pre = begin_operation(rt, wf, name)
    if pre.recorded:
        return cast(T, replay(pre))
    started = rt.now_ms()
    try:
        value = call()
    except Exception as exc:
        return cast(T, record_call_error(rt, wf, fid, name, started, exc, child_workflow_id))
    if name in DEFERRABLE and wf.deferred is not None:
        return defer_read(rt, wf, fid, name, started, value, child_workflow_id)
    return cast(T, record_step_value(rt, wf, fid, name, started, value, child_workflow_id))


def record_call_error(
    rt: Runtime,
    wf: RunningWorkflow,
    fid: int,
    name: str,
    started: int,
    exc: Exception,
    child_workflow_id: str | None,
) -> Any:
    """Checkpoint the failure of a DBOS call made by workflow code (see `call_as_operation`),
    unless it is no outcome of the call: the workflow was told to stop meanwhile (an awaited
    child cancelled or timed out with its parent, a shutdown: the workflow stops, and the
    execution that goes on makes the call again), or dbos_nb lost its own database."""
    check_live(rt, wf)
    from dbos_nb.core.workflows import lost_database  # workflows sits above this module

    if lost_database(exc):
        raise exc
    # A cancel from another process reaches this execution only at the next sweep or
    # notification, after the awaited child's cancellation may already have ended the wait:
    # the workflow's own row tells (one read, on failures only).
    check_live(rt, wf, rt.store.step_preflight(wf.workflow_id, fid))
    return record_step_error(rt, wf, fid, name, started, exc, child_workflow_id)


class Retrier:
    """The retry policy of one step call: plain retries with back-off, and 429 answers waited out
    (with the whole queue) without using up the retries."""

    def __init__(self, rt: Runtime, reg: Registration, wf: RunningWorkflow | None) -> None:
        self.rt, self.reg, self.wf = rt, reg, wf
        self.attempts = reg.max_attempts if reg.retries_allowed else 1
        self.attempt = 0
        self.throttled = 0
        self.errors: list[BaseException] = []

    def frame(self, fid: int) -> StepFrame:
        return StepFrame(
            step_id=fid,
            name=self.reg.name,
            # What DBOS.step_status reports, as DBOS does: the attempt counted from 0, and
            # neither number for a step without retries.
            attempt=self.attempt if self.reg.retries_allowed else None,
            max_attempts=self.attempts if self.reg.retries_allowed else None,
        )

    def on_error(self, exc: Exception) -> float:
        """Seconds to wait before the next try; raises when the step has failed for good."""
        __tracebackhide__ = True
        reg, wf = self.reg, self.wf
        retry_after = rate_limit_delay(exc)
        if retry_after is not None and self.throttled < reg.max_rate_limit_retries:
            # A 429 is no failure of the step: wait as told, with the whole queue.
            self.throttled += 1
            wait = retry_after or min(RATE_LIMIT_BACKOFF_SEC * 2 ** (self.throttled - 1), 60.0)
            if wf is not None and wf.queue_name is not None:
                self.rt.store.pause_queue(wf.queue_name, self.rt.now_ms() + round(wait * 1000))
            logger.info(
                "step %r was rate limited (%s); retrying in %.2f s, queue %r paused",
                reg.name,
                exc,
                wait,
                wf.queue_name if wf else None,
            )
            return wait
        if not reg.retries_allowed:
            raise exc
        self.errors.append(exc)
        self.attempt += 1
        if self.attempt == self.attempts:
            raise DBOSMaxStepRetriesExceeded(reg.name, self.attempts, self.errors)
        wait = min(
            reg.interval_seconds * reg.backoff_rate ** (self.attempt - 1), MAX_RETRY_WAIT_SEC
        )
        logger.warning(
            "step %r attempt %d/%d failed (%r); retrying in %.2f s",
            reg.name,
            self.attempt,
            self.attempts,
            exc,
            wait,
        )
        return wait


def _run_attempts(
    rt: Runtime,
    reg: Registration,
    ctx: Context,
    fid: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    __tracebackhide__ = True
    retrier = Retrier(rt, reg, ctx.workflow)
    while True:
        try:
            with using(derive(step=retrier.frame(fid))):
                return reg.func(*args, **kwargs)
        except Exception as exc:
            _pause(rt, ctx.workflow, retrier.on_error(exc))


def _pause(rt: Runtime, wf: RunningWorkflow | None, seconds: float) -> None:
    if wf is None:
        time.sleep(seconds)
    elif wf.interrupt.wait(seconds):
        check_live(rt, wf)


RATE_LIMIT_BACKOFF_SEC = 1.0


def rate_limit_delay(exc: BaseException) -> float | None:
    """None if `exc` is not a rate-limit answer; else the seconds to wait (0: not said).

    Recognizes RateLimited and HTTP 429 errors of httpx, requests and the openai client (their
    exceptions carry the response with its Retry-After header), but not a 429 that no wait
    cures (`waiting_does_not_cure`).
    """
    if isinstance(exc, RateLimited):
        return float(exc.retry_after or 0.0)
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", None)
    if status != 429 or _waiting_does_not_cure(exc, response):
        return None
    headers: Any = getattr(response, "headers", None) or {}
    for key, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(key) or headers.get(key.title())
        if value is not None:
            try:
                seconds = float(value) * scale
            except ValueError:
                continue
            if math.isfinite(seconds):
                return min(max(seconds, 0.0), MAX_RETRY_AFTER_SEC)
    return 0.0


def _waiting_does_not_cure(exc: BaseException, response: Any) -> bool:
    """Whether a 429 says something that no wait fixes (out of credit, or a request larger
    than the whole limit: see `waiting_does_not_cure`) rather than "too many requests": it is
    an ordinary error, not a pause of the whole queue."""
    if getattr(exc, "code", None) == "insufficient_quota":
        return True
    bodies: list[Any] = [getattr(exc, "body", None)]
    with contextlib.suppress(Exception):  # no response, or not JSON
        bodies.append(response.json())
    return any(
        waiting_does_not_cure(body.get("error", body) if isinstance(body, dict) else None)
        for body in bodies
    )


def report_usage(rt: Runtime, tokens: int | None, cost: float | None) -> None:
    """Record a step's real token use and cost (see DBOS.report_usage)."""
    ctx = current()
    wf = ctx.workflow
    if wf is None or ctx.step is None:
        raise DbosNbError(
            "DBOS.report_usage() records what a step consumed: call it inside a @DBOS.step "
            "(a report outside a step would be counted again when the workflow replays)"
        )
    # Numbers as a provider's client or numpy gives them (np.int64, Decimal) are taken: the
    # paid call has been made, and a refusal here would make the step's retry pay it again.
    used = None if tokens is None else whole_number(tokens, 2**63)
    if tokens is not None and used is None:
        raise DbosNbError(f"tokens must be a non-negative integer below 2**63, got {tokens!r}")
    spent = None if cost is None else amount(cost)
    if cost is not None and spent is None:
        raise DbosNbError(f"cost must be a finite, non-negative number, got {cost!r}")
    rt.store.report_usage(wf.workflow_id, used, spent, replace_estimate=not wf.usage_reported)
    wf.usage_reported = True
    if wf.queue_name is not None:
        # A report below the estimate frees token budget: the queue's next claim may succeed.
        rt.wake_scheduler(wf.queue_name)


# -- transactions -------------------------------------------------------------------------------

_SERIALIZATION_FAILURE = "40001"
_ISOLATION_LEVELS = {"SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED"}


def validate_isolation_level(level: str | None) -> str | None:
    """Upper-case and check a transaction isolation level."""
    if level is None:
        return None
    normalized = level.upper().replace("_", " ")
    if normalized not in _ISOLATION_LEVELS:
        raise ValueError(
            f"unknown isolation level {level!r}; use one of {sorted(_ISOLATION_LEVELS)}"
        )
    return normalized


def call_transaction(
    rt: Runtime, reg: Registration, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run a transaction; inside a workflow its checkpoint commits with its own writes."""
    __tracebackhide__ = True
    ctx = current()
    wf = ctx.workflow
    if wf is None or ctx.step is not None:
        return _run_in_session(rt, reg, ctx, None, None, args, kwargs)
    fid, pre = begin_operation(rt, wf, reg.name)
    if pre.recorded:
        return replay(pre)
    started = rt.now_ms()
    # The app-database checkpoint may exist without the system one if we crashed in between.
    app_record = _app_checkpoint(rt, wf.workflow_id, fid, reg.name)
    if app_record is not None:
        output, error = app_record
    else:
        try:
            value = _run_in_session(rt, reg, ctx, wf, fid, args, kwargs)
            output, error = serialization.dumps(value), None
        except IntegrityError as exc:
            # Another execution of this workflow (a take-over or a resume racing this one)
            # committed this transaction after the check above: its checkpoint's key refused
            # ours, and our writes rolled back with it. Its outcome is the transaction's.
            # Otherwise the conflict was the application's own.
            committed = _app_checkpoint(rt, wf.workflow_id, fid, reg.name)
            output, error = committed or (None, serialization.dump_error(exc))
        except Exception as exc:
            output, error = None, serialization.dump_error(exc)
    existing = rt.store.record_step(
        wf.workflow_id, wf.owner_xid, fid, reg.name, output, error, started, rt.now_ms()
    )
    return replay(existing if existing is not None else _as_preflight(output, error))


def _as_preflight(output: bytes | None, error: bytes | None) -> StepPreflight:
    return StepPreflight(S.PENDING.value, None, True, None, output, error, None, None)


def _app_checkpoint(
    rt: Runtime, workflow_id: str, fid: int, name: str
) -> tuple[bytes | None, bytes | None] | None:
    """The outcome of transaction `name` as operation `fid`, if its checkpoint committed; a
    checkpoint of another transaction there is a replay that went astray, as for any record."""
    t = transaction_outputs
    with rt.app_db.read() as conn:
        row = conn.execute(
            select(t.c.output, t.c.error, t.c.function_name).where(
                t.c.workflow_uuid == workflow_id, t.c.function_id == fid
            )
        ).first()
    if row is None:
        return None
    if row[2] != name:
        raise DBOSUnexpectedStepError(
            f"workflow {workflow_id!r} committed transaction {row[2]!r} as operation {fid} but "
            f"replay called {name!r}: the workflow's code is not deterministic or has changed"
        )
    return row[0], row[1]


def _run_in_session(
    rt: Runtime,
    reg: Registration,
    ctx: Context,
    wf: RunningWorkflow | None,
    fid: int | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    delay = 0.01
    for attempt in range(50):
        try:
            with rt.app_db.user_transaction(reg.isolation_level) as conn:
                session = Session(bind=conn)
                frame = StepFrame(
                    step_id=fid if fid is not None else -1, name=reg.name, session=session
                )
                with using(derive(step=frame)):
                    value = reg.func(*args, **kwargs)
                session.flush()
                if wf is not None and fid is not None:
                    conn.execute(
                        transaction_outputs.insert().values(
                            workflow_uuid=wf.workflow_id,
                            function_id=fid,
                            function_name=reg.name,
                            output=serialization.dumps(value),
                            created_at=rt.now_ms(),
                        )
                    )
                session.close()
                return value
        except OperationalError as exc:
            code = getattr(exc.orig, "sqlstate", None)
            if code != _SERIALIZATION_FAILURE or attempt == 49:
                raise
            logger.info("transaction %r hit a serialization failure; retrying", reg.name)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


def current_session() -> Session:
    """The SQLAlchemy session of the transaction in progress."""
    frame = current().step
    if frame is None or frame.session is None:
        raise RuntimeError("DBOS.sql_session is only available inside a @DBOS.transaction function")
    return frame.session


# -- durable sleep ------------------------------------------------------------------------------


def require_workflow_for_sleep(wf: RunningWorkflow | None) -> RunningWorkflow:
    """The running workflow a durable sleep records its wake-up time in; outside one, an
    error (as in DBOS) rather than a sleep that nothing records."""
    if wf is None:
        raise DbosNbError(
            "DBOS.sleep() must be called inside a workflow (it records its wake-up time "
            "there); outside one, use time.sleep() or asyncio.sleep()"
        )
    return wf


def sleep_until(rt: Runtime, wf: RunningWorkflow, seconds: float) -> int:
    """The durable sleep's wake-up time: recorded by the first run, read back on replay."""
    fid, pre = begin_operation(rt, wf, "DBOS.sleep")
    if pre.recorded:
        return int(serialization.loads(pre.output))
    now = rt.now_ms()
    wake_at = now + round(seconds * 1000)
    rt.store.record_step(
        wf.workflow_id,
        wf.owner_xid,
        fid,
        "DBOS.sleep",
        serialization.dumps(wake_at),
        None,
        now,
        now,
    )
    return wake_at


def durable_sleep(rt: Runtime, seconds: float) -> None:
    """Sleep; inside a workflow the wake-up time is recorded so a resumed sleep does not restart."""
    ctx = current()
    if ctx.step is not None:
        time.sleep(seconds)
        return
    wf = require_workflow_for_sleep(ctx.workflow)
    wake_at = sleep_until(rt, wf, seconds)
    while True:
        remaining = (wake_at - rt.now_ms()) / 1000
        if remaining <= 0:
            return
        # Wake at least every 50 ms so that an injected clock moving forward is noticed.
        if wf.interrupt.wait(min(remaining, 0.05)):
            check_live(rt, wf)
