"""A machine whose clock disagrees with the database server's is told so (PostgreSQL): other
machines' processes judge its leases, deadlines and rate-limit starts by their own clocks."""

from __future__ import annotations

import logging
import re

import pytest

from conftest import config, wait_until
from dbos_nb import DBOS
from dbos_nb.clock import ManualClock, SystemClock
from dbos_nb.core import clock_skew
from dbos_nb.core.clock_skew import CHECK_EVERY_SEC, SKEW_WARN_MS, SkewWatch
from dbos_nb.core.runtime import get_runtime


class SkewedClock(SystemClock):
    """The real clock, `offset_ms` ahead (a machine without NTP)."""

    def __init__(self, offset_ms: int) -> None:
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        return super().now_ms() + self.offset_ms


class Monotonic:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == clock_skew.__name__]


def _seconds(message: str) -> float:
    """The skew a warning states (measured: 7 s may read 6.998 s)."""
    found = re.search(r"clock is ([0-9.]+) s", message)
    assert found is not None, message
    return float(found.group(1))


def test_a_skewed_clock_is_reported_once_and_its_recovery_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SkewedClock(0)
    monotonic = Monotonic()
    watch = SkewWatch(clock, monotonic)
    server = SystemClock()
    caplog.set_level(logging.INFO, logger=clock_skew.__name__)

    offset = watch.check(server.now_ms)
    assert offset is not None and abs(offset) < SKEW_WARN_MS
    assert _warnings(caplog) == [] and not watch.skewed

    clock.offset_ms = 5_000  # this machine runs 5 s ahead
    assert watch.check(server.now_ms) is None  # not time to compare again yet
    monotonic.now += CHECK_EVERY_SEC
    offset = watch.check(server.now_ms)
    assert offset is not None and -5_100 < offset < -4_900
    (message,) = _warnings(caplog)
    assert _seconds(message) == pytest.approx(5, abs=0.1)
    assert "ahead of the database server's" in message
    assert "NTP" in message

    monotonic.now += CHECK_EVERY_SEC
    watch.check(server.now_ms)
    assert len(_warnings(caplog)) == 1  # said once, not at every comparison

    clock.offset_ms = -3_000  # and 3 s behind: still apart, nothing new to say
    monotonic.now += CHECK_EVERY_SEC
    watch.check(server.now_ms)
    assert len(_warnings(caplog)) == 1 and watch.skewed

    clock.offset_ms = 0
    monotonic.now += CHECK_EVERY_SEC
    watch.check(server.now_ms)
    assert "agrees with the database server's again" in _warnings(caplog)[-1]
    assert caplog.records[-1].levelno == logging.INFO
    assert not watch.skewed


class ScriptedClock(SystemClock):
    """A wall clock read at given times: the two readings around each server reading."""

    def __init__(self, readings: list[int]) -> None:
        self.readings = readings

    def now_ms(self) -> int:
        return self.readings.pop(0)


def test_only_readings_that_tell_change_the_verdict(caplog: pytest.LogCaptureFixture) -> None:
    """The server read its clock somewhere within the round trip: a skew is reported once it
    is surely beyond SKEW_WARN_MS, cleared once the clocks surely agree, and a reading too
    slow to tell either way changes nothing (a loaded machine must not flap between the two)."""
    caplog.set_level(logging.INFO, logger=clock_skew.__name__)
    skew = 3 * SKEW_WARN_MS  # the server is this far ahead of this clock
    # (this clock before, after) the server's reading, which is at 1_000_000 + skew each time.
    rounds = [
        (1_000_000, 1_000_002),  # quick: the skew is sure
        (1_000_000 - 2 * skew, 1_000_000),  # slow: cannot tell (a huge uncertainty)
        (1_000_000 + skew - SKEW_WARN_MS, 1_000_000 + skew + SKEW_WARN_MS - 4),  # maybe in step
        (1_000_000 + skew - 1, 1_000_000 + skew + 1),  # quick and in step: agreement is sure
    ]
    clock = ScriptedClock([t for pair in rounds for t in pair])
    monotonic = Monotonic()
    watch = SkewWatch(clock, monotonic)
    verdicts = []
    for _ in rounds:
        watch.check(lambda: 1_000_000 + skew)
        verdicts.append(watch.skewed)
        monotonic.now += CHECK_EVERY_SEC
    assert verdicts == [True, True, True, False]
    assert len(_warnings(caplog)) == 2  # the skew, then the agreement: nothing in between


def test_behind_is_told_apart_from_ahead(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=clock_skew.__name__)
    SkewWatch(SkewedClock(-2_500)).check(SystemClock().now_ms)
    (message,) = _warnings(caplog)
    assert _seconds(message) == pytest.approx(2.5, abs=0.1)
    assert "behind the database server's" in message


def test_what_cannot_be_compared_is_never_read(caplog: pytest.LogCaptureFixture) -> None:
    """An injected clock is meant to differ from the server's; SQLite has no server clock."""
    reads: list[int] = []

    def database_time() -> int:
        reads.append(1)
        return 0

    caplog.set_level(logging.WARNING, logger=clock_skew.__name__)
    assert SkewWatch(ManualClock(1_000)).check(database_time) is None
    assert reads == []
    monotonic = Monotonic()
    watch = SkewWatch(SystemClock(), monotonic)
    assert watch.check(lambda: None) is None
    monotonic.now += CHECK_EVERY_SEC
    assert watch.check(database_time) is None  # SQLite once, SQLite for good
    assert reads == [] and _warnings(caplog) == []


def test_a_launched_process_compares_its_clock_with_the_servers(
    db_url: str, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=clock_skew.__name__)
    DBOS(config=config(db_url), clock=SkewedClock(7_000))
    DBOS.launch()
    if backend == "sqlite":
        # One machine, one clock: nothing to compare with.
        assert get_runtime().db.server_time_ms() is None
        assert _warnings(caplog) == []
        return
    (message,) = _warnings(caplog)
    assert _seconds(message) == pytest.approx(7, abs=0.1)
    assert "ahead of the database server's" in message


def test_a_launched_process_in_step_with_the_server_says_nothing(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=clock_skew.__name__)
    DBOS(config=config(db_url))
    DBOS.launch()
    server = get_runtime().db.server_time_ms()
    if server is not None:  # PostgreSQL: the same machine's clock
        assert abs(server - SystemClock().now_ms()) < SKEW_WARN_MS
    assert _warnings(caplog) == []


def test_the_heartbeat_compares_again(
    launched_pg: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock that goes wrong while the process runs (a suspended VM, a manual change) is
    found at a later heartbeat; here every heartbeat compares."""
    DBOS.destroy()
    monkeypatch.setattr(clock_skew, "CHECK_EVERY_SEC", 0.0)
    caplog.set_level(logging.WARNING, logger=clock_skew.__name__)
    clock = SkewedClock(0)
    DBOS(config=config(launched_pg, heartbeat_interval_sec=0.1), clock=clock)
    DBOS.launch()
    assert _warnings(caplog) == []
    clock.offset_ms = -4_000
    wait_until(lambda: len(_warnings(caplog)) == 1)
    assert _seconds(_warnings(caplog)[0]) == pytest.approx(4, abs=0.1)
    assert "behind" in _warnings(caplog)[0]
