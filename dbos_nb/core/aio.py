"""`async def` workflows and steps, run on an event loop that dbos_nb owns.

LLM clients are mostly async, and 200 calls in flight should not need 200 threads. Async workflows
run as tasks on one loop in a daemon thread owned by the runtime, never on the caller's loop: a
Jupyter kernel's loop stops running tasks when a cell finishes, and a durable workflow must keep
going. The bookkeeping (checkpoints, owner checks, outcomes) is the same as for sync workflows and
reuses their functions; the database calls are short and made from the loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from dbos_nb.core.context import Context, RunningWorkflow, current, derive, using
from dbos_nb.core.registry import Registration
from dbos_nb.core.runtime import Runtime
from dbos_nb.core.steps import (
    Retrier,
    begin_operation,
    check_live,
    record_call_error,
    record_step_error,
    record_step_value,
    replay,
    require_workflow_for_sleep,
    sleep_until,
    workflow_code,
)
from dbos_nb.core.workflows import (
    Execution,
    _body_of,
    end,
    handed_back,
    lost_database,
    on_failure,
    on_success,
    register,
    write_started,
)
from dbos_nb.errors import WorkflowPreempted

T = TypeVar("T")


async def run_execution_async(rt: Runtime, ex: Execution) -> Any:
    """The async twin of `workflows.run_execution` (runs on the runtime's loop)."""
    __tracebackhide__ = True  # IPython and pytest leave this frame out of tracebacks
    try:
        running = await _begin(rt, ex)
    except Exception as exc:
        if lost_database(exc):  # its records could not be read: it runs again later
            raise handed_back(rt, ex) from exc
        raise
    if running is None:
        return await rt.wait_result_async(ex.workflow_id, rt.polling_interval_sec, None)
    try:
        with using(Context(workflow=running)):
            try:
                value = await _body_of(ex.reg)(*ex.args, **ex.kwargs)
            except BaseException as exc:
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


async def _begin(rt: Runtime, ex: Execution) -> RunningWorkflow | None:
    """`workflows.begin` on the loop: the stale execution waited for may run on this loop."""
    running, stale = register(rt, ex)
    while stale is not None:
        while not stale.ended.is_set():
            await asyncio.sleep(0.01)
        running, stale = register(rt, ex)
    return running


def start_on_loop(rt: Runtime, ex: Execution) -> concurrent.futures.Future[Any]:
    """Run an async workflow on the runtime's loop; returns a future of its outcome."""
    return rt.aio.submit(run_execution_async(rt, ex))


async def call_workflow_async(
    rt: Runtime, reg: Registration, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Await an async workflow called directly: it runs on dbos_nb's loop, not the caller's.

    Cancelling the caller (a `wait_for` that times out, a failing sibling in a `TaskGroup`,
    `task.cancel()`) stops only the waiting: the workflow keeps running and records its outcome,
    and the caller gets its CancelledError. Only dbos_nb stops the workflow's own task (at
    `DBOS.destroy()`, leaving it PENDING to resume at the next launch).
    """
    __tracebackhide__ = True
    ex, existing = write_started(rt, reg, args, kwargs)
    if existing is not None:
        return await rt.wait_result_async(ex.workflow_id, rt.polling_interval_sec, None)
    outcome = start_on_loop(rt, ex)
    try:
        return await asyncio.shield(asyncio.wrap_future(outcome))
    except asyncio.CancelledError:
        if outcome.cancelled() and rt.stopping.is_set():
            # Not the caller's cancellation: DBOS.destroy() stopped dbos_nb's loop.
            raise WorkflowPreempted(ex.workflow_id, "shutdown") from None
        raise


async def call_step_async(
    rt: Runtime, reg: Registration, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The async twin of `steps.call_step`."""
    __tracebackhide__ = True
    ctx = current()
    wf = ctx.workflow
    if wf is None or ctx.step is not None:
        return await reg.func(*args, **kwargs)
    fid, pre = begin_operation(rt, wf, reg.name)
    if pre.recorded:
        return replay(pre)
    started = rt.now_ms()
    try:
        value = await _attempts_async(rt, reg, ctx, fid, args, kwargs)
    except Exception as exc:
        return record_step_error(rt, wf, fid, reg.name, started, exc)
    return record_step_value(rt, wf, fid, reg.name, started, value)


async def call_as_operation_async(
    rt: Runtime,
    name: str,
    call: Callable[[], Awaitable[T]],
    child_workflow_id: str | None = None,
) -> T:
    """The async twin of `steps.call_as_operation`. The operation number is taken here, on the
    workflow's loop, before `call` is awaited (a call made in a thread would take it there), so
    that calls gathered concurrently take their numbers in the same order at every replay."""
    __tracebackhide__ = True
    wf = workflow_code()
    if wf is None:
        return await call()
    fid, pre = begin_operation(rt, wf, name)
    if pre.recorded:
        return cast(T, replay(pre))
    started = rt.now_ms()
    try:
        value = await call()
    except Exception as exc:
        return cast(T, record_call_error(rt, wf, fid, name, started, exc, child_workflow_id))
    return cast(T, record_step_value(rt, wf, fid, name, started, value, child_workflow_id))


async def _attempts_async(
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
                return await reg.func(*args, **kwargs)
        except Exception as exc:
            await sleep_checked(rt, ctx, retrier.on_error(exc))


async def sleep_checked(rt: Runtime, ctx: Context, seconds: float) -> None:
    """Sleep without blocking the loop, stopping early if the workflow must stop."""
    deadline = asyncio.get_running_loop().time() + seconds
    wf = ctx.workflow
    while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
        await asyncio.sleep(min(remaining, 0.05))
        if wf is not None and wf.interrupt.is_set():
            check_live(rt, wf)


async def durable_sleep_async(rt: Runtime, seconds: float) -> None:
    """The async twin of `DBOS.sleep`: the wake-up time is recorded."""
    ctx = current()
    if ctx.step is not None:
        await asyncio.sleep(seconds)
        return
    wf = require_workflow_for_sleep(ctx.workflow)
    wake_at = sleep_until(rt, wf, seconds)
    await sleep_checked(rt, ctx, max((wake_at - rt.now_ms()) / 1000, 0.0))


__all__ = [
    "call_as_operation_async",
    "call_step_async",
    "call_workflow_async",
    "durable_sleep_async",
    "run_execution_async",
    "start_on_loop",
]
