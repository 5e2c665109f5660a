"""The rate limiter's ledger: when each of a queue's workflows started, to count the starts (and
the tokens) inside the queue's sliding windows.

A claim reads the windows under the queue's row lock (`read_windows`), records the starts it
makes (`record_starts`), and the workflow moves its entry to the time its work really began
(`record_real_start`). `Windows` answers how much room is left and when the next slot opens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from dbos_nb.models import QueueSettings
from dbos_nb.storage.database import Database
from dbos_nb.storage.schema import queue_starts

qs = queue_starts

_WINDOW = (
    select(qs.c.started_at_ms)
    .where(qs.c.queue_name == bindparam("q"), qs.c.started_at_ms > bindparam("open"))
    .order_by(qs.c.started_at_ms)
)
_TOKEN_WINDOW = _WINDOW.add_columns(qs.c.tokens)
_PRUNE = delete(qs).where(
    qs.c.queue_name == bindparam("q"), qs.c.started_at_ms <= bindparam("oldest")
)
_LEDGER_START = insert(qs).values(
    queue_name=bindparam("q"),
    started_at_ms=bindparam("t"),
    workflow_uuid=bindparam("w"),
    tokens=bindparam("n"),
    partition_key=bindparam("p"),
)


def limiter_guard_ms(period_ms: int) -> int:
    """A start stays in the window this much longer than `period`.

    The ledger holds when each workflow began its first operation (see `record_real_start`);
    the step body, or the provider it calls, sees the start a little later still (thread
    scheduling under load: a few to a few tens of milliseconds). 2% of the period, at least 50 ms
    and at most a second, absorbs that jitter so that no window, measured there, holds
    `limit + 1` starts. For an API limit per minute that costs under 2% of the budget.
    """
    return min(max(period_ms // 50, 50), 1000)


def window_open(now_ms: int, period_ms: int) -> int:
    """Starts after this time are inside a window of `period_ms` ending now."""
    return now_ms - period_ms - limiter_guard_ms(period_ms)


def next_opening(
    entries: list[tuple[int, int]], limit: int, period_ms: int, need: int
) -> int | None:
    """When a sliding window holding these (start, weight) entries first admits `need` more
    under `limit`: just after the last entry that has to leave it is out (None: it admits them
    now). The one computation behind both limiters (a request weighs 1).

    An empty window admits anything (a task larger than the whole token budget starts alone),
    so the newest entry's departure always opens it.
    """
    total = sum(n for _, n in entries)
    if total + need <= limit:
        return None
    # Oldest first; a start moved to its real beginning (`record_real_start`) may be a little
    # later than the claim's own clock reading.
    ordered = sorted(entries)
    for i, (started, weight) in enumerate(ordered):
        total -= weight
        if total + need <= limit or i == len(ordered) - 1:
            return started + period_ms + limiter_guard_ms(period_ms) + 1
    return None  # unreachable: the loop returns at the last entry


@dataclass
class Windows:
    """A queue's windows as a claim found them (and, after `add`, as it leaves them): the starts
    in the request window, and the (start, tokens) entries in the token window."""

    queue: QueueSettings
    starts: list[int] = field(default_factory=list)
    token_entries: list[tuple[int, int]] = field(default_factory=list)

    @property
    def room(self) -> int | None:
        """Starts the request window still admits (None: no request limit)."""
        if self.queue.limit is None or self.queue.period_ms is None:
            return None
        return self.queue.limit - len(self.starts)

    @property
    def tokens_left(self) -> int | None:
        """Tokens the token window still admits (None: no token limit)."""
        if self.queue.token_limit is None or self.queue.token_period_ms is None:
            return None
        return self.queue.token_limit - sum(n for _, n in self.token_entries)

    def add(self, now_ms: int, estimates: list[int]) -> None:
        """Count starts the claim just made (with these token estimates) as the ledger now does.

        The slots below are computed from these lists alone: a claim that admitted work into a
        window it found empty must still know when that work leaves it, or nothing would wake
        the scheduler before its fallback poll (the ledger is not read again: no round trip).
        """
        self.starts.extend([now_ms] * len(estimates))
        self.token_entries.extend((now_ms, n) for n in estimates)

    def next_slot(self) -> int | None:
        """When the request window next has room for one more start, if it is full now."""
        limit, period_ms = self.queue.limit, self.queue.period_ms
        if limit is None or period_ms is None or len(self.starts) < limit:
            return None  # the common case, answered without building the entries
        return next_opening([(t, 1) for t in self.starts], limit, period_ms, 1)

    def token_slot(self, need: int = 1) -> int | None:
        """When the token window next has room for `need` more tokens (None: room now, or no
        token limit). `need` is the next candidate's estimate; 1, the least that can pass, when
        the claim did not read it."""
        limit, period_ms = self.queue.token_limit, self.queue.token_period_ms
        if limit is None or period_ms is None:
            return None
        return next_opening(self.token_entries, limit, period_ms, need)

    def fit_tokens(self, estimates: list[int]) -> tuple[int, bool]:
        """How many candidates, in order, with these token estimates the token window admits
        (FIFO: no skipping ahead), and whether the budget stopped the rest.

        A single task larger than the whole budget is admitted alone into an empty window, or
        it would wait forever.
        """
        left = self.tokens_left
        if left is None:
            return len(estimates), False
        admitted = 0
        for need in estimates:
            if need > left and not (not self.token_entries and admitted == 0):
                return admitted, True
            admitted += 1
            left -= need
        return admitted, False


def read_windows(conn: Connection, queue: QueueSettings, now_ms: int) -> Windows:
    """Forget starts older than every window of the queue, then read its windows (in the
    claim's transaction, under the queue's row lock)."""
    windows = Windows(queue)
    periods = [
        p
        for p in (queue.period_ms, queue.token_period_ms, queue.partition_period_ms)
        if p is not None
    ]
    if not periods:
        return windows
    conn.execute(_PRUNE, {"q": queue.name, "oldest": window_open(now_ms, max(periods))})
    if queue.limit is not None and queue.period_ms is not None:
        opened = window_open(now_ms, queue.period_ms)
        windows.starts = list(conn.execute(_WINDOW, {"q": queue.name, "open": opened}).scalars())
    if queue.token_limit is not None and queue.token_period_ms is not None:
        token_open = window_open(now_ms, queue.token_period_ms)
        windows.token_entries = [
            (int(t), int(n))
            for t, n in conn.execute(_TOKEN_WINDOW, {"q": queue.name, "open": token_open})
        ]
    return windows


def record_starts(
    conn: Connection,
    queue_name: str,
    now_ms: int,
    started: list[tuple[str, int]],
    partitions: dict[str, str | None] | None = None,
) -> None:
    """Count these (workflow id, token estimate) starts in the queue's windows (and in their
    partition's, on a partitioned queue: `partitions` maps an id to its key)."""
    keys = partitions or {}
    conn.execute(
        _LEDGER_START,
        [{"q": queue_name, "t": now_ms, "w": w, "n": n, "p": keys.get(w)} for w, n in started],
    )


