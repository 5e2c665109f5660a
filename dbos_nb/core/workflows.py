"""Starting and running workflows: direct calls, background starts, enqueues, claimed work.

A workflow's row is written before its body runs (status PENDING for a start, ENQUEUED for an
enqueue), with its serialized inputs, so a crash at any later point leaves enough to resume it.
Writing the row is idempotent by workflow id: starting an id that exists returns that workflow's
outcome instead of running it again.

Inside a workflow, starting or enqueueing a child is itself an operation of the parent: the child
gets the deterministic id `<parent>-<operation number>`, so a replaying parent finds the same child.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import hashlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dbos_nb import serialization
from dbos_nb.core.context import (
    Context,
    RunningWorkflow,
    check_id_length,
    check_partition_key,
    current,
    using,
)
from dbos_nb.core.deferred_reads import write_deferred
from dbos_nb.core.registry import Registration, check_calls
from dbos_nb.core.runtime import WAKE_ENQUEUED, WAKE_FREED, DirectSlot, DirectStarter, Runtime
from dbos_nb.core.steps import begin_operation, cancel_overdue
from dbos_nb.core.waiters import outcome_of, wait_for_result
from dbos_nb.errors import (
    DATABASE_LOST,
    READ_RECORDED_ELSEWHERE,
    DBOSAwaitedWorkflowCancelledError,
    DBOSConflictingWorkflowError,
    DBOSMaxRecoveryAttemptsExceededError,
    DbosNbError,
    DBOSNonExistentWorkflowError,
    DBOSNonSerializableError,
    DBOSWorkflowTimedOutError,
    UnknownWorkflowNameError,
    WorkflowPreempted,
)
from dbos_nb.ids import new_token, new_workflow_id
from dbos_nb.models import INTERNAL_QUEUE, STEP_WORKFLOW_PREFIX, ClaimedWorkflow
from dbos_nb.models import WorkflowStatusString as S
from dbos_nb.storage.reconnect import is_lost, retrying
from dbos_nb.storage.store import NewWorkflow, ParentRecord

# Status strings as plain constants: an enum member's `.value` is a descriptor call.
_PENDING = S.PENDING.value
_ENQUEUED = S.ENQUEUED.value

logger = logging.getLogger(__name__)


@dataclass
class StartPlan:
    """Who a new workflow is: its id, its parent link, and options taken from the context."""

    workflow_id: str
    parent: RunningWorkflow | None
    parent_function_id: int | None
    recorded_child_id: str | None
    timeout_ms: int | None
    inherited_deadline_ms: int | None
    ctx: Context
    # The row's application version: the runtime's, unless the caller gives one.
    app_version: str | None


# `write_started`'s answer for a child that a parent's replay finds recorded but deleted since.
CHILD_DELETED: dict[str, Any] = {}

# `enqueue_workflow`'s default: the row records the runtime's application version.
RUNTIME_VERSION: Any = object()


def plan_start(rt: Runtime, workflow_name: str) -> StartPlan:
    """Decide the id of a workflow about to start, taking an operation number in the parent."""
    ctx = current()
    parent = ctx.workflow if ctx.step is None else None
    explicit = _consume_id(ctx)
    fid: int | None = None
    recorded: str | None = None
    if parent is not None:
        fid, pre = begin_operation(rt, parent, workflow_name)
        recorded = pre.child_workflow_id if pre.recorded else None
    if recorded is not None:
        wid = recorded
    elif explicit is not None:
        wid = explicit
    elif parent is not None and fid is not None:
        wid = check_id_length(
            f"{parent.workflow_id}-{fid}", "a child workflow's id (its parent's id and '-<n>')"
        )
    else:
        wid = new_workflow_id()
    timeout_ms: int | None = None
    inherited: int | None = None
    if ctx.timeout_sec is None:
        pass  # explicitly no timeout
    elif isinstance(ctx.timeout_sec, int | float):
        timeout_ms = round(ctx.timeout_sec * 1000)
    elif parent is not None:
        inherited = parent.deadline_ms
    return StartPlan(wid, parent, fid, recorded, timeout_ms, inherited, ctx, rt.app_version)


def replaying_a_recorded_operation(rt: Runtime) -> bool:
    """Whether the calling workflow code's next operation is recorded already: a replay, in
    which an enqueue returns the recorded child whatever became of its queue or its name
    since (deleted, say). Outside workflow code (or in a step), False. Asked only where a
    refusal would otherwise break a replay: it may cost a read."""
    ctx = current()
    wf = ctx.workflow if ctx.step is None else None
    if wf is None or wf.next_function_id > wf.last_recorded_fid:
        return False
    return rt.store.step_preflight(wf.workflow_id, wf.next_function_id).recorded


def _consume_id(ctx: Context) -> str | None:
    wid = ctx.next_workflow_id
    if wid is not None:
        ctx.next_workflow_id = None
    return wid


def _new_row(
    rt: Runtime,
    reg: Registration | None,
    plan: StartPlan,
    inputs: bytes,
    name: str,
    *,
    status: str,
    queue_name: str | None = None,
    owner: str | None = None,
) -> NewWorkflow:
    # (No registration: a name enqueued for whichever process registers it, which runs its
    # own version, as for a client's enqueue.)
    version = rt.ensure_stored(reg) if reg is not None else None
    now = rt.now_ms()
    deadline = plan.inherited_deadline_ms
    started: int | None = None
    if status == _PENDING:
        started = now
        if plan.timeout_ms is not None:
            deadline = now + plan.timeout_ms
    ctx = plan.ctx
    if queue_name is not None:  # (blocks nest: the key and the id may come from two of them)
        check_partition_key(ctx.queue_partition_key, ctx.deduplication_id)
    return NewWorkflow(
        workflow_id=plan.workflow_id,
        name=name,
        inputs=inputs,
        status=status,
        created_at=now,
        class_name=reg.class_name if reg is not None else None,
        executor_id=rt.executor_id if status == _PENDING else None,
        owner_xid=owner,
        application_version=plan.app_version,
        queue_name=queue_name,
        priority=ctx.priority or 0,
        deduplication_id=ctx.deduplication_id if queue_name else None,
        workflow_timeout_ms=plan.timeout_ms,
        workflow_deadline_epoch_ms=deadline,
        parent_workflow_id=plan.parent.workflow_id if plan.parent else None,
        parent_function_id=plan.parent_function_id,
        started_at_epoch_ms=started,
        recovery_attempts=1 if status == _PENDING else 0,
        function_hash=version,
        token_estimate=ctx.token_estimate if queue_name else None,
        queue_partition_key=ctx.queue_partition_key if queue_name else None,
    )


def _check_same_function(wid: str, existing: dict[str, Any], name: str) -> None:
    if existing["name"] != name:
        raise DBOSConflictingWorkflowError(
            wid, f"it belongs to workflow {existing['name']!r}, not {name!r}"
        )


def workflow_name_of(reg: Registration) -> str:
    """The name a workflow row records for this function (steps run as one-operation wfs)."""
    return reg.name if reg.kind == "workflow" else STEP_WORKFLOW_PREFIX + reg.name


# -- direct call and background start ----------------------------------------------------------


def write_started(
    rt: Runtime, reg: Registration, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Execution, dict[str, Any] | None]:
    """Write the PENDING row of a workflow started now (direct call or background start).

    Returns the execution to run, and the existing row instead when the id was taken (then
    nothing was written and nothing must run).
    """
    refuse_enqueue_options(current())
    name = workflow_name_of(reg)
    inputs = serialization.dump_inputs(reg.name, args, kwargs)
    plan = plan_start(rt, name)
    owner = new_token()
    row = _new_row(rt, reg, plan, inputs, name, status=_PENDING, owner=owner)
    mark = rt.stop_mark()
    existing: dict[str, Any] | None
    if plan.recorded_child_id is not None:
        # A parent's replay: its child was started already. One deleted since is not written
        # (and run, and paid for) again: waiting for it raises DBOSNonExistentWorkflowError.
        existing = rt.store.get_workflow(plan.workflow_id) or CHILD_DELETED
    else:
        existing = rt.store.insert_workflow(row)
    if existing is not None and existing.get("owner_xid") == owner:
        # This very write, committed by an attempt whose reply a lost connection swallowed
        # (`reconnect` ran it again): it is ours to run, not another's to wait for.
        existing = None
    if existing is not None and existing is not CHILD_DELETED:
        _check_same_function(plan.workflow_id, existing, name)
    ex = Execution(
        reg,
        plan.workflow_id,
        owner,
        args,
        kwargs,
        row.workflow_deadline_epoch_ms,
        fresh=True,
        stop_mark=mark,
    )
    return ex, existing


def refuse_enqueue_options(ctx: Context) -> None:
    """Options of `SetEnqueueOptions` around a workflow that is not enqueued (a direct call,
    `start_workflow`) would be dropped or mean nothing: refused, as DBOS does."""
    given = [
        name
        for name, value in (
            ("deduplication_id", ctx.deduplication_id),
            ("priority", ctx.priority),
            ("token_estimate", ctx.token_estimate),
            ("queue_partition_key", ctx.queue_partition_key),
        )
        if value is not None
    ]
    if given:
        raise DbosNbError(
            f"SetEnqueueOptions({', '.join(given)}) applies to workflows enqueued on a queue, "
            "not to one called directly or started with start_workflow: enqueue it, or move "
            "the call out of the block"
        )


def call_workflow(
    rt: Runtime, reg: Registration, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run a workflow in the calling thread and return its result (DBOS's direct call)."""
    __tracebackhide__ = True  # IPython and pytest leave this frame out of tracebacks
    ex, existing = write_started(rt, reg, args, kwargs)
    if existing is not None:
        return _await_existing(rt, ex.workflow_id, existing)
    return run_execution(rt, ex)


