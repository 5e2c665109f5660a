"""Whether this machine's clock agrees with the database server's.

Processes compare each other's timestamps: a lease runs out by the heartbeat another process
wrote, a workflow's deadline is set by the process that dequeued it and enforced by any, and a
rate limit's window counts starts stamped by every process. On one machine they share a clock;
across machines they only agree as far as the machines' clocks do. A clock some seconds off
makes other processes' leases look expired (their running steps would run twice), deadlines
pass early or late, and windows hold more starts than the limit. NTP keeps clocks within a few
milliseconds; a machine without it can drift by seconds a day.

On PostgreSQL, where processes of several machines meet, each launched process compares its
clock with the server's now and then (the one clock every process can read; dbos_nb itself never
uses it) and logs a warning when they are surely more than SKEW_WARN_MS apart (beyond what the
round trip leaves uncertain), and a note once they surely agree again. Two limits of a reference
clock: two machines each just under the threshold, in opposite directions, are up to twice it
apart unreported; and a server whose own clock is off (a container VM that drifted while a
laptop slept) makes every process warn, though processes on one machine still agree with each
other. SQLite's processes all run on its machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dbos_nb.clock import Clock, SystemClock

logger = logging.getLogger(__name__)

# The shortest margin a rate limiter's window keeps for jitter (`limiter_guard_ms`): a skew
# beyond it can let a window hold more starts than its limit. Far above what NTP leaves (a few
# milliseconds), far below a lease.
SKEW_WARN_MS = 50
# How often a launched process compares clocks (at launch, then with its heartbeat).
CHECK_EVERY_SEC = 60.0


class SkewWatch:
    """Compares the engine's clock with the database's (see the module docstring)."""

    def __init__(self, clock: Clock, monotonic: Callable[[], float] = time.monotonic) -> None:
        # An injected clock (tests moving time by hand) is meant to differ from the server's.
        self._clock = clock if isinstance(clock, SystemClock) else None
        self._monotonic = monotonic
        self._next_check = float("-inf")
        self.skewed = False  # the last comparison found the clocks apart

    def check(self, database_time_ms: Callable[[], int | None]) -> float | None:
        """Compare the clocks if it is time to (the first call always is); returns the offset
        found (the server's clock minus this one, in milliseconds), or None if none was
        measured (an injected clock, SQLite, or not yet time)."""
        clock = self._clock
        if clock is None or self._monotonic() < self._next_check:
            return None
        self._next_check = self._monotonic() + CHECK_EVERY_SEC
        before = clock.now_ms()
        server = database_time_ms()
        after = clock.now_ms()
        if server is None:
            self._clock = None  # a database without a clock of its own to compare: never again
            return None
        offset = server - (before + after) / 2
        # The server read its clock somewhere within the round trip.
        uncertain = (after - before) / 2 + 1
        if uncertain > SKEW_WARN_MS:
            return None  # too slow a reading to tell either way: the next one may
        if abs(offset) - uncertain > SKEW_WARN_MS and not self.skewed:
            self.skewed = True
            logger.warning(
                "this machine's clock is %.3f s %s the database server's: processes on other "
                "machines judge this one's leases, deadlines and rate-limit starts by their own "
                "clocks, and may take over its running workflows, cancel them early or exceed "
                "a rate limit; synchronize the machines' clocks (NTP)",
                abs(offset) / 1000,
                "behind" if offset > 0 else "ahead of",
            )
        elif abs(offset) + uncertain <= SKEW_WARN_MS / 2 and self.skewed:
            self.skewed = False
            logger.info(
                "this machine's clock agrees with the database server's again (within %.3f s)",
                (abs(offset) + uncertain) / 1000,
            )
        return offset
