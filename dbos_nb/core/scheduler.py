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

import logging
import threading
from collections.abc import Callable

from dbos_nb.core.runtime import Runtime
from dbos_nb.core.workflows import run_claimed
from dbos_nb.models import ClaimedWorkflow
from dbos_nb.storage import claims

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_MS = 100
REFRESH_INTERVAL_MS = 1000


class Scheduler:
    """Claim loop, deadline sweep, heartbeat and notification listener of one runtime."""

    def __init__(
        self,
        rt: Runtime,
        queue_names: Callable[[], list[str]],
        *,
        heartbeat: Callable[[], None],
        heartbeat_interval_sec: float,
        use_listen_notify: bool = True,
        max_running: int | None = None,
    ) -> None:
        self._rt = rt
        self._queue_names = queue_names
        self._heartbeat = heartbeat
        self._heartbeat_interval_ms = round(heartbeat_interval_sec * 1000)
        self._max_running = max_running
        # Claimed and not yet finished (a claim counts from dispatch, before its thread starts).
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dbos_nb-scheduler", daemon=True)
        self._listener: threading.Thread | None = None
        if use_listen_notify and rt.db.is_postgres:
            self._listener = threading.Thread(
                target=rt.db.listen,
                args=(self._on_notification, self._stop),
                name="dbos_nb-listener",
                daemon=True,
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
        if payload.startswith("done:"):
            wid = payload[5:]
            self._rt.waiters.notify(wid)
            # Cancelled elsewhere: stop our execution of it at once, not at its next step.
            if self._rt.is_running(wid):
                row = self._rt.store.get_status_and_result(wid)
                if row is not None and row["status"] == "CANCELLED":
                    self._rt.preempt([wid], "cancelled")
        else:
            self._rt.wake_scheduler()

    def _loop(self) -> None:
        rt = self._rt
        last_sweep = 0
        last_refresh = 0
        last_beat = rt.now_ms()
        while not self._stop.is_set():
            rt.wake_event.clear()
            now = rt.now_ms()
            poll_ms = round(rt.polling_interval_sec * 1000)
            next_wake = now + poll_ms
            try:
                if now - last_sweep >= SWEEP_INTERVAL_MS:
                    last_sweep = now
                    self._sweep_deadlines(now)
                if now - last_beat >= self._heartbeat_interval_ms:
                    last_beat = now
                    self._heartbeat()
                more = False
                if now - last_refresh >= REFRESH_INTERVAL_MS:
                    last_refresh = now
                    rt.resolver.refresh()
                names = rt.resolver.claimable_names()
                excluded = rt.resolver.excluded_versions()
                for queue_name in self._queue_names():
                    if self._stop.is_set():
                        return
                    room = claims.MAX_CLAIM_BATCH
                    if self._max_running is not None:
                        with self._inflight_lock:
                            room = min(room, self._max_running - self._inflight)
                        if room <= 0:
                            break  # a finishing workflow wakes us
                    result = claims.claim(
                        rt.db,
                        queue_name,
                        rt.executor_id,
                        rt.now_ms,
                        names=names,
                        exclude_versions=excluded,
                        max_rows=room,
                    )
                    for item in result.claimed:
                        with self._inflight_lock:
                            self._inflight += 1
                        rt.pool.submit(self._run, item)
                    if len(result.claimed) >= claims.MAX_CLAIM_BATCH:
                        more = True
                    if result.next_rate_slot_ms is not None:
                        next_wake = min(next_wake, result.next_rate_slot_ms)
                if more:
                    continue
                next_wake = (
                    min(next_wake, now + SWEEP_INTERVAL_MS) if rt.running_ids() else next_wake
                )
            except Exception:
                if self._stop.is_set():
                    return
                logger.exception("scheduler iteration failed; retrying")
                self._stop.wait(0.5)
                continue
            delay = max((next_wake - rt.now_ms()) / 1000, 0.0)
            rt.wake_event.wait(min(delay, poll_ms / 1000))

    def _run(self, item: ClaimedWorkflow) -> None:
        try:
            run_claimed(self._rt, item)
        finally:
            with self._inflight_lock:
                self._inflight -= 1
            self._rt.wake_scheduler()

    @property
    def inflight(self) -> int:
        with self._inflight_lock:
            return self._inflight

    def _sweep_deadlines(self, now: int) -> None:
        cancelled = self._rt.store.cancel_overdue(now)
        if cancelled:
            logger.info("cancelled %d workflow(s) past their deadline", len(cancelled))
            self._rt.preempt(cancelled, "timed out")
            for wid in cancelled:
                self._rt.waiters.notify(wid)