def start_workflow(
    rt: Runtime, reg: Registration, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """Write the workflow's row, then run it in the background; returns its id at once."""
    if rt.db.in_write():
        # Inside an open transaction (SQLite: an application transaction that starts a
        # workflow) the row commits only with it: run it once committed, from the internal
        # queue, never for a row rolled back. (`write_started` checks the other way.)
        refuse_enqueue_options(current())
        return enqueue_workflow(rt, INTERNAL_QUEUE, reg, args, kwargs)
    ex, existing = write_started(rt, reg, args, kwargs)
    if existing is None:
        dispatch(rt, ex)
    return ex.workflow_id


def enqueue_workflow(
    rt: Runtime,
    queue_name: str,
    reg: Registration,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    app_version: str | None = RUNTIME_VERSION,
) -> str:
    """Write an ENQUEUED row on the queue and wake the local scheduler; returns the id."""
    _check_registered(rt, reg)
    name = workflow_name_of(reg)
    inputs = serialization.dump_inputs(reg.name, args, kwargs)
    plan = plan_start(rt, name)
    if plan.recorded_child_id is not None:
        # A parent's replay: its child was enqueued already (and may have run and been
        # deleted since, which must not make it run again).
        return plan.recorded_child_id
    if app_version is not RUNTIME_VERSION:
        plan.app_version = app_version
    # Inside an open transaction (SQLite: an application transaction that enqueues), the row
    # commits only with it: a workflow started at once could run for a row rolled back.
    if not rt.db.in_write() and _start_directly(rt, reg, plan, inputs, name, queue_name):
        return plan.workflow_id
    row = _new_row(rt, reg, plan, inputs, name, status=_ENQUEUED, queue_name=queue_name)
    return _insert_enqueued(rt, row, queue_name)


def enqueue_named(
    rt: Runtime,
    queue_name: str,
    name: str,
    name_in_row: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    app_version: str | None,
) -> str:
    """Enqueue by name a function that this process does not register, for whichever process
    does (a client's enqueue, made from workflow code it is recorded as a child); returns
    the id."""
    inputs = serialization.dump_inputs(name, args, kwargs)
    plan = plan_start(rt, name_in_row)
    if plan.recorded_child_id is not None:  # a parent's replay (see `enqueue_workflow`)
        return plan.recorded_child_id
    plan.app_version = app_version
    row = _new_row(rt, None, plan, inputs, name_in_row, status=_ENQUEUED, queue_name=queue_name)
    return _insert_enqueued(rt, row, queue_name)


def _insert_enqueued(rt: Runtime, row: NewWorkflow, queue_name: str) -> str:
    existing = rt.store.insert_workflow(row)
    if existing is not None:
        _check_same_function(row.workflow_id, existing, row.name)
    else:
        rt.wake_scheduler(queue_name, WAKE_ENQUEUED)
    return row.workflow_id


def _check_registered(rt: Runtime, reg: Registration) -> None:
    """Refuse to enqueue a function whose name nothing in this process registers: the process
    claims only what it defines, so the work would wait, unseen, for another process. (Its
    decorator ran before `DBOS.destroy(destroy_registry=True)` cleared the registry.) A name
    registered again by another definition is fine: the version enqueued is stored and runs.
    A worker claims every stored function, and the code it loaded enqueues unregistered ones."""
    if not rt.resolver.runs_stored and rt.registry.get(reg.name) is None:
        raise UnknownWorkflowNameError(
            reg.name,
            " in this process (DBOS.destroy(destroy_registry=True) removed its registration); "
            "run its decorator (its cell) again before enqueueing it",
        )


def _start_directly(
    rt: Runtime, reg: Registration, plan: StartPlan, inputs: bytes, name: str, queue_name: str
) -> bool:
    """Enqueue and claim in one write, when this process serves the queue and the queue has no
    limit shared between processes (nothing to wait for, nothing to count but this process's
    own workflows, for a worker_concurrency): the workflow starts at once, here, without a
    claim round trip. False (nothing written) when that does not apply."""
    direct = rt.direct
    slot = None if direct is None else direct.reserve(queue_name)
    if direct is None or slot is None:
        return False
    try:
        # The row as a claim would leave it: PENDING, owned by a new execution of this process
        # (built inside: storing a new function version is a write that can fail too).
        started = _new_row(
            rt, reg, plan, inputs, name, status=_PENDING, queue_name=queue_name, owner=new_token()
        )
    except BaseException:
        direct.cancel_reservation(queue_name)
        raise
    mark = rt.stop_mark()
    try:
        written = rt.store.insert_started_if_unshared(
            started, started.created_at, worker_concurrency=slot.worker_concurrency
        )
    except Exception:  # the statement failed: nothing was written
        direct.cancel_reservation(queue_name)
        raise
    except BaseException:
        # Interrupted (Ctrl-C) while the write waited for its commit: it stays queued and may
        # still land, PENDING and owned by this process, which would then never run it. Its
        # outcome is settled on a thread; the caller gets the interrupt at once.
        threading.Thread(
            target=_settle_interrupted_start,
            args=(rt, direct, started, slot, reg.is_async, mark),
            name="dbos_nb-settle-start",
            daemon=True,
        ).start()
        raise
    if not written:
        direct.cancel_reservation(queue_name)
        return False
    _hand_over(rt, direct, started, reg.is_async, mark)
    return True


def _hand_over(
    rt: Runtime, direct: DirectStarter, started: NewWorkflow, is_async: bool, mark: int | None
) -> None:
    """Run a workflow written already started here. If the workers stopped meanwhile
    (`DBOS.destroy()` racing the enqueue, perhaps after its own return of unfinished work),
    the row goes back to its queue for whichever process serves it next: the enqueue stands."""
    claimed = _as_claimed(started)
    claimed.stop_mark = mark
    if direct.adopt(claimed, is_async):
        return
    try:
        rt.store.requeue_workflow(started.workflow_id, rt.now_ms(), started.owner_xid)
    except Exception:
        # Left PENDING and owned by this executor id, which has unregistered: recovered
        # when a process launches with that id again.
        logger.warning(
            "could not put %s back in its queue after the worker stopped",
            started.workflow_id,
            exc_info=True,
        )


def _as_claimed(started: NewWorkflow) -> ClaimedWorkflow:
    """A workflow written already started, as a claim would have handed it over."""
    return ClaimedWorkflow(
        workflow_id=started.workflow_id,
        name=started.name,
        inputs=started.inputs,
        queue_name=str(started.queue_name),
        deadline_epoch_ms=started.workflow_deadline_epoch_ms,
        recovery_attempts=1,
        owner_xid=str(started.owner_xid),
        function_hash=started.function_hash,
    )


def _settle_interrupted_start(
    rt: Runtime,
    direct: DirectStarter,
    started: NewWorkflow,
    slot: DirectSlot,
    is_async: bool,
    mark: int,
) -> None:
    """After an interrupted direct start: write the same row again (idempotent for this owner;
    through the same group committer, so once it returns the interrupted write has landed or
    failed), then run the workflow if the row is this start's, else give the slot back."""
    queue_name = str(started.queue_name)
    try:
        rt.store.insert_started_if_unshared(
            started, started.created_at, worker_concurrency=slot.worker_concurrency
        )
        row = rt.store.get_workflow(started.workflow_id)
    except Exception:
        # Unknown: a row that landed stays PENDING for recovery at the next launch.
        logger.exception("could not settle the interrupted enqueue of %s", started.workflow_id)
        direct.cancel_reservation(queue_name)
        return
    if row is not None and row["status"] == _PENDING and row["owner_xid"] == started.owner_xid:
        _hand_over(rt, direct, started, is_async, mark)
    else:
        direct.cancel_reservation(queue_name)


@contextlib.contextmanager
def cycle_collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector while a bulk enqueue builds its objects.

    A batch of 100,000 items allocates several objects per item (arguments, pickles, ids, rows,
    handles), none of them in a reference cycle; the collector would run hundreds of times
    meanwhile, each pass over every live object, and cost about a fifth of the enqueue. Only
    cycles wait for it (any other object is freed as usual), and it is switched back on only
    if it was on, so concurrent or nested bulk enqueues leave it as they found it.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def enqueue_many(
    rt: Runtime,
    queue_name: str,
    reg: Registration,
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    batch_id: str | None,
    token_estimates: list[int | None] | None = None,
    *,
    check_items: bool = False,
) -> list[str]:
    """Enqueue many calls in one transaction with ids `<batch>/<index>`; returns every id.

    Ids that already exist are not written again, so enqueueing the same batch id twice is
    harmless. Inside a workflow the whole batch is one operation of the parent.
    `check_items` (with a batch id): keep a digest of the serialized calls with the batch,
    and raise BatchItemsConflictError, writing nothing, when the batch exists with another.
    """
    with cycle_collector_paused():
        return _enqueue_many(rt, queue_name, reg, calls, batch_id, token_estimates, check_items)


def _enqueue_many(
    rt: Runtime,
    queue_name: str,
    reg: Registration,
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    batch_id: str | None,
    token_estimates: list[int | None] | None,
    check_items: bool,
) -> list[str]:
    if batch_id is not None and (not isinstance(batch_id, str) or not batch_id):
        raise DbosNbError(f"batch_id must be a non-empty string, got {batch_id!r}")
    _check_registered(rt, reg)
    check_calls(reg, calls)
    ctx = current()
    if ctx.deduplication_id is not None:
        # One id cannot cover many workflows, and dropping it silently would let the batch
        # run twice: a batch id is how a whole batch is enqueued only once.
        raise DbosNbError(
            "SetEnqueueOptions(deduplication_id=...) does not apply to a batch; "
            "pass batch_id=... (map: batch=...) to enqueue it only once"
        )
    name = workflow_name_of(reg)
    inputs = serialization.dump_many_inputs(reg.name, calls)
    explicit = batch_id
    plan: StartPlan | None = None
    if ctx.workflow is not None and ctx.step is None:
        plan = plan_start(rt, name)
        if plan.recorded_child_id is not None:
            # A parent's replay: the batch was enqueued already; items deleted since are not
            # written (and run) again.
            return [f"{plan.recorded_child_id}/{index}" for index in range(len(inputs))]
        base = explicit or plan.workflow_id
    else:
        base = explicit or _consume_id(ctx) or new_workflow_id()
        plan = StartPlan(base, None, None, None, None, None, ctx, rt.app_version)
        if isinstance(ctx.timeout_sec, int | float):
            plan.timeout_ms = round(ctx.timeout_sec * 1000)
    template = _new_row(rt, reg, plan, b"", name, status=_ENQUEUED, queue_name=queue_name)
    template.parent_function_id = None
    template.deduplication_id = None
    template.batch_id = explicit
    check_id_length(f"{base}/{len(inputs) - 1}", "a batch item's id (the batch id and '/<index>')")
    ids = [f"{base}/{index}" for index in range(len(inputs))]
    estimates = token_estimates or [template.token_estimate] * len(ids)
    digest = _digest(inputs) if check_items and explicit else None
    rows = list(zip(ids, inputs, estimates, strict=True))
    parent: ParentRecord | None = None
    if plan.parent is not None and plan.parent_function_id is not None:
        # In the batch's transaction: a replay after a crash finds the batch it enqueued.
        parent = ParentRecord(
            plan.parent.workflow_id,
            plan.parent.owner_xid,
            plan.parent_function_id,
            name,
            base,
            rt.now_ms(),
        )
    rt.store.insert_enqueued_batch(template, rows, digest, parent)
    rt.wake_scheduler(queue_name, WAKE_ENQUEUED)
    return ids


def _digest(payloads: list[bytes]) -> str:
    """sha256 (hex) of serialized calls, each length-prefixed so that no two lists collide."""
    digest = hashlib.sha256()
    for payload in payloads:
        digest.update(len(payload).to_bytes(8, "big"))
        digest.update(payload)
    return digest.hexdigest()


def _await_existing(rt: Runtime, wid: str, existing: dict[str, Any]) -> Any:
    __tracebackhide__ = True
    if existing is CHILD_DELETED:
        raise DBOSNonExistentWorkflowError(wid)
    finished, value = outcome_of(wid, existing)
    if finished:
        return value
    return wait_for_result(rt.store, rt.waiters, rt.clock, wid, rt.polling_interval_sec)


# -- running a body -----------------------------------------------------------------------------


@dataclass
class Execution:
    """Everything needed to run one claimed or started workflow body."""

    reg: Registration
    workflow_id: str
    owner: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    deadline_ms: int | None
    ledger_entry: tuple[str, int] | None = None
    fresh: bool = False
    queue_name: str | None = None
    # Known highest recorded operation (from the claim); None: read it when the run begins.
    last_recorded_fid: int | None = None
    # `Runtime.stop_mark()` read before the write that made the row ours (None: not known,
    # nothing is checked).
    stop_mark: int | None = None


def begin(rt: Runtime, ex: Execution) -> RunningWorkflow | None:
    """Register the execution in this process; None if this process runs this very execution
    already. A stale execution of the workflow still running here is stopped first and waited
    for (see `register`)."""
    while True:
        running, stale = register(rt, ex)
        if stale is None:
            return running
        stale.ended.wait()


def register(rt: Runtime, ex: Execution) -> tuple[RunningWorkflow | None, RunningWorkflow | None]:
    """Register the execution: (it, None).

    (None, None) if this process runs this very execution already (e.g. recovered while a
    handle waits), or if this execution is itself stale (a claim that arrived late: the row
    names another owner): the caller then waits for the workflow's result.

    (None, the other) if another execution of the workflow still runs here, with an owner the
    row no longer names (the workflow was cancelled and resumed, or recovered, and claimed
    again meanwhile): that one is told to stop at its next operation (its writes are refused
    anyway), and the caller must wait until it has ended and register again. Left alone, the
    two would wait for each other: the new one for the old one's result, the old one refused
    at every write."""
    running = RunningWorkflow(ex.workflow_id, ex.owner, workflow_name_of(ex.reg), ex.deadline_ms)
    running.ledger_entry = ex.ledger_entry
    running.queue_name = ex.queue_name
    if ex.fresh:
        running.last_recorded_fid = -1
    elif ex.last_recorded_fid is not None and not rt.ended_after_stop(ex.workflow_id):
        running.last_recorded_fid = ex.last_recorded_fid
    else:
        running.last_recorded_fid = rt.store.last_recorded_function_id(ex.workflow_id)
    other = rt.add_running(running)
    if other is None:
        if ex.stop_mark is not None and rt.stop_mark() != ex.stop_mark:
            try:
                _stop_if_ended_meanwhile(rt, running, ex)
            except BaseException:
                # Not begun after all (the database did not answer, say): nothing may stay
                # registered, or the workflow would look running here for ever.
                rt.remove_running(ex.workflow_id)
                raise
        return running, None
    if other.owner_xid == running.owner_xid:
        return None, None
    row = rt.store.get_workflow(ex.workflow_id)  # a rare path: the whole row will do
    if row is None or row["owner_xid"] != ex.owner:
        # This one is the stale one (a claim that arrived late): the running one goes on.
        return None, None
    if other.preempt_reason is None:
        other.preempt_reason = "taken over by another execution"
    other.interrupt.set()
    # What the stale execution recorded before it noticed is read again at the next attempt.
    ex.last_recorded_fid = None
    # So is the row: a cancel landing while this one waits finds the stale execution to stop,
    # not this one, and no stop count moves; -1 matches no mark, so registration reads it.
    ex.stop_mark = -1
    return None, other


def _stop_if_ended_meanwhile(rt: Runtime, running: RunningWorkflow, ex: Execution) -> None:
    """A request to stop found no execution to stop somewhere in this process after this
    one's row was written, perhaps this workflow's (cancelled between its claim and now): the
    row tells. Told to stop now, the body stops at its first operation, as it would have."""
    row = rt.store.get_workflow(ex.workflow_id)  # a rare path: the whole row will do
    if row is not None and row["status"] == S.PENDING.value and row["owner_xid"] == ex.owner:
        return
    status = None if row is None else row["status"]
    if status == S.CANCELLED.value:
        reason = "cancelled"
    elif status is None or status == S.PENDING.value:
        reason = "taken over by another execution"
    else:
        reason = f"now {status}"
    rt.preempt([ex.workflow_id], reason)


def on_failure(rt: Runtime, ex: Execution, exc: BaseException) -> BaseException:
    """Record a body's failure; returns the exception the caller should see (re-raised)."""
    wid = ex.workflow_id
    if isinstance(exc, WorkflowPreempted):
        if exc.workflow_id != wid or exc.reason == "shutdown":
            return exc
        if rt.stopping.is_set() and exc.reason not in ("cancelled", "timed out"):
            # DBOS.destroy() handed the workflow back to its queue before the body noticed
            # the shutdown: it was not cancelled, it resumes at the next launch.
            return WorkflowPreempted(wid, "shutdown")
        if exc.reason == "timed out" or (
            ex.deadline_ms is not None and rt.now_ms() >= ex.deadline_ms
        ):
            # Past its deadline: timed out, even if another process's sweep cancelled it first
            # and this one heard of it as a cancellation.
            return DBOSWorkflowTimedOutError(wid)
        return DBOSAwaitedWorkflowCancelledError(wid, f"was stopped ({exc.reason})")
    if not isinstance(exc, Exception):
        return exc  # KeyboardInterrupt and the like: the workflow stays PENDING, resumable
    if lost_database(exc):
        # A checkpoint could not reach the database (for longer than `reconnect` rides out):
        # the work itself did not fail, so nothing is recorded; the caller hands it back
        # (`handed_back`) to run again from its last completed step.
        return exc
    if ex.deadline_ms is not None and rt.now_ms() >= ex.deadline_ms:
        # Failed because it ran out of time (a timed-out child, say): a timeout.
        cancel_overdue(rt)
        return DBOSWorkflowTimedOutError(wid)
    _finish(rt, wid, ex.owner, S.ERROR.value, None, serialization.dump_error(exc))
    return exc


def lost_database(exc: BaseException) -> bool:
    """Whether `exc` is dbos_nb's own loss of the system database (tagged where it happened,
    see `reconnect`), and not an outcome recorded for a step or a child workflow."""
    return is_lost(exc) and not serialization.is_recorded(exc)


def handed_back(rt: Runtime, ex: Execution, reason: str = DATABASE_LOST) -> WorkflowPreempted:
    """Give a workflow back to its queue (or the internal one), as soon as the database answers,
    on a pool thread, to run again from its records: its checkpoint could not reach the
    database, or (READ_RECORDED_ELSEWHERE) its records hold another history than the one this
    execution went on with. Returns what its caller is told. Left PENDING under a live
    executor, nothing would ever run it."""
    # A shut-down pool (DBOS.destroy) refuses it: the next launch recovers the workflow.
    with contextlib.suppress(RuntimeError):
        rt.pool.submit(_hand_back_when_reachable, rt, ex, reason)
    return WorkflowPreempted(ex.workflow_id, reason)


def _hand_back_when_reachable(rt: Runtime, ex: Execution, reason: str) -> None:
    try:
        requeued = retrying(
            lambda: rt.store.requeue_workflow(ex.workflow_id, rt.now_ms(), ex.owner),
            math.inf,
            stop=rt.stopping,
        )
    except Exception as exc:  # DBOS.destroy() meanwhile: the next launch recovers it
        logger.warning("workflow %s was not put back in its queue: %s", ex.workflow_id, exc)
        return
    if requeued:
        logger.warning("workflow %s: %s; it runs again", ex.workflow_id, reason)
        rt.wake_scheduler()


def on_success(rt: Runtime, ex: Execution, value: Any) -> Any:
    """Record a body's result; returns what the caller should get (the durable record wins)."""
    wid = ex.workflow_id
    try:
        output = serialization.dumps(value)
    except DBOSNonSerializableError as exc:
        error = DBOSNonSerializableError(f"the result of workflow {wid!r}: {exc}")
        _finish(rt, wid, ex.owner, S.ERROR.value, None, serialization.dump_error(error))
        raise error from exc
    if not _finish(rt, wid, ex.owner, S.SUCCESS.value, output, None):
        # Cancelled (or taken over) while the body ran.
        row = rt.store.get_status_and_result(wid)
        if row is not None:
            finished, recorded = outcome_of(wid, row)
            if finished:
                return recorded
    return value


def end(rt: Runtime, ex: Execution) -> None:
    rt.remove_running(ex.workflow_id)
    rt.waiters.notify(ex.workflow_id)


def run_execution(rt: Runtime, ex: Execution) -> Any:
    """Run a workflow body whose row is PENDING and owned by `ex.owner`; record its outcome."""
    __tracebackhide__ = True
    try:
        running = begin(rt, ex)
    except Exception as exc:
        if lost_database(exc):  # its records could not be read: it runs again later
            raise handed_back(rt, ex) from exc
        raise
    if running is None:
        # This process already runs it (e.g. recovered while a handle waits): wait instead.
        return wait_for_result(
            rt.store, rt.waiters, rt.clock, ex.workflow_id, rt.polling_interval_sec
        )
    running.deferred = []  # one thread runs its operations: its reads' records may wait
    try:
        with using(Context(workflow=running)):
            try:
                value = _body_of(ex.reg)(*ex.args, **ex.kwargs)
                write_deferred(rt, running)  # the reads' records before the outcome
            except BaseException as exc:
                if _history_changed(ex, exc):
                    raise handed_back(rt, ex, READ_RECORDED_ELSEWHERE) from exc
                _write_deferred_before_failure(rt, running, exc)
                shown = on_failure(rt, ex, exc)
                if shown is exc:
                    raise
                raise shown from (None if isinstance(exc, WorkflowPreempted) else exc)
        return on_success(rt, ex, value)
    except Exception as exc:
        if lost_database(exc):  # a checkpoint, or the outcome itself, could not be written
            raise handed_back(rt, ex) from exc
        raise
    finally:
        end(rt, ex)


def _history_changed(ex: Execution, exc: BaseException) -> bool:
    """Whether the execution stopped because another one recorded one of its reads with
    another answer (see `deferred_reads.defer_read`): the workflow runs again from its records."""
    return (
        isinstance(exc, WorkflowPreempted)
        and exc.workflow_id == ex.workflow_id
        and exc.reason == READ_RECORDED_ELSEWHERE
    )


def _write_deferred_before_failure(rt: Runtime, wf: RunningWorkflow, exc: BaseException) -> None:
    """A body that failed on its own still gets the records of its reads (a fork of it replays
    them); one that was stopped, or lost the database, leaves them to the execution that goes
    on, which reads again."""
    if not wf.deferred or not isinstance(exc, Exception) or isinstance(exc, WorkflowPreempted):
        return
    try:
        write_deferred(rt, wf)
    except Exception as error:  # the failure itself is recorded next, and is what counts
        logger.debug("records of %s's reads not written: %r", wf.workflow_id, error)


def execute(
    rt: Runtime,
    reg: Registration,
    wid: str,
    owner: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    deadline_ms: int | None,
    ledger_entry: tuple[str, int] | None = None,
    *,
    fresh: bool = False,
    queue_name: str | None = None,
) -> Any:
    """Run a workflow body (sync) and record its outcome; see `run_execution`.

    `fresh`: the row was written just now by this call, so nothing can be recorded for it yet.
    """
    ex = Execution(reg, wid, owner, args, kwargs, deadline_ms, ledger_entry, fresh, queue_name)
    return run_execution(rt, ex)


def _body_of(reg: Registration) -> Callable[..., Any]:
    # A step or transaction enqueued alone runs as operation 1 of a one-operation workflow.
    return reg.func if reg.kind == "workflow" else reg.wrapper


def _finish(
    rt: Runtime, wid: str, owner: str, status: str, output: bytes | None, error: bytes | None
) -> bool:
    done, queue_name = rt.store.finish_workflow(wid, owner, status, output, error, rt.now_ms())
    if queue_name is not None:
        rt.wake_scheduler(queue_name, WAKE_FREED)
    return done


def dispatch(rt: Runtime, ex: Execution) -> concurrent.futures.Future[Any] | None:
    """Run an execution in the background: async bodies on the runtime's loop (returns its
    future), sync ones on a pool thread."""
    if ex.reg.is_async:
        if rt.run_async is None:
            raise RuntimeError("async workflows need a launched engine")
        future = rt.run_async(ex)
        future.add_done_callback(_log_outcome(ex.workflow_id))
        return future
    rt.pool.submit(_run_execution_quietly, rt, ex)
    return None


def _log_outcome(wid: str) -> Callable[[concurrent.futures.Future[Any]], None]:
    def done(future: concurrent.futures.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.debug("workflow %s ended: %r", wid, future.exception())

    return done


def _run_execution_quietly(rt: Runtime, ex: Execution) -> None:
    """Run on a pool thread: outcomes are recorded, so exceptions stop here."""
    try:
        run_execution(rt, ex)
    except WorkflowPreempted as stop:
        logger.debug("workflow %s stopped: %s", ex.workflow_id, stop.reason)
    except Exception:
        logger.debug("workflow %s failed (recorded)", ex.workflow_id, exc_info=True)


def run_claimed(rt: Runtime, claimed: ClaimedWorkflow) -> concurrent.futures.Future[Any] | None:
    """Run a workflow the scheduler claimed (on a pool thread). An async one goes on to the
    runtime's loop: its future is returned, and the pool thread is free at once."""
    reg = rt.resolver.resolve(claimed.name, claimed.function_hash)
    if reg is None:
        # This process cannot run that version: give it back for one that can.
        rt.store.release_claim(claimed.workflow_id, claimed.owner_xid, rt.now_ms())
        rt.wake_scheduler()
        return None
    if claimed.recovery_attempts > reg.max_recovery_attempts + 1:
        logger.error(
            "workflow %s (%s) was started %d times; giving up (max_recovery_attempts=%d)",
            claimed.workflow_id,
            claimed.name,
            claimed.recovery_attempts - 1,
            reg.max_recovery_attempts,
        )
        given_up = DBOSMaxRecoveryAttemptsExceededError(
            f"workflow {claimed.workflow_id!r} was started {claimed.recovery_attempts - 1} "
            f"times without finishing (its process died or stopped each time); "
            f"max_recovery_attempts={reg.max_recovery_attempts}"
        )
        rt.store.dead_letter(claimed.workflow_id, rt.now_ms(), serialization.dump_error(given_up))
        rt.waiters.notify(claimed.workflow_id)
        rt.wake_scheduler()
        return None
    try:
        args, kwargs = serialization.load_inputs(claimed.inputs)
    except Exception as exc:
        logger.error("cannot load the inputs of workflow %s: %s", claimed.workflow_id, exc)
        _finish(
            rt,
            claimed.workflow_id,
            claimed.owner_xid,
            S.ERROR.value,
            None,
            serialization.dump_error(exc),
        )
        rt.waiters.notify(claimed.workflow_id)
        return None
    ledger = None
    if claimed.ledger_claimed_at_ms is not None:
        ledger = (claimed.queue_name, claimed.ledger_claimed_at_ms)
    ex = Execution(
        reg,
        claimed.workflow_id,
        claimed.owner_xid,
        args,
        kwargs,
        claimed.deadline_epoch_ms,
        ledger,
        queue_name=claimed.queue_name,
        last_recorded_fid=claimed.last_recorded_fid,
        stop_mark=claimed.stop_mark,
    )
    if reg.is_async:
        return dispatch(rt, ex)
    _run_execution_quietly(rt, ex)
    return None
