"""An elastic thread pool: a submitted task never waits for a busy thread.

Workflows block on each other (a parent waits on the handles of the children it enqueued), so a
bounded pool can deadlock. This pool reuses an idle thread when there is one and starts a new one
otherwise; threads that stay idle for a while exit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_STOP = object()


class ElasticPool:
    """Runs callables on daemon threads, growing and shrinking with demand."""

    def __init__(self, name: str, idle_timeout: float = 30.0) -> None:
        self._name = name
        self._idle_timeout = idle_timeout
        self._tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # idle threads not yet reserved by a submitted task
        self._threads: set[threading.Thread] = set()
        self._stopped = False
        self._counter = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on a pool thread; raises RuntimeError after `shutdown`."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"pool {self._name} is shut down")
            self._tasks.put((fn, args))
            if self._idle > 0:
                self._idle -= 1
                return
            self._counter += 1
            thread = threading.Thread(
                target=self._run, name=f"{self._name}-{self._counter}", daemon=True
            )
            self._threads.add(thread)
        thread.start()

    def _run(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                try:
                    item = self._tasks.get(timeout=self._idle_timeout)
                except queue.Empty:
                    with self._lock:
                        # Queue empty under the lock means no task holds a reservation on us.
                        if self._tasks.empty():
                            self._idle -= 1
                            return
                    continue
                if item is _STOP:
                    return
                fn, args = item
                try:
                    fn(*args)
                except BaseException:  # a task's failure must not kill the pool thread
                    logger.exception("task on %s failed", me.name)
                # An idle thread must not keep its last task's arguments alive (a workflow's
                # inputs: a 50 MB DataFrame per idle thread, until the thread exits).
                del item, fn, args
                with self._lock:
                    if self._stopped:
                        return
                    self._idle += 1
        finally:
            with self._lock:
                self._threads.discard(me)

    def shutdown(self, timeout: float) -> bool:
        """Stop accepting tasks, wake idle threads, wait up to `timeout` s for all to exit.

        Returns True if every thread exited.
        """
        with self._lock:
            self._stopped = True
            threads = list(self._threads)
        for _ in threads:
            self._tasks.put(_STOP)
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is threading.current_thread():
                continue
            thread.join(max(deadline - time.monotonic(), 0.0))
        with self._lock:
            return not any(
                t.is_alive() for t in self._threads if t is not threading.current_thread()
            )

    @property
    def thread_count(self) -> int:
        with self._lock:
            return len(self._threads)
