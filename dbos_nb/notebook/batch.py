"""Batches: a whole list of calls enqueued at once under a name, and watched as one.

`queue.map(fn, items, batch="name")` enqueues every item in one transaction with the ids
`name/0`, `name/1`, ..., so running the cell again (after a kernel restart, say) enqueues nothing
twice and returns the same batch. Everything a `Batch` reports is read from the database, so it
also shows the work of other processes and survives restarts.

This module needs no UI library; pandas is imported only by `to_pandas` (in frames.py) and widgets
only when a batch is displayed (in views.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dbos_nb import serialization
from dbos_nb.core import versions
from dbos_nb.core.context import valid_seconds
from dbos_nb.core.handles import WorkflowHandle
from dbos_nb.core.queue import Queue as CoreQueue
from dbos_nb.core.queue import check_partition, token_estimates, use_queue_class
from dbos_nb.core.registry import REGISTRY, Registration, resolve
from dbos_nb.core.runtime import Runtime, get_runtime, peek_runtime
from dbos_nb.core.waiters import outcome_of
from dbos_nb.core.workflows import enqueue_many, workflow_name_of
from dbos_nb.errors import BatchItemsConflictError, DbosNbError
from dbos_nb.models import shown_function_name
from dbos_nb.notebook.batch_names import default_batch_name, equal_items
from dbos_nb.notebook.workers import live_workers
from dbos_nb.storage import rate_ledger
from dbos_nb.storage.batch_records import item_index
from dbos_nb.storage.rows import FAILED

# How a batch's workflow statuses are grouped for people.
STATUS_GROUPS = {
    "ENQUEUED": "queued",
    "PENDING": "running",
    "SUCCESS": "done",
    "ERROR": "failed",
    "CANCELLED": "cancelled",
    "MAX_RECOVERY_ATTEMPTS_EXCEEDED": "failed",
}
GROUPS = ("queued", "running", "done", "failed", "cancelled")
THROUGHPUT_WINDOW_MS = 30_000
# What `Batch.results` does with an item that failed or was cancelled.
RESULT_ERRORS = ("none", "raise", "return")
# How long `wait()` sees no progress before it checks, and says, that nothing can run the batch
# (a worker started from a terminal is seen only once it has registered).
IDLE_WARNING_AFTER_S = 10.0


class UnknownBatchError(DbosNbError, LookupError):
    """No batch with that name exists in this database."""


@dataclass
class Progress:
    """A snapshot of a batch, as shown by progress views."""

    batch_id: str
    total: int
    counts: dict[str, int]
    throughput_per_s: float
    eta_s: float | None
    rate_used: int | None = None
    rate_limit: int | None = None
    rate_period_s: float | None = None
    recent_errors: list[tuple[str, str]] = field(default_factory=list)
    tokens: int = 0
    cost: float = 0.0
    # Why nothing runs the unfinished items, once the batch has stood still for a while with
    # nothing running (see `Batch.stall_reason`); None while it moves.
    stalled: str | None = None
    # Items deleted since the batch was enqueued (DBOS.delete_workflow): not counted in `total`.
    deleted: int = 0

    @property
    def finished(self) -> int:
        return self.counts["done"] + self.counts["failed"] + self.counts["cancelled"]

    @property
    def fraction(self) -> float:
        return self.finished / self.total if self.total else 1.0

    @property
    def complete(self) -> bool:
        return self.finished >= self.total

    def summary(self) -> str:
        parts = [f"{self.finished}/{self.total} finished"]
        if self.deleted:
            parts.append(f"{self.deleted} deleted")
        parts += [f"{n} {g}" for g, n in self.counts.items() if n]
        if self.throughput_per_s > 0 and not self.complete:
            parts.append(f"{self.throughput_per_s:.1f}/s")
        if self.eta_s is not None and not self.complete:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        if self.rate_limit is not None:
            parts.append(f"rate {self.rate_used}/{self.rate_limit} per {self.rate_period_s:g}s")
        if self.tokens or self.cost:
            parts.append(f"{self.tokens:,} tokens, ${self.cost:.4f}")
        return f"batch {self.batch_id!r}: " + ", ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    )


def _registered_ids(
    workers: list[dict[str, Any]], executors: list[dict[str, Any]], live: list[dict[str, Any]]
) -> set[str] | None:
    """The executor ids under which this notebook's live workers are registered; None while
    one of them is not registered yet. A worker is found by the id it was started with, if
    that id's row names its pid; else by its process among live registrations (this host,
    its pid; the newest; `live` holds the registrations whose lease runs): a worker whose id
    another process took (its lease lapsed while the machine slept, say) goes on under a new
    id."""
    host = socket.gethostname()
    by_id = {str(e["executor_id"]): e for e in executors}
    by_process = {  # the newest registration of a process wins
        (str(e["hostname"]), int(e["pid"])): str(e["executor_id"])
        for e in sorted(live, key=lambda e: int(e["heartbeat_at"]))
    }
    ids = set()
    for worker in workers:
        pid = int(worker["pid"])
        started_as = by_id.get(str(worker.get("executor_id")))
        if started_as is not None and int(started_as["pid"]) == pid:
            ids.add(str(started_as["executor_id"]))
        elif (host, pid) in by_process:
            ids.add(by_process[(host, pid)])
        else:
            return None
    return ids


class _Stall:
    """What `Batch.stall_reason` remembers: the counts last seen, when to ask again, and the
    last answer (shared by `wait()` and a live view's thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] | None = None
        self.check_at = 0.0
        self.reason: str | None = None

    def forget(self) -> None:
        with self.lock:
            self.counts, self.reason = None, None


class Batch:
    """A named group of enqueued workflows, watched and collected as one."""

    def __init__(self, batch_id: str, *, _record: dict[str, Any] | None = None) -> None:
        rt = get_runtime()
        record = _record or rt.store.get_batch(batch_id)
        if record is None:
            known = [b["batch_id"] for b in rt.store.list_batches()[:10]]
            raise UnknownBatchError(
                f"no batch named {batch_id!r} in this database"
                + (f"; recent batches: {known}" if known else "")
            )
        self.id = batch_id
        self.size = int(record["size"])
        self.queue_name = str(record["queue_name"])
        self.function_name = str(record["function_name"])
        self.created_at_ms = int(record["created_at"])
        # The cell in which `wait()` left a summary, so that the cell does not show it twice.
        self._shown_in_cell: int | None = None
        self._stall = _Stall()

    @classmethod
    def attach(cls, name: str) -> Batch:
        """Find a batch again by its name (after a kernel restart, in another process, ...)."""
        return cls(name)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Pickled as its name, unpickled as `Batch.attach(name)`: a durable cell that maps a
        # batch (`b = q.map(...)`) records `b`, and its replay gives it back, attached.
        return (Batch, (self.id,))

    @property
    def _rt(self) -> Runtime:
        return get_runtime()

    @property
    def workflow_ids(self) -> list[str]:
        return [f"{self.id}/{i}" for i in range(self.size)]

    @property
    def handles(self) -> list[WorkflowHandle[Any]]:
        rt = self._rt
        return [WorkflowHandle(rt, wid) for wid in self.workflow_ids]

    def __len__(self) -> int:
        return self.size

    def counts(self) -> dict[str, int]:
        """Workflows per group: queued, running, done, failed, cancelled."""
        out = dict.fromkeys(GROUPS, 0)
        for status, n in self._rt.store.batch_counts(self.id).items():
            out[STATUS_GROUPS.get(status, "failed")] += n
        return out

    def progress(self, *, errors: int = 3) -> Progress:
        """Counts, throughput over the last 30 s, ETA, rate-limit use and the latest errors."""
        rt = self._rt
        now = rt.now_ms()
        counts = self.counts()
        recent = rt.store.batch_finished_since(self.id, now - THROUGHPUT_WINDOW_MS)
        window_s = min(THROUGHPUT_WINDOW_MS, max(now - self.created_at_ms, 1)) / 1000
        throughput = recent / window_s if window_s > 0 else 0.0
        # Items deleted since (DBOS.delete_workflow) are neither waited for nor counted.
        present = sum(counts.values())
        remaining = present - (counts["done"] + counts["failed"] + counts["cancelled"])
        eta = remaining / throughput if throughput > 0 and remaining > 0 else None
        progress = Progress(self.id, present, counts, throughput, eta)
        progress.deleted = max(self.size - present, 0)
        progress.tokens, progress.cost = rt.store.batch_usage(self.id)
        settings = rt.store.get_queue(self.queue_name)
        if settings is not None and settings.limit is not None and settings.period_ms:
            progress.rate_limit = settings.limit
            progress.rate_period_s = settings.period_ms / 1000
            progress.rate_used = rate_ledger.window_usage(
                rt.db, self.queue_name, settings.period_ms, now
            )
        if not progress.complete:
            progress.stalled = self.stall_reason(counts)
        if errors and counts["failed"]:
            for wid, blob in rt.store.batch_recent_errors(self.id, errors):
                err = serialization.load_error(blob)
                said = "(no error recorded)" if err is None else serialization.error_text(err)
                progress.recent_errors.append((wid, said))
        return progress

    def wait(
        self, timeout: float | None = None, *, poll_interval: float = 0.1, show: bool = True
    ) -> Batch:
        """Block until every workflow of the batch has finished (raises TimeoutError).

        In a notebook (`show=True`) a live progress view is displayed while it waits, and a
        static summary is left in the cell when it returns, so a saved notebook shows the result.
        """
        from dbos_nb.notebook import views

        if timeout is not None and not valid_seconds(timeout):
            raise DbosNbError(
                f"wait(timeout=...) must be a positive number of seconds or None, got {timeout!r}"
            )
        showing = show and views.in_ipython()
        view = views.show_live(self) if showing and views.widgets_available() else None
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        warned = False
        # This wait judges from what it sees itself: a verdict kept from before (an earlier
        # wait, interrupted; the live view) may predate workers started since.
        self._stall.forget()
        try:
            while True:
                counts = self.counts()
                if counts["queued"] + counts["running"] == 0:
                    break  # every item ended (an item deleted since is not waited for)
                now = time.monotonic()
                if not warned:
                    idle = self.stall_reason(counts)
                    if idle is not None:
                        warnings.warn(idle, RuntimeWarning, stacklevel=2)
                        warned = True
                if deadline is not None and now >= deadline:
                    raise TimeoutError(f"batch {self.id!r} did not finish within {timeout} s")
                time.sleep(delay)
                delay = min(delay * 2, poll_interval)
        finally:
            if view is not None:
                view.settle()
        if showing:
            if view is None:
                views.show_summary(self)
            # `batch.wait()` as a cell's last line returns the batch: the summary just shown
            # stands for it, rather than a second view below.
            self._shown_in_cell = views.current_cell()
        return self

    def stall_reason(self, counts: dict[str, int]) -> str | None:
        """Why nothing runs this batch's unfinished items, if the batch has stood still
        (`counts` unchanged, nothing running) for IDLE_WARNING_AFTER_S; None otherwise.

        Asked only once the batch has made no progress for a while, and again at that interval
        while it makes none (a worker process still starting cannot be seen until it
        registers); the answer is kept meanwhile, so that a live view refreshed four times a
        second reads the executors no oftener than `wait()` does."""
        stall = self._stall
        now = time.monotonic()
        with stall.lock:
            if counts != stall.counts:
                stall.counts, stall.check_at, stall.reason = (
                    dict(counts),
                    now + IDLE_WARNING_AFTER_S,
                    None,
                )
                return None
            if now < stall.check_at:
                return stall.reason
            stall.check_at = now + IDLE_WARNING_AFTER_S
        reason = None if counts["running"] else self._why_nothing_runs()
        with stall.lock:
            if counts == stall.counts:
                stall.reason = reason
        return reason

    def _why_nothing_runs(self) -> str | None:
        """Why no process may run this batch's unfinished work, if none can be seen to: after a
        kernel restart its items wait until this kernel declares the queue and defines the
        function again, or a worker process that can runs; a wait would only hang."""
        from dbos_nb.dbos import DBOS  # the facade sits above this module

        rt = self._rt
        engine = DBOS._engine
        function = shown_function_name(self.function_name)
        missing = []
        if engine is None or not engine.serves(self.queue_name):
            missing.append(f"its queue {self.queue_name!r} is not served here")
        if REGISTRY.get(function) is None:
            missing.append(f"{function!r} is not defined here")
        if not missing:
            return None
        now = rt.now_ms()
        executors = rt.store.list_executors()
        live = [e for e in executors if engine is not None and engine.executor_alive(e, now)]
        own = _registered_ids(live_workers(rt), executors, live)
        if own is None:
            return None  # one of this notebook's workers is starting: it may run the work
        alive = {e["executor_id"] for e in live if e["executor_id"] != rt.executor_id}
        # Only reports of the versions its waiting items need: a worker may have failed on an
        # older version of the function and run the current one.
        waiting = rt.store.waiting_versions(batch_id=self.id)
        failures = [
            f
            for f in rt.store.list_load_failures(function)
            if f["executor_id"] in alive and f["version"] in waiting
        ]
        failed = {f["executor_id"] for f in failures}
        # All of this notebook's workers failed (whatever other processes, a kernel say, are
        # alive), or every live process that could run it did.
        if failures and ((own and own <= failed) or alive <= failed):
            said = "; ".join(
                f"{f['executor_id']} on {f['hostname']} (pid {f['pid']}): {f['reason']}"
                for f in failures
            )
            return (
                f"nothing runs the unfinished items of batch {self.id!r}: the worker processes "
                f"cannot load {function!r} ({said}). Make the function's module importable by "
                "them (a package installed in their environment, or, for %dbos_workers, a "
                "folder on the kernel's sys.path before it starts them), then start them again."
            )
        if alive:
            return None  # another process (a worker) may run it
        return (
            f"nothing runs the unfinished items of batch {self.id!r}: "
            + " and ".join(missing)
            + " (this kernel was restarted, or launched with --no-worker), and no worker process "
            "is alive. Run the cells that declare the queue and define the function again, or "
            "start workers (%dbos_workers)."
        )

    def results(self, *, errors: str = "none") -> list[Any]:
        """Outputs in input order; None for items not finished yet.

        An item that failed or was cancelled gives None with `errors="none"` (and a warning
        says how many did), raises its error with `errors="raise"` (the first in input order,
        with a note naming the item), or gives its exception in its place with
        `errors="return"`.
        """
        if errors not in RESULT_ERRORS:
            raise DbosNbError(
                f"results(errors=...) must be one of {', '.join(map(repr, RESULT_ERRORS))}, "
                f"got {errors!r}"
            )
        values: list[Any] = [None] * self.size  # an item deleted since gives None
        failed = 0
        for row in self._rt.store.batch_outputs(self.id):
            index = item_index(row["workflow_uuid"])
            try:
                _, value = outcome_of(row["workflow_uuid"], row)
            except Exception as exc:  # the item's recorded error, or cancelled
                if errors == "raise":
                    # (An exception type that refuses notes is raised as it is.)
                    with contextlib.suppress(Exception):
                        exc.add_note(f"item {index} of batch {self.id!r} ({row['workflow_uuid']})")
                    raise
                failed += 1
                value = exc if errors == "return" else None
            values[index] = value
        if failed and errors == "none":
            warnings.warn(
                f"batch {self.id!r}: {failed} of {len(values)} items failed or were cancelled "
                "and give None; results(errors='raise') raises the first error, "
                "errors='return' puts each in its place, retry_failed() runs them again",
                UserWarning,
                stacklevel=2,
            )
        return values

    def retry_failed(self, *, current_code: bool = True) -> int:
        """Run the failed items again (their completed steps are not re-run); returns how many.

        They run this process's current version of the batch's function (the fix is usually
        in the code): the steps they completed are replayed, so an edit that changes which
        steps run before those raises DBOSUnexpectedStepError. `current_code=False` runs each
        with the version it was enqueued with (for a cause outside the code: a service down).
        """
        if not current_code:
            return self._run_again(FAILED)
        if not self.counts()["failed"]:
            return 0
        return self._run_again(FAILED, self._current_version())

    def resume_cancelled(self) -> int:
        """Put the cancelled items back in the batch's queue, under its limits, to go on from
        their last completed step (after `cancel()`); returns how many."""
        return self._run_again(("CANCELLED",))

    def _run_again(self, statuses: tuple[str, ...], version: str | None = None) -> int:
        rt = self._rt
        ids = rt.store.run_again_in_batch(self.id, rt.now_ms(), statuses, version=version)
        rt.wake_scheduler()
        return len(ids)

    def _current_version(self) -> str:
        """The version of the batch's function registered here now. Not registered (its cell
        not run again since a restart, say): raises, since the items would silently run the
        version they failed with, and pay again for the same failure."""
        record = self._rt.store.get_batch(self.id)
        name = shown_function_name(record["function_name"]) if record else "?"
        reg = REGISTRY.get(name)
        if reg is None:
            raise DbosNbError(
                f"batch {self.id!r}: its function {name!r} is not defined in this process, so "
                "retry_failed() cannot run the current code: run the cell (or import the module) "
                "that defines it first, or pass current_code=False to run each item with the "
                "version it was enqueued with"
            )
        return self._rt.ensure_stored(reg)

    def cancel(self) -> int:
        """Cancel every item not finished yet; returns how many were cancelled."""
        rt = self._rt
        active = [
            r["workflow_uuid"]
            for r in rt.store.batch_rows(self.id, load_payloads=False)
            if r["status"] in ("ENQUEUED", "PENDING")
        ]
        changed = rt.store.cancel_workflows(active, rt.now_ms(), cancel_children=True)
        rt.ended_elsewhere(changed, "cancelled")
        return len(changed)

    def to_pandas(self, *, expand: bool = False) -> Any:
        """One row per item, in input order (see `dbos_nb.notebook.frames.batch_frame`)."""
        from dbos_nb.notebook.frames import batch_frame

        return batch_frame(self._rt.store.batch_rows(self.id), expand=expand)

    # -- display --------------------------------------------------------------------------------

    def __repr__(self) -> str:
        if peek_runtime() is None:  # a repr must not raise: DBOS was destroyed meanwhile
            return f"<Batch {self.id!r}: {self.size} items (DBOS is not launched)>"
        return f"<Batch {self.progress(errors=0).summary()}>"

    def _repr_html_(self) -> str:
        from dbos_nb.notebook.views import progress_html

        if peek_runtime() is None:
            return html.escape(repr(self))
        return progress_html(self.progress())

    def _ipython_display_(self) -> None:
        from dbos_nb.notebook.views import current_cell, show_live

        shown, self._shown_in_cell = self._shown_in_cell, None
        if shown is not None and shown == current_cell():
            return  # `wait()` has just left its summary in this cell
        if peek_runtime() is None:
            print(repr(self))
            return
        show_live(self)


def _items_to_calls(
    items: Any, bound: tuple[Any, ...]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    # A DataFrame's rows become keyword arguments, by column name.
    if hasattr(items, "to_dict") and hasattr(items, "columns"):
        return [(bound, dict(row)) for row in items.to_dict("records")]
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        raise DbosNbError(
            f"map() needs a list (or a DataFrame) of items, got {type(items).__name__}"
        )
    return [((*bound, item), {}) for item in items]


def legacy_batch_name(function_name: str, payloads: list[bytes]) -> str:
    """The default name of earlier versions, from pickled items (not the same in every process:
    see batch_names.py); still looked up so batches made by those versions are found again."""
    digest = hashlib.sha256(function_name.encode())
    for payload in payloads:
        digest.update(payload)
    short = function_name.rsplit(".", 1)[-1]
    return f"{short}-{digest.hexdigest()[:12]}"


def _default_name(
    rt: Runtime,
    function_name: str,
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    bound: tuple[Any, ...],
) -> str:
    """The process-independent default name; a batch made under the old pickle-derived name (by
    an earlier version) is attached to if none exists under the new one."""
    try:
        name: str | None = default_batch_name(function_name, calls, bound)
        problem: DbosNbError | None = None
    except DbosNbError as exc:
        name, problem = None, exc
    if name is not None and rt.store.get_batch(name) is not None:
        return name
    try:
        payloads = [serialization.dump_inputs(function_name, a, k) for a, k in calls]
        legacy = legacy_batch_name(function_name, payloads)
    except Exception:
        legacy = None
    if legacy is not None and rt.store.get_batch(legacy) is not None:
        return legacy
    if name is None:
        assert problem is not None
        raise problem
    return name


def _note_other_version(rt: Runtime, batch: str, reg: Registration) -> None:
    """Warn when the batch was enqueued (earlier) with another version of the function than
    this kernel's now: attaching to it is right (its items are paid for), but its results
    come from that version, which the user may not expect after editing the function."""
    enqueued_with = rt.store.batch_function_version(batch)
    # The code only: the state part of a notebook function's version (see `versions`)
    # differs in every kernel, a restart is no news.
    if enqueued_with is not None and not versions.same_code(enqueued_with, reg):
        warnings.warn(
            f"batch {batch!r} was enqueued with another version of {reg.name!r} (its code "
            "changed since): its items run, and ran, that version. Map under a new batch name "
            "to run this one.",
            UserWarning,
            stacklevel=3,
        )


def _same_items(
    rt: Runtime, batch: str, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], skip: int
) -> bool | None:
    """Whether the batch's stored items are `calls`' items, when their serialized bytes differ:
    the same values pickle differently in another kernel (a set's order follows the string
    hash seed; cloudpickle pickles a class defined in the notebook by value). Compared by
    value, as default batch names are. None: they cannot be compared so (not plain data, or
    not loadable here); the name decides, as before items were checked."""
    try:
        stored = [serialization.load_inputs(data) for data in rt.store.batch_inputs(batch)]
    except Exception:
        return None
    return equal_items(stored, calls, skip)


def _refuse_other_undigested_items(
    rt: Runtime, batch: str, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], skip: int
) -> None:
    """A batch recorded without a digest of its items (by `enqueue_many`, or before digests
    were kept) takes this call's digest when it is attached to, with nothing to compare: its
    stored items are compared by value first, so that other items are refused rather than
    given the old items' results."""
    record = rt.store.get_batch(batch)
    if record is None or record.get("items_digest") is not None or record["size"] != len(calls):
        return  # new, checked by its digest, or refused for its size
    if _same_items(rt, batch, calls, skip) is False:
        raise BatchItemsConflictError(
            f"batch {batch!r} already exists with other items (the same number, "
            f"{len(calls)}); mapping them under this name would only attach to the old items. "
            f"Use another batch name for these items, or Batch.attach({batch!r}) to follow "
            "the existing batch"
        )