# A commit slower than this (a checkpoint's fsyncs, a stalled disk, the wait for the GIL
# among dozens of threads starting at once: tens of milliseconds) moves the start again: the
# work begins only after the commit, and the guard (50 ms and up) must not be eaten by the
# database's own delay.
_RESTAMP_AFTER_MS = 10
_RESTAMPS = 5


def record_real_start(
    db: Database, queue_name: str, workflow_id: str, claimed_at_ms: int, clock: Callable[[], int]
) -> None:
    """Move a start in the rate limiter's ledger from claim time to when the work began.

    A claimed workflow reaches its first step a little after the claim (milliseconds, more under
    load). Counting from the real start keeps every window honest as measured where the work
    runs. The update lands long before the entry could leave the window, so every later claim
    sees it. The clock is read once the transaction holds its locks, never before a wait, and
    again after the commit. A slow commit moves the start again, ahead of the clock by twice
    what the slow commit took: a stamp later than the real start only makes the limiter
    stricter, while one written before a wait that is as slow again would be early again
    (three restamps at the clock's reading still left one 74 ms early, past the 50 ms guard,
    when 50 workflows started at once on a loaded machine).
    """
    recorded = claimed_at_ms
    ahead = 0
    for attempt in range(_RESTAMPS):
        with db.write() as conn:
            stamp = clock() + ahead
            conn.execute(
                update(qs)
                .where(
                    qs.c.queue_name == queue_name,
                    qs.c.workflow_uuid == workflow_id,
                    qs.c.started_at_ms == recorded,
                )
                .values(started_at_ms=stamp)
            )
        recorded = stamp
        early = clock() - stamp  # how far the work now runs past its stamp
        if early <= _RESTAMP_AFTER_MS:
            return
        # The whole write took early + ahead; the last attempt stamps further ahead still
        # (nothing is tried after it).
        ahead = (2 if attempt < _RESTAMPS - 2 else 4) * (early + ahead)


def window_usage(db: Database, queue_name: str, limit_period_ms: int, now_ms: int) -> int:
    """How many starts the rate limiter's window holds right now (for progress views)."""
    opened = window_open(now_ms, limit_period_ms)
    with db.read() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    qs.c.queue_name == queue_name, qs.c.started_at_ms > opened
                )
            ).scalar_one()
        )
