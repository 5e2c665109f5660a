"""Queue settings: validating a declaration (`Queue(...)`, `register_queue`) or a change of one
setting (`Queue.set_limiter(...)` and the other setters) into the `QueueSettings` that the
database stores, with an error naming the queue and the problem."""

from __future__ import annotations

import dataclasses
from typing import Any

from dbos_nb.core.context import check_id_length, valid_seconds
from dbos_nb.errors import InvalidQueueSettingsError
from dbos_nb.models import INTERNAL_QUEUE, QueueSettings

_LIMITER_KEYS = {"limit", "period"}
# What the database's columns hold (PostgreSQL refuses more; SQLite would store anything): counts
# are INTEGER. (Names: see `check_id_length`; durations: `valid_seconds`.)
MAX_COUNT = 2**31 - 1


def _positive_int(name: str, value: Any, queue: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise InvalidQueueSettingsError(
            f"queue {queue!r}: {name} must be a positive integer up to 2**31-1 or None, "
            f"got {value!r}"
        )
    return value


def build_settings(
    name: str,
    concurrency: Any = None,
    worker_concurrency: Any = None,
    limiter: Any = None,
    priority_enabled: Any = False,
    polling_interval_sec: Any = 1.0,
    token_limiter: Any = None,
    partition_concurrency: Any = None,
    partition_worker_concurrency: Any = None,
    partition_limiter: Any = None,
) -> QueueSettings:
    """Validate a queue declaration; raises InvalidQueueSettingsError naming the problem."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidQueueSettingsError(f"a queue name must be a non-empty string, got {name!r}")
    check_id_length(name, "a queue name", InvalidQueueSettingsError)
    if name == INTERNAL_QUEUE:
        raise InvalidQueueSettingsError(f"the queue name {name!r} is reserved")
    conc = _positive_int("concurrency", concurrency, name)
    worker = _positive_int("worker_concurrency", worker_concurrency, name)
    limit, period_ms = _limiter(name, "limiter", limiter)
    partition_limit, partition_period_ms = _limiter(name, "partition_limiter", partition_limiter)
    token_limit, token_period_ms = _limiter(name, "token_limiter", token_limiter)
    if not isinstance(priority_enabled, bool):
        raise InvalidQueueSettingsError(
            f"queue {name!r}: priority_enabled must be True or False, got {priority_enabled!r}"
        )
    settings = QueueSettings(
        name=name,
        concurrency=conc,
        worker_concurrency=worker,
        limit=limit,
        period_ms=period_ms,
        priority_enabled=priority_enabled,
        polling_interval_ms=_polling_ms(name, polling_interval_sec),
        token_limit=token_limit,
        token_period_ms=token_period_ms,
        partition_concurrency=_positive_int("partition_concurrency", partition_concurrency, name),
        partition_worker_concurrency=_positive_int(
            "partition_worker_concurrency", partition_worker_concurrency, name
        ),
        partition_limit=partition_limit,
        partition_period_ms=partition_period_ms,
    )
    _check_consistent(settings)
    return settings


def changed_settings(old: QueueSettings, setting: str, value: Any) -> QueueSettings:
    """`old` with one setting (named as a declaration names it) changed; raises
    InvalidQueueSettingsError, as a declaration would, when the value or the settings it
    makes together are invalid."""
    name = old.name
    if setting == "concurrency":
        new = dataclasses.replace(old, concurrency=_positive_int(setting, value, name))
    elif setting == "worker_concurrency":
        new = dataclasses.replace(old, worker_concurrency=_positive_int(setting, value, name))
    elif setting == "limiter":
        limit, period_ms = _limiter(name, setting, value)
        new = dataclasses.replace(old, limit=limit, period_ms=period_ms)
    elif setting == "token_limiter":
        limit, period_ms = _limiter(name, setting, value)
        new = dataclasses.replace(old, token_limit=limit, token_period_ms=period_ms)
    elif setting == "polling_interval_sec":
        new = dataclasses.replace(old, polling_interval_ms=_polling_ms(name, value))
    elif setting == "partition_concurrency":
        new = dataclasses.replace(old, partition_concurrency=_positive_int(setting, value, name))
    elif setting == "partition_worker_concurrency":
        count = _positive_int(setting, value, name)
        new = dataclasses.replace(old, partition_worker_concurrency=count)
    elif setting == "partition_limiter":
        limit, period_ms = _limiter(name, setting, value)
        new = dataclasses.replace(old, partition_limit=limit, partition_period_ms=period_ms)
    else:
        raise ValueError(f"not a queue setting one can change: {setting!r}")
    _check_consistent(new)
    return new


def limiter_of(limit: int | None, period_ms: int | None) -> dict[str, float] | None:
    """A stored limit as a declaration gives it: {"limit": n, "period": seconds}, or None."""
    if limit is None or period_ms is None:
        return None
    return {"limit": limit, "period": period_ms / 1000}


def _check_consistent(s: QueueSettings) -> None:
    """No limit may exceed one that contains it (DBOS's rules): a process's share of the queue
    or of a partition within the queue's, a partition's within the queue's."""
    pairs = (
        ("worker_concurrency", s.worker_concurrency, "concurrency", s.concurrency),
        (
            "partition_worker_concurrency",
            s.partition_worker_concurrency,
            "partition_concurrency",
            s.partition_concurrency,
        ),
        (
            "partition_worker_concurrency",
            s.partition_worker_concurrency,
            "worker_concurrency",
            s.worker_concurrency,
        ),
        ("partition_concurrency", s.partition_concurrency, "concurrency", s.concurrency),
        (
            "partition_worker_concurrency",
            s.partition_worker_concurrency,
            "concurrency",
            s.concurrency,
        ),
    )
    for inner, inner_value, outer, outer_value in pairs:
        if inner_value is not None and outer_value is not None and inner_value > outer_value:
            raise InvalidQueueSettingsError(
                f"queue {s.name!r}: {inner} ({inner_value}) cannot exceed {outer} ({outer_value})"
            )


def _polling_ms(name: str, polling_interval_sec: Any) -> int:
    if not valid_seconds(polling_interval_sec):
        raise InvalidQueueSettingsError(
            f"queue {name!r}: polling_interval_sec must be a positive number of seconds, at "
            f"most a century, got {polling_interval_sec!r}"
        )
    seconds: float = polling_interval_sec
    return max(1, round(seconds * 1000))


def _limiter(queue: str, key: str, value: Any) -> tuple[int | None, int | None]:
    """Validate {"limit": int, "period": seconds}; returns (limit, period in ms)."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise InvalidQueueSettingsError(
            f"queue {queue!r}: {key} must be a dict like {{'limit': 50, 'period': 30}}, "
            f"got {value!r}"
        )
    unknown = set(value) - _LIMITER_KEYS
    missing = _LIMITER_KEYS - set(value)
    if unknown or missing:
        raise InvalidQueueSettingsError(
            f"queue {queue!r}: {key} needs exactly the keys 'limit' and 'period'"
            + (f"; unknown: {sorted(unknown)}" if unknown else "")
            + (f"; missing: {sorted(missing)}" if missing else "")
        )
    limit = _positive_int(f"{key}['limit']", value["limit"], queue)
    period = value["period"]
    if not valid_seconds(period):
        raise InvalidQueueSettingsError(
            f"queue {queue!r}: {key}['period'] must be a positive number of seconds, at most a "
            f"century, got {period!r}"
        )
    return limit, max(1, round(period * 1000))
