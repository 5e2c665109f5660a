"""Work held back by a queue's rate or token limiter starts when the window frees, not at the
scheduler's next fallback poll, on SQLite and PostgreSQL.

The polling interval is far longer than the test's bound, so only the computed wake-up (the
claim's `next_rate_slot_ms`) can start the held-back work in time.
"""

from __future__ import annotations

import threading
import time

from conftest import config, wait_until
from dbos_nb import DBOS, Queue
from dbos_nb.models import QueueSettings
from dbos_nb.storage.rate_ledger import Windows, limiter_guard_ms

# The scheduler's fallback poll: never reached within the test's bounds.
POLL_SEC = 30.0
# How long the held-back work may take to start: generous, and far below the poll.
WITHIN_SEC = 10.0


def _run_three(queue: Queue, tokens: int | None) -> None:
    """Enqueue three workflows that each fill the queue's window alone; assert all start (and
    finish) well before the fallback poll could have started them."""
    started: list[int] = []
    lock = threading.Lock()

    @DBOS.step()
    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.5)  # still running when the next window opens: no completion helps
        return i

    DBOS.launch()
    handles = queue.enqueue_many(work, [0, 1, 2], tokens=tokens)
    wait_until(lambda: len(started) == 3, timeout=WITHIN_SEC)
    assert sorted(started) == [0, 1, 2]
    assert [h.get_result(timeout_sec=WITHIN_SEC) for h in handles] == [0, 1, 2]


def test_token_budget_starts_held_back_work_when_the_window_frees(db_url: str) -> None:
    # 60 + 60 > 100: each claim admits one task into a window it found empty; the next one
    # must start when that task's tokens leave the 0.2 s window.
    DBOS(config=config(db_url, polling_interval_sec=POLL_SEC))
    q = Queue("tq", token_limiter={"limit": 100, "period": 0.2})
    _run_three(q, tokens=60)


def test_request_limit_starts_held_back_work_when_the_window_frees(db_url: str) -> None:
    DBOS(config=config(db_url, polling_interval_sec=POLL_SEC))
    q = Queue("rq", limiter={"limit": 1, "period": 0.2})
    _run_three(q, tokens=None)


def test_windows_slots_count_the_claims_own_starts() -> None:
    period = 1000
    after = period + limiter_guard_ms(period) + 1  # a start leaves the window this much later
    settings = QueueSettings(
        "q", limit=2, period_ms=period, token_limit=100, token_period_ms=period
    )

    # An empty window: room, until the claim adds what it admitted.
    windows = Windows(settings)
    assert (windows.next_slot(), windows.token_slot(60)) == (None, None)
    windows.add(5_000, [60, 30])
    assert windows.next_slot() == 5_000 + after
    assert windows.token_slot(60) == 5_000 + after
    assert windows.token_slot(10) is None  # 90 + 10 fits

    # Entries read from the ledger: wait only until enough tokens have left for the need.
    windows = Windows(settings, token_entries=[(1_000, 30), (2_000, 30), (3_000, 30)])
    assert windows.token_slot(10) is None
    assert windows.token_slot(30) == 1_000 + after  # 60 + 30 fits
    assert windows.token_slot(60) == 2_000 + after  # 30 + 60 fits
    # Larger than the whole budget: it starts alone, once the window is empty.
    assert windows.token_slot(150) == 3_000 + after

    # The request window: the oldest start that must leave for one more to fit.
    windows = Windows(settings, starts=[1_000, 2_000])
    assert windows.next_slot() == 1_000 + after
    windows.add(2_500, [0])
    assert windows.next_slot() == 2_000 + after