class Queue(CoreQueue):
    """A queue with `map()`: the `Queue` that `dbos_nb` exports."""

    def map(
        self,
        func: Callable[..., Any],
        items: Any,
        *,
        batch: str | None = None,
        tokens: int | Callable[[Any], int] | None = None,
    ) -> Batch:
        """Enqueue one call per item as a named batch, in one transaction; returns the Batch.

        Items are passed as the single argument; a DataFrame's rows are passed as keyword
        arguments. Without `batch`, the name is derived from the function and the items, so
        running the same cell again attaches to the same batch instead of enqueueing twice.
        Under an existing name, other items (compared by value where they are plain data), or
        another function, queue or size, raise BatchConflictError: nothing is enqueued.
        `tokens`: each item's token estimate for the queue's `token_limiter` (a number, or a
        function of the item; a DataFrame's rows are passed as dicts).
        """
        self._check_enqueue()
        check_partition(self)
        reg, bound = resolve(func, ())
        if (
            not hasattr(items, "columns")
            and isinstance(items, Iterable)
            and not isinstance(items, str | bytes)
        ):
            items = list(items)  # a generator is read once, for the calls and the estimates
        calls = _items_to_calls(items, bound)
        if not calls:
            raise DbosNbError("map() got no items")
        rt = get_runtime()
        if batch is None:
            batch = _default_name(rt, reg.name, calls, bound)
        if not isinstance(batch, str) or not batch or "/" in batch:
            raise DbosNbError(f"a batch name must be a non-empty string without '/', got {batch!r}")
        rows = items.to_dict("records") if hasattr(items, "to_dict") else list(items)
        estimates = token_estimates(tokens, rows)
        _refuse_other_undigested_items(rt, batch, calls, len(bound))
        try:
            enqueue_many(rt, self.name, reg, calls, batch, estimates, check_items=True)
        except BatchItemsConflictError:
            # The bytes differ; the values may not (see `_same_items`).
            same = _same_items(rt, batch, calls, len(bound))
            if same is False:
                raise
            if same is None:
                warnings.warn(
                    f"batch {batch!r} exists with items that serialize differently from these "
                    "and cannot be compared by value (not plain data): attached to it, so its "
                    "results are those of its own items. If the items changed, map them under "
                    "a new batch name.",
                    UserWarning,
                    stacklevel=2,
                )
        record = {
            "size": len(calls),
            "queue_name": self.name,
            "function_name": workflow_name_of(reg),
            "created_at": rt.now_ms(),
        }
        stored = rt.store.get_batch(batch)
        _note_other_version(rt, batch, reg)
        return Batch(batch, _record=stored or record)


use_queue_class(Queue)
