"""Group commit: single-statement writes from many threads share one commit.

A queue running a hundred one-step workflows at once issues a step record and a finish per
workflow, each an atomic statement of its own. Run one by one, every statement pays for a whole
commit (SQLite: the write lock and a WAL commit; PostgreSQL: a round trip and a WAL flush), and
the threads contend for locks and for the GIL. Here the first caller to find nobody committing
commits, on its own thread, every statement waiting at that moment; the others wait, and the
oldest of them then leads the next batch. A caller still returns only after its own write is
durable, exactly as with its own transaction; under load the cost of a commit is shared, and a
lone caller runs its statement directly. On PostgreSQL a leader that knows of other running
workflows waits a tenth of a millisecond for their statements first (see GATHER_SEC).

Two ways of running a batch, one per database:
- shared transaction (SQLite): every statement in one BEGIN IMMEDIATE ... COMMIT. Statements are
  cheap in-process calls there; the commit and the write lock are what cost.
- one pipeline (PostgreSQL, `merged.py`): the batch's statements are sent together, as the one
  transaction the pipeline's Sync commits (many of a kind merged into one statement over
  arrays): one round trip and one WAL flush for the lot, and no transaction waits on a reply
  to this process.

Statements are independent (each affects its own rows and reads only what it writes), so running
them together changes no outcome. If a batch fails as a whole (a constraint, a deadlock, a lost
connection), each statement is run again alone, so that one caller's failure is reported to that
caller only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from typing import Any

from dbos_nb.storage.prepared import Statement
from dbos_nb.storage.process import current_pid

logger = logging.getLogger(__name__)

# Enough to share a commit among every workflow a claim starts, small enough to keep each
# transaction short for the claimers waiting on the same locks.
MAX_BATCH = 256

# Gathering (PostgreSQL): while batches have company (the last one held more than one
# statement) and more workflows run in the process than statements wait (see
# `GroupCommitter.expect_writers`), a leader waits GATHER_SEC before taking its batch, so that
# the others' statements share its commit (the idea of PostgreSQL's `commit_delay`, applied
# before the round trip). There each commit costs a WAL flush, which the enqueuing thread's
# own commits queue behind: with one-step workflows enqueued one by one, batches grew from 2.7
# to 3.5 statements and throughput rose by about 7% (noisy alternating runs; 200 us gained
# more on average but cost two workflows running quick steps side by side 30% of their pace,
# where 100 us costs them about 9%). A lone writer never waits. On SQLite a commit is cheap and
# enqueues go through the committer too: waiting cost 11% there, so it does not wait.
GATHER_SEC = 0.0001


# A kind of statement that the database can batch (`merged.MergedKind`): the committer only
# groups by it and hands the groups to the database's runner.
BatchKind = Hashable

# Runs the statements of several kinds together and atomically on a driver connection: (kind,
# the parameters of each of its statements) per kind -> the first row of each statement, in
# the same order.
MergedRun = Callable[
    [Any, list[tuple[Any, list[dict[str, Any]]]]], list[list[tuple[Any, ...] | None]]
]

# A transaction (or an autocommit connection) on the driver's connection, given to the block.
Transaction = Callable[[], AbstractContextManager[Any]]


class _Op:
    """One caller's statement and, once committed, its first row or its error."""

    __slots__ = ("abandoned", "error", "latch", "merged", "params", "promoted", "row", "stmt")

    def __init__(self, stmt: Statement, params: dict[str, Any], merged: BatchKind | None) -> None:
        self.stmt = stmt
        self.params = params
        self.merged = merged
        self.row: tuple[Any, ...] | None = None
        self.error: BaseException | None = None
        # A follower waits on this lock (taken at creation, released once by the leader that
        # answers or promotes it); a bare lock is far cheaper than an Event, and a caller that
        # leads at once never needs one.
        self.latch: threading.Lock | None = None
        # Woken to lead the next batch rather than with a result.
        self.promoted = False
        # Its caller stopped waiting (Ctrl-C): the statement is still written, but this caller
        # cannot be handed the lead.
        self.abandoned = False

    def result(self) -> tuple[Any, ...] | None:
        if self.error is not None:
            raise self.error
        return self.row

    def wake(self) -> None:
        latch, self.latch = self.latch, None
        if latch is not None:
            latch.release()


