"""Whether this machine's clock agrees with the database server's.

Processes compare each other's timestamps: a lease runs out by the heartbeat another process
wrote, a workflow's deadline is set by the process that dequeued it and enforced by any, and a
rate limit's window counts starts stamped by every process. On one machine they share a clock;
across machines they only agree as far as the machines' clocks do. A clock some seconds off
makes other processes' leases look expired (their running steps would run twice), deadlines
pass early or late, and windows hold more starts than the limit. NTP keeps clocks within a few
milliseconds; a machine without it can drift by seconds a day.

On PostgreSQL, where processes of several machines meet, each launched process compares its
clock with the server's (the one clock every process can read) at launch and now and then. When
they are surely more than SKEW_WARN_MS apart (beyond what the round trip leaves uncertain), it
logs a warning and from then on stamps and judges time by the server's clock: the engine's clock
(`CorrectedClock`) adds the offset found, measured again at every heartbeat while it applies,
until this machine's clock surely agrees again. Processes whose clocks agree with the server's
are not corrected at all, so a correction only ever applies where times would otherwise be
compared across a skew. Two limits of a reference clock: two machines each just under the
threshold, in opposite directions, are up to twice it apart uncorrected; and when the server's
own clock is the one that is off (a container VM that drifted while a laptop slept), every
process corrects to it, which keeps them in agreement, and stored times follow the server's.
SQLite's processes all run on its machine: nothing to compare.
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
# How often a launched process compares clocks while they agree (at launch, then with its
# heartbeat); while a correction applies, at every heartbeat, so that a clock that NTP sets
# right is not corrected twice for long.
CHECK_EVERY_SEC = 60.0


class SkewWatch:
    """Compares this machine's clock with the database's and keeps the correction to apply
    (see the module docstring)."""

    def __init__(self, clock: Clock, monotonic: Callable[[], float] = time.monotonic) -> None:
        # An injected clock (tests moving time by hand) is meant to differ from the server's.
        self._clock = clock if isinstance(clock, SystemClock) else None
        self._monotonic = monotonic
        self._next_check = float("-inf")
        self.skewed = False  # the clocks were found apart, and not yet found in agreement
        self.offset_ms = 0  # what `CorrectedClock` adds: the server's clock minus this one

    def check(self, database_time_ms: Callable[[], int | None]) -> float | None:
        """Compare the clocks if it is time to (the first call always is); returns the offset
        found (the server's clock minus this one, in milliseconds), or None if none was
        measured (an injected clock, SQLite, or not yet time)."""
        clock = self._clock
        if clock is None or (not self.skewed and self._monotonic() < self._next_check):
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
        if abs(offset) - uncertain > SKEW_WARN_MS:
            if not self.skewed:
                logger.warning(
                    "this machine's clock is %.3f s %s the database server's: this process now "
                    "keeps time by the server's clock, so that processes on other machines judge "
                    "its leases, deadlines and rate-limit starts right; synchronize the "
                    "machines' clocks (NTP)",
                    abs(offset) / 1000,
                    "behind" if offset > 0 else "ahead of",
                )
            self.skewed = True
            self.offset_ms = round(offset)  # followed while it applies (a clock that drifts)
        elif abs(offset) + uncertain <= SKEW_WARN_MS / 2 and self.skewed:
            self.skewed = False
            self.offset_ms = 0
            logger.info(
                "this machine's clock agrees with the database server's again (within %.3f s): "
                "this process keeps time by its own clock again",
                (abs(offset) + uncertain) / 1000,
            )
        return offset


class CorrectedClock:
    """This machine's clock plus the correction a `SkewWatch` keeps (0 while the clocks agree):
    the engine's clock on PostgreSQL."""

    def __init__(self, base: Clock, watch: SkewWatch) -> None:
        self._base = base
        self._watch = watch

    def now_ms(self) -> int:
        return self._base.now_ms() + self._watch.offset_ms
