"""The background worker of a process: claims queued work and hands it to the thread pool.

One scheduler thread per launched DBOS. It claims from every queue this process listens to, then
sleeps until something can have changed:
- an enqueue or a completion in this process (a direct wake-up),
- a PostgreSQL notification from another process (the listener thread wakes it),
- the moment the rate limiter frees its next slot (computed, not polled),
- the fallback poll interval (other processes on SQLite, lost notifications).

It also cancels workflows whose deadline passed and renews this executor's heartbeat.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Collection

from dbos_nb.core.runtime import WAKE_ANY, WAKE_ENQUEUED, WAKE_FREED, DirectSlot, Runtime
from dbos_nb.core.steps import cancel_overdue, preempt_lost
from dbos_nb.core.workflows import run_claimed
from dbos_nb.models import ClaimedWorkflow, ClaimResult
from dbos_nb.storage import claims
from dbos_nb.storage.listener import Listener

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_MS = 100
REFRESH_INTERVAL_MS = 1000
# After a claim that took work, how long to let further enqueues and completions gather before
# the next claim (each claim is a write transaction: one per enqueue would halve throughput).
# Only busy queues wait: a claim after an idle spell runs at once.
COALESCE_SEC = 0.002
# The longest an enqueue that could start its workflow directly waits for a claim of the same
# worker_concurrency queue to end (a claim is one round trip; one stuck behind locks is not
# waited for: the workflow is then enqueued the ordinary way).
CLAIM_WAIT_SEC = 0.05


class Scheduler:
    """Claim loop, deadline sweep, heartbeat and notification listener of one runtime."""

    def __init__(
        self,
        rt: Runtime,
        queue_names: Callable[[], list[str]],
        *,
        poll_ms: Callable[[], int] | None = None,
        heartbeat: Callable[[], None],
        heartbeat_interval_sec: float,
        use_listen_notify: bool = True,
        max_running: int | None = None,
    ) -> None:
        self._rt = rt
        self._queue_names = queue_names
        # The fallback poll's interval, read at each pass (the runtime's if not given).
        self._poll_ms = poll_ms
        self._heartbeat = heartbeat
        self._heartbeat_interval_ms = round(heartbeat_interval_sec * 1000)
        self._max_running = max_running
        # Claimed and not yet finished (a claim counts from dispatch, before its thread starts).
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._starved: set[str] = set()  # queues skipped because this process was at its cap
        # What stopped each queue's last claim (claims.BLOCKED_*), if anything did.
        self._blocked: dict[str, str] = {}
        # Passes through the loop so far: a loop that wakes at once, pass after pass, shows.
        self.passes = 0
        # Queues last seen without limits shared between processes -> (priority_enabled,
        # worker_concurrency): claimed in one statement (claims.claim_unshared), this process
        # counting its own running workflows per queue (only it claims for its executor, so
        # the count is exact, and it never runs ahead of the database's).
        self._unshared: dict[str, tuple[bool, int | None]] = {}
        self._running_by_queue: dict[str, int] = {}
        # Queues with a claim under way: no enqueue starts their work directly meanwhile (for a
        # worker_concurrency, the claim's budget and a direct start would each count a slot
        # that the other is about to take).
        self._claiming: set[str] = set()
        self._claim_done = threading.Condition(self._inflight_lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dbos_nb-scheduler", daemon=True)
        self._listener: threading.Thread | None = None
        self.listener: Listener | None = None
        # Set when the listener (re)connects: notifications sent while it was not listening
        # (a cancel, an enqueue, a freed slot in another process) were lost.
        self._caught_up = threading.Event()
        self._caught_up.set()
        if use_listen_notify and rt.db.is_postgres:
            self.listener = listener = Listener(
                rt.db,
                self._on_notification,
                wants_dones=rt.waiters.active,
                on_dones_heard=rt.waiters.notify_all,
                on_dones_payload=self._on_finished_elsewhere,
                on_listening=self._catch_up,
            )
            rt.waiters.on_first = listener.want_dones
            self._listener = threading.Thread(
                target=listener.run, args=(self._stop,), name="dbos_nb-listener", daemon=True
            )

    def start(self) -> None:
        self._thread.start()
        if self._listener is not None:
            self._listener.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._rt.wake_scheduler()
        self._thread.join(timeout)
        if self._listener is not None:
            self._listener.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _on_notification(self, payload: str) -> None:
        if payload.startswith("done:"):  # cancelled or given up in another process
            self._on_done(payload[5:], stop_notice=True)
        elif payload.startswith("dones:"):  # (from a version that sent finishes here)
            for wid in json.loads(payload[6:]):
                self._on_done(wid)
        elif payload.startswith("q:") and payload != "q:*":
            self._rt.wake_scheduler(payload[2:])
        else:
            self._rt.wake_scheduler()

    def _hears_others(self) -> bool:
        """Whether other processes' notifications reach this one now."""
        return self._rt.db.notifications and (self.listener is None or self.listener.listening)

    def _catch_up(self) -> None:
        """The listener listens again: the next pass looks for what it may have missed (work
        cancelled or taken over elsewhere, enqueued or freed), and waiters read again."""
        self._caught_up.clear()
        self._rt.waiters.notify_all()
        self._rt.wake_scheduler()

    def _on_finished_elsewhere(self, payload: str) -> None:
        """DONES_CHANNEL: workflows that finished in another process (`done:<id>`, or
        `dones:<JSON list>`)."""
        if payload.startswith("done:"):
            self._on_done(payload[5:])
        elif payload.startswith("dones:"):
            for wid in json.loads(payload[6:]):
                self._on_done(wid)

    def _on_done(self, wid: str, stop_notice: bool = False) -> None:
        """A workflow ended (finished, cancelled) in another process."""
        self._rt.waiters.notify(wid)
        # Cancelled elsewhere: stop our execution of it at once, not at its next step.
        if self._rt.is_running(wid):
            row = self._rt.store.get_status_and_result(wid)
            if row is not None and row["status"] == "CANCELLED":
                self._rt.preempt([wid], "cancelled")
        elif stop_notice:
            # Perhaps claimed here a moment ago and not registered yet: its execution reads
            # its row when it registers (see `Runtime.stop_mark`).
            self._rt.missed_stop()

    def _loop(self) -> None:
        rt = self._rt
        last_sweep = 0
        last_refresh = 0
        last_full = 0
        last_beat = rt.now_ms()
        rate_slots: dict[str, int] = {}  # queue -> when its rate limiter frees a slot
        while not self._stop.is_set():
            self.passes += 1
            rt.wake_event.clear()
            claimed = 0
            now = rt.now_ms()
            poll_ms = self._poll_ms() if self._poll_ms else round(rt.polling_interval_sec * 1000)
            try:
                missed = not self._caught_up.is_set()
                if missed:
                    self._caught_up.set()
                if _due(now, last_sweep, SWEEP_INTERVAL_MS) or missed:
                    last_sweep = now
                    cancel_overdue(rt)
                    if not self._hears_others() or missed:
                        # Without notifications (SQLite, or a listener reconnecting), or after
                        # some were lost: look for what another process cancelled or took
                        # over here, as on SQLite at every sweep.
                        preempt_lost(rt)
                if _due(now, last_beat, self._heartbeat_interval_ms):
                    last_beat = now
                    self._heartbeat()
                if _due(now, last_refresh, REFRESH_INTERVAL_MS):
                    last_refresh = now
                    rt.resolver.refresh()
                everything, dirty = rt.take_dirty()
                if _due(now, last_full, poll_ms) or missed:
                    # The fallback poll: what no wake-up reached (other processes on SQLite).
                    everything, last_full = True, now
                # The queues served here, read once per pass (with listen_queues="*", a query).
                served: list[str] | None = None
                if rate_slots:
                    served = self._queue_names()
                    self._forget_gone(rate_slots, served)
                for queue_name, slot in rate_slots.items():
                    if slot <= now:
                        dirty.setdefault(queue_name, set()).add(WAKE_ANY)
                # Most wake-ups (a workflow ended on a queue that no slot limit stops) find
                # nothing worth a claim: keep them cheap, the workers need the GIL.
                targets: list[str] = []
                if everything:
                    targets = served if served is not None else self._queue_names()
                else:
                    worth = {q for q, reasons in dirty.items() if self._worth_claiming(q, reasons)}
                    if worth:
                        names = served if served is not None else self._queue_names()
                        targets = [q for q in names if q in worth]
                claimed = self._claim_from(targets, rate_slots, everything) if targets else 0
            except Exception:
                if self._stop.is_set():
                    return
                logger.exception("scheduler iteration failed; retrying")
                rt.wake_scheduler()
                self._stop.wait(0.5)
                continue
            if claimed:
                # Work arrives about as fast as it is taken: let the next enqueues and
                # completions gather for a moment, so that one claim takes them together.
                self._stop.wait(COALESCE_SEC)
            # The heartbeat is due on time even when nothing else wakes the loop: a late one
            # reads as a lapse of this process's own, which gives every other executor a new
            # lease, so that an idle process polling slowly never took over a dead one's work.
            next_wake = min(
                [last_full + poll_ms, last_beat + self._heartbeat_interval_ms, *rate_slots.values()]
            )
            if rt.has_running():
                next_wake = min(next_wake, now + SWEEP_INTERVAL_MS)
            delay = max((next_wake - rt.now_ms()) / 1000, 0.0)
            rt.wake_event.wait(min(delay, poll_ms / 1000))

    def _forget_gone(self, rate_slots: dict[str, int], served: list[str]) -> None:
        """Drop what is known of queues no longer served here (deleted, DBOS.delete_queue): a
        rate slot of one, never claimed again, would wake the loop at once, pass after pass."""
        for gone in [q for q in rate_slots if q not in served]:
            del rate_slots[gone]
            self._blocked.pop(gone, None)
            self._unshared.pop(gone, None)

    def _worth_claiming(self, queue_name: str, reasons: set[str]) -> bool:
        """Whether a claim can take anything, given why the queue was woken and what stopped
        its last claim (each claim is a write transaction: skipping useless ones matters)."""
        if WAKE_ANY in reasons:
            return True
        blocked = self._blocked.get(queue_name)
        if blocked == claims.BLOCKED_RATE:
            return False  # woken when its rate slot comes (computed), whatever is enqueued
        if blocked == claims.BLOCKED_CONCURRENCY:
            return WAKE_FREED in reasons
        if blocked == claims.BLOCKED_PARTITIONS:
            return True  # a new partition's work, or a full one's finish, may start now
        return WAKE_ENQUEUED in reasons  # a free slot changes nothing when slots don't limit

    def _claim_one(
        self,
        queue_name: str,
        names: Collection[str] | None,
        excluded: Collection[str],
        room: int,
        full: bool,
    ) -> ClaimResult:
        """One claim: the one-statement kind where the queue was last seen without limits
        shared between processes (except on the fallback poll, which re-reads every queue's
        settings)."""
        rt = self._rt
        with self._inflight_lock:
            # Every workflow of the queue this process runs or has reserved a slot for, those
            # whose direct start is still being written included (not yet in the database).
            mine = self._running_by_queue.get(queue_name, 0)
        known = self._unshared.get(queue_name)
        if known is not None and not full:
            priority, worker_concurrency = known
            budget = room
            if worker_concurrency is not None:
                budget = min(room, worker_concurrency - mine)
                if budget <= 0:
                    return ClaimResult(blocked=claims.BLOCKED_CONCURRENCY)
            taken = claims.claim_unshared(
                rt.db,
                queue_name,
                rt.executor_id,
                rt.now_ms,
                priority_enabled=priority,
                worker_concurrency=worker_concurrency,
                names=names,
                exclude_versions=excluded,
                max_rows=budget,
            )
            if taken:
                full_now = worker_concurrency is not None and len(taken) >= budget
                return ClaimResult(
                    claimed=taken, blocked=claims.BLOCKED_CONCURRENCY if full_now else None
                )
            # Nothing ready, or the settings changed: read them to know which.
        result = claims.claim(
            rt.db,
            queue_name,
            rt.executor_id,
            rt.now_ms,
            names=names,
            exclude_versions=excluded,
            max_rows=room,
            running_here=mine,
        )
        if result.unshared:
            self._unshared[queue_name] = (result.priority_enabled, result.worker_concurrency)
        else:
            self._unshared.pop(queue_name, None)
        return result

    def _claim_from(
        self, queue_names: list[str], rate_slots: dict[str, int], full: bool = False
    ) -> int:
        """Claim from each queue and dispatch what was claimed; returns how many. `full`: the
        fallback poll."""
        rt = self._rt
        names = rt.resolver.claimable_names()
        excluded = rt.resolver.excluded_versions()
        total = 0
        for queue_name in queue_names:
            if self._stop.is_set():
                return total
            room = claims.MAX_CLAIM_BATCH
            held = 0  # slots of the process's cap held for this claim
            with self._inflight_lock:
                if self._max_running is not None:
                    room = min(room, self._max_running - self._inflight)
                    if room <= 0:
                        self._starved.add(queue_name)  # retried when a running workflow ends
                        continue
                    # Held while the claim runs, so that no direct start takes them meanwhile.
                    held = room
                    self._inflight += held
                self._claiming.add(queue_name)
            mark = rt.stop_mark()
            try:
                result = self._claim_one(queue_name, names, excluded, room, full)
            except BaseException:
                with self._inflight_lock:
                    self._inflight -= held
                    self._claiming.discard(queue_name)
                    self._claim_done.notify_all()
                raise
            with self._inflight_lock:  # counted before any direct start can look again
                self._claiming.discard(queue_name)
                self._inflight += len(result.claimed) - held
                count = self._running_by_queue.get(queue_name, 0)
                self._running_by_queue[queue_name] = count + len(result.claimed)
                self._claim_done.notify_all()
            for item in result.claimed:
                item.stop_mark = mark
                self._dispatch(item)
            if len(result.claimed) >= room:
                rt.wake_scheduler(queue_name)  # there may be more right away
            if result.blocked is not None:
                self._blocked[queue_name] = result.blocked
            else:
                self._blocked.pop(queue_name, None)
            rt.mark_slot_bound(
                queue_name,
                result.blocked in (claims.BLOCKED_CONCURRENCY, claims.BLOCKED_PARTITIONS),
            )
            if result.next_rate_slot_ms is not None:
                rate_slots[queue_name] = result.next_rate_slot_ms
            else:
                rate_slots.pop(queue_name, None)
            total += len(result.claimed)
        return total

    def _dispatch(self, item: ClaimedWorkflow, is_async: bool | None = None) -> None:
        if is_async is None:
            reg = self._rt.resolver.resolve(item.name, item.function_hash)
            is_async = reg is not None and reg.is_async
        if is_async:
            self._run(item)  # only hands it to the loop: no thread needed
        else:
            self._rt.pool.submit(self._run, item)

    def _run(self, item: ClaimedWorkflow) -> None:
        future = None
        try:
            future = run_claimed(self._rt, item)
        finally:
            if future is None:
                self._done(item)
            else:  # an async workflow: it counts until it ends on the loop
                future.add_done_callback(lambda _f: self._done(item))

    def _done(self, item: ClaimedWorkflow) -> None:
        self._release(item.queue_name)

    def _release(self, queue_name: str) -> None:
        """A slot of `queue_name` is free: wake the claims that may wait for it."""
        with self._inflight_lock:
            self._inflight -= 1
            self._running_by_queue[queue_name] -= 1
            starved, self._starved = self._starved, set()
        self._rt.wake_scheduler(queue_name, WAKE_FREED)
        for starved_queue in starved:
            self._rt.wake_scheduler(starved_queue)

    # -- starting enqueued work directly (runtime.DirectStarter) --------------------------------

    def reserve(self, queue_name: str) -> DirectSlot | None:
        # Only queues whose last claim found no limit shared between processes: a
        # worker_concurrency is this process's own count, exact under the lock, as long as no
        # claim of the queue is under way (its budget was counted without this slot; with a
        # cap on the process, any claim holds the cap's room). Such a claim is waited for (one
        # round trip): written ENQUEUED instead, this workflow would need a claim of its own,
        # during which the next enqueue would wait, and so on.
        known = self._unshared.get(queue_name)
        if self._stop.is_set() or known is None:
            return None
        worker_concurrency = known[1]
        # On dbos_nb's event loop (an async workflow's enqueue), waiting would stall every
        # async workflow meanwhile. (A notebook's cell runs on the kernel's loop, which it
        # blocks anyway while it runs: there the wait is fine.)
        patience = 0.0 if self._rt.aio.runs_here() else CLAIM_WAIT_SEC

        def no_claim_counts_this_slot() -> bool:
            if self._max_running is not None and self._claiming:  # it holds the cap's room
                return False
            return worker_concurrency is None or queue_name not in self._claiming

        with self._claim_done:
            if not self._claim_done.wait_for(no_claim_counts_this_slot, patience):
                return None
            if self._stop.is_set():
                return None
            if self._max_running is not None and self._inflight >= self._max_running:
                return None
            running = self._running_by_queue.get(queue_name, 0)
            if worker_concurrency is not None and running >= worker_concurrency:
                return None
            self._inflight += 1
            self._running_by_queue[queue_name] = running + 1
        return DirectSlot(worker_concurrency)

    def cancel_reservation(self, queue_name: str) -> None:
        # A claim meanwhile counted this slot as taken and may have stopped at the queue's
        # limit or at the process's cap: it waits for a freed slot, as for a workflow that
        # ended.
        self._release(queue_name)

    def adopt(self, item: ClaimedWorkflow, is_async: bool) -> bool:
        if self._stop.is_set():
            self._release(item.queue_name)
            return False
        try:
            self._dispatch(item, is_async)
        except RuntimeError:
            # DBOS.destroy() got there first: the pool or the loop refuses new work.
            if not self._stop.is_set():
                raise
            if not is_async:  # an async one's `_run` gave its slot back already
                self._release(item.queue_name)
            return False
        return True

    @property
    def inflight(self) -> int:
        with self._inflight_lock:
            return self._inflight


def _due(now_ms: int, last_ms: int, interval_ms: int) -> bool:
    """Whether a periodic task last run at `last_ms` is due at `now_ms`. A clock set back
    (NTP correcting a clock that ran ahead) makes it due at once, and its interval counts
    again from there: waiting for the clock to come back to `last_ms` would stop the
    heartbeat for as long as the clock was ahead, and a live executor would lose its work."""
    return now_ms - last_ms >= interval_ms or now_ms < last_ms