class GroupCommitter:
    """Leader/follower group commit. The caller that finds nobody committing commits, on its
    own thread, every statement waiting at that moment (its own first); callers arriving
    meanwhile wait, and when the batch is done the oldest of them leads the next one. A lone
    caller thus runs its statement directly, without a hand-over to another thread."""

    def __init__(
        self,
        transaction: Transaction | None,
        single: Transaction,
        merged: MergedRun | None = None,
        *,
        gather_sec: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        # The shared transaction, or None to hand batches to `merged` instead.
        self._transaction = transaction
        self._merged = merged
        # For a statement that runs alone (PostgreSQL: autocommit, one round trip).
        self._single = single
        self._lock = threading.Lock()
        self._pending: list[_Op] = []
        self._leading = False
        self._pid = current_pid()
        # How many threads may write soon (None: unknown, never gather), and how long to wait.
        self._writers: Callable[[], int] | None = None
        self.gather_sec = gather_sec
        self.sleep = sleep
        self._last_batch = 0  # statements in the last batch
        # Batches run and statements in them (diagnostics, and how tests see the grouping).
        self.batches = 0
        self.statements = 0

    def execute(
        self, stmt: Statement, params: dict[str, Any], merged: BatchKind | None = None
    ) -> tuple[Any, ...] | None:
        """Run `stmt` with others; its first result row once committed. `merged`: its kind,
        by which the database's runner writes it with others of the kind (required when
        batches go to a runner rather than a shared transaction); `stmt` runs alone."""
        op = _Op(stmt, params, merged)
        latch = None
        with self._lock:
            if self._pid != current_pid():
                # A forked child: the parent's leader is not here to finish anything.
                self._pid, self._pending, self._leading = current_pid(), [], False
            self._pending.append(op)
            if self._leading:
                latch = op.latch = threading.Lock()
                latch.acquire()
            self._leading = True
        if latch is not None:
            try:
                latch.acquire()  # released by the leader that answers or promotes this caller
            except BaseException:
                # Interrupted while waiting (Ctrl-C in a notebook): the statement stays queued
                # and is still written, like a commit whose reply was lost. If the lead was
                # handed over meanwhile, the others depend on this caller taking it.
                with self._lock:
                    op.abandoned = True
                    promoted = op.promoted
                if promoted:
                    self._lead()
                raise
            if not op.promoted:
                return op.result()
        self._lead()
        return op.result()

    def expect_writers(self, count: Callable[[], int] | None) -> None:
        """Tell the committer how many threads may soon write (the workflows running in this
        process), so that a leader can wait a moment for their statements (see GATHER_SEC,
        and `gather_sec`: 0 never waits)."""
        self._writers = count

    @property
    def started(self) -> bool:
        """Whether a batch is being committed now."""
        return self._leading

    @property
    def waiting(self) -> int:
        """Statements queued and not yet taken into a batch."""
        with self._lock:
            return len(self._pending)

    def _lead(self) -> None:
        interrupt: BaseException | None = None
        while True:
            try:
                self._gather()
            except BaseException as exc:  # Ctrl-C in the wait: the batch is still committed
                interrupt = interrupt or exc
            with self._lock:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
            try:
                self._commit(batch)
            except BaseException as exc:  # an interrupt: errors are answered to their callers
                interrupt = interrupt or exc
            if not self._hand_over():
                break
        if interrupt is not None:
            raise interrupt

    def _gather(self) -> None:
        writers = self._writers
        if writers is None or self.gather_sec <= 0:
            return
        # Only while writes overlap (the last batch had company): running workflows that sleep
        # or wait on children would otherwise delay a lone active one at every commit.
        if self._last_batch > 1 and writers() > len(self._pending):
            self.sleep(self.gather_sec)  # the others' statements join `_pending` meanwhile

    def _hand_over(self) -> bool:
        """Promote the oldest waiting caller to lead the next batch; True when only abandoned
        callers wait (their statements are still written: this leader goes on)."""
        with self._lock:
            successor = next((op for op in self._pending if not op.abandoned), None)
            if successor is None:
                if self._pending:
                    return True
                self._leading = False
                return False
            successor.promoted = True
        successor.wake()  # it leads the next batch, with the statements queued before its own
        return False

    def _commit(self, batch: list[_Op]) -> None:
        self.batches += 1
        self.statements += len(batch)
        self._last_batch = len(batch)
        interrupt: BaseException | None = None
        if len(batch) == 1:
            self._commit_alone(batch[0])
        elif self._transaction is not None:
            interrupt = self._commit_shared(batch, self._transaction)
        else:
            interrupt = self._commit_merged(batch)
        _release(batch)
        if interrupt is not None:
            # Ctrl-C (or the like) reached the leader while it wrote the others' statements:
            # they are done; the leader's caller still gets the interrupt.
            raise interrupt

    def _commit_shared(self, batch: list[_Op], transaction: Transaction) -> BaseException | None:
        """All statements in one transaction (see `_together`)."""
        return self._together(batch, transaction, lambda conn: [_first(conn, op) for op in batch])

    def _commit_merged(self, batch: list[_Op]) -> BaseException | None:
        """Every statement with a kind in one go, by the database's runner (see `_together`);
        a statement without a kind runs alone."""
        kinds: dict[BatchKind, list[_Op]] = {}
        for op in batch:
            if op.merged is None:
                self._commit_alone(op)
            else:
                kinds.setdefault(op.merged, []).append(op)
        if not kinds:
            return None
        assert self._merged is not None, "merged statements need a runner"
        run_merged = self._merged
        parts = [(kind, [op.params for op in ops]) for kind, ops in kinds.items()]
        ordered = [op for ops in kinds.values() for op in ops]
        return self._together(
            ordered,
            self._single,
            lambda conn: [row for rows in run_merged(conn, parts) for row in rows],
        )

    def _together(
        self,
        ops: list[_Op],
        transaction: Transaction,
        run: Callable[[Any], list[tuple[Any, ...] | None]],
    ) -> BaseException | None:
        """Run `ops` at once; if that fails, one by one. Returns an interrupt (not an
        Exception) that stopped the joint attempt, if any."""
        try:
            with transaction() as conn:
                rows = run(conn)
        except BaseException as exc:
            logger.debug("joint commit of %d statements failed (%r); one by one", len(ops), exc)
            for op in ops:
                self._commit_alone(op)
            return None if isinstance(exc, Exception) else exc
        for op, row in zip(ops, rows, strict=True):
            op.row = row
        return None

    def _commit_alone(self, op: _Op) -> None:
        try:
            with self._single() as conn:
                op.row = _first(conn, op)
        except BaseException as exc:
            op.error = exc


def _first(conn: Any, op: _Op) -> tuple[Any, ...] | None:
    return op.stmt.first(conn, op.params)


def _release(batch: list[_Op]) -> None:
    for op in batch:
        op.wake()
