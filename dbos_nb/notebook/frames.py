"""Results as pandas DataFrames: one row per batch item, or per workflow.

Built from rows the store returns; works while a batch is still running (unfinished items have
no output yet).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import pandas as pd

from dbos_nb import serialization
from dbos_nb.core.management import workflow_rows
from dbos_nb.core.runtime import get_runtime
from dbos_nb.core.waiters import outcome_of
from dbos_nb.errors import DbosNbError, DBOSWorkflowTimedOutError
from dbos_nb.models import shown_function_name

STATUS_ORDER = [
    "ENQUEUED",
    "PENDING",
    "SUCCESS",
    "ERROR",
    "CANCELLED",
    "MAX_RECOVERY_ATTEMPTS_EXCEEDED",
]


def _input_of(blob: bytes | None) -> Any:
    try:
        args, kwargs = serialization.load_inputs(blob)
    except Exception as exc:
        return f"<cannot load: {exc}>"
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args:
        return kwargs
    return (args, kwargs) if kwargs else args


def _output_of(row: dict[str, Any]) -> Any:
    if row["status"] != "SUCCESS":
        return None
    try:
        return serialization.loads(row["output"])
    except Exception as exc:
        return f"<cannot load: {exc}>"


def _error_of(row: dict[str, Any]) -> str | None:
    error = serialization.load_error(row.get("error"))
    if error is None and row["status"] == "CANCELLED":
        # Cancelled by its deadline: what awaiting it raises, so that a timed-out item is told
        # apart from one cancelled by hand (whose status says all).
        try:
            outcome_of(str(row["workflow_uuid"]), row)
        except DBOSWorkflowTimedOutError as timed_out:
            error = timed_out
        except DbosNbError:
            pass
    return None if error is None else serialization.error_text(error)


def _objects(values: list[Any]) -> pd.Series:
    """An object column: values stay exactly what `results()` returns (ints do not become floats
    when an item has no output, None stays None)."""
    return pd.Series(values, dtype=object)


def _times(df: pd.DataFrame, rows: list[dict[str, Any]]) -> None:
    started = [r.get("started_at_epoch_ms") for r in rows]
    finished = [r.get("completed_at") for r in rows]
    df["started"] = pd.to_datetime(pd.Series(started, dtype="Float64"), unit="ms")
    df["finished"] = pd.to_datetime(pd.Series(finished, dtype="Float64"), unit="ms")
    df["duration"] = df["finished"] - df["started"]


def _status_column(rows: list[dict[str, Any]]) -> pd.Categorical:
    return pd.Categorical([r["status"] for r in rows], categories=STATUS_ORDER)


def batch_frame(rows: list[dict[str, Any]], *, expand: bool = False) -> pd.DataFrame:
    """A DataFrame of a batch's rows (in input order), with `expand` turning dict outputs into
    columns."""
    df = pd.DataFrame(
        {
            "item": [int(str(r["workflow_uuid"]).rsplit("/", 1)[-1]) for r in rows],
            "workflow_id": [r["workflow_uuid"] for r in rows],
            "status": _status_column(rows),
            "input": [_input_of(r.get("inputs")) for r in rows],
            "output": _objects([_output_of(r) for r in rows]),
            "error": _objects([_error_of(r) for r in rows]),
            "attempts": [int(r.get("recovery_attempts") or 0) for r in rows],
            "executor": [r.get("executor_id") for r in rows],
            "tokens": pd.array([r.get("usage_tokens") for r in rows], dtype="Int64"),
            "cost": pd.array([r.get("usage_cost") for r in rows], dtype="Float64"),
        }
    )
    _times(df, rows)
    df = df.set_index("item", drop=False).rename_axis(None)
    if expand:
        df = _expand_outputs(df)
    return df


_MISSING = object()


def _expanded_column(values: list[Any], index: pd.Index) -> pd.Series:
    """One key of the dict outputs, as a column: the values as they are, with a missing value
    (an item that failed, or whose output lacks the key) as NA of the column's own type, so
    that integers stay integers (nullable Int64) rather than turning into floats, and booleans
    stay booleans."""
    present = [v for v in values if v is not _MISSING and v is not None]
    # numpy's scalars too (np.int64 is an Integral, not an int; np.bool_ neither).
    if present and all(isinstance(v, bool | np.bool_) for v in present):
        kind: str | None = "boolean"
    elif present and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_) for v in present
    ):
        kind = "Int64"
    elif present and all(isinstance(v, float | np.floating) for v in present):
        kind = "Float64"
    else:
        kind = None
    filled = [None if v is _MISSING else v for v in values]
    return pd.Series(filled, dtype=kind, index=index)  # other values: pandas' own inference


def _expand_outputs(df: pd.DataFrame) -> pd.DataFrame:
    """Dict outputs become columns; other outputs stay in an 'output' column (None where the
    output was expanded), which is kept whenever some output is not a dict."""
    outputs = list(df["output"])
    if not any(isinstance(o, dict) for o in outputs):
        return df
    dicts = [o if isinstance(o, dict) else {} for o in outputs]
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    expanded = pd.DataFrame(
        {k: _expanded_column([d.get(k, _MISSING) for d in dicts], df.index) for k in keys},
        index=df.index,
    )
    rest = [None if isinstance(o, dict) else o for o in outputs]
    keep_rest = any(o is not None for o in rest)
    taken = set(df.columns) | ({"output"} if keep_rest else set())
    clashes = set(expanded.columns) & taken
    expanded = expanded.rename(columns={c: f"output_{c}" for c in clashes})
    position = list(df.columns).index("output")
    left = df.iloc[:, :position]
    right = df.iloc[:, position + 1 :]
    parts = [left]
    if keep_rest:
        rest_column = _objects(rest)
        rest_column.index = df.index
        parts.append(rest_column.to_frame("output"))
    return pd.concat([*parts, expanded, right], axis=1)


def workflows_frame(**filters: Any) -> pd.DataFrame:
    """A DataFrame of workflows matching the same filters as `DBOS.list_workflows`.

    With `load_output=False` (as `%dbos_status` asks, since a durable cell's output holds every
    value it recorded) there is no `output` column; errors are still read, for the failed rows
    only."""
    store = get_runtime().store
    rows = workflow_rows(store, **filters)
    columns: dict[str, Any] = {
        "workflow_id": [r["workflow_uuid"] for r in rows],
        # A step enqueued on its own is stored under an internal prefix: show its own name.
        "name": [shown_function_name(r["name"]) for r in rows],
        "status": _status_column(rows),
        "queue": [r.get("queue_name") for r in rows],
    }
    if filters.get("load_output", True):
        columns["output"] = _objects([_output_of(r) for r in rows])
        errors = {r["workflow_uuid"]: _error_of(r) for r in rows}
    else:
        errors = _errors_of_failed(store, rows)
    df = pd.DataFrame(
        {
            **columns,
            "error": _objects([errors.get(r["workflow_uuid"]) for r in rows]),
            "attempts": [int(r.get("recovery_attempts") or 0) for r in rows],
            "executor": [r.get("executor_id") for r in rows],
            "created": pd.to_datetime(
                pd.Series([r["created_at"] for r in rows], dtype="Float64"), unit="ms"
            ),
        }
    )
    _times(df, rows)
    return df


# Statuses whose rows may hold an error.
_WITH_ERROR = ("ERROR", "MAX_RECOVERY_ATTEMPTS_EXCEEDED", "CANCELLED")


def _errors_of_failed(store: Any, rows: list[dict[str, Any]]) -> dict[str, str | None]:
    """The errors of the rows that hold one, read apart: a failed row has no output to load."""
    failed = [r["workflow_uuid"] for r in rows if r["status"] in _WITH_ERROR]
    if not failed:
        return {}
    loaded = workflow_rows(store, workflow_ids=failed, load_input=False)
    return {r["workflow_uuid"]: _error_of(r) for r in loaded}


def queues_frame(queue_name: str | None = None) -> pd.DataFrame:
    """Declared queues with their limits and how many workflows they hold per status."""
    store = get_runtime().store
    records = []
    for q in store.list_queues():
        if queue_name is not None and q.name != queue_name:
            continue
        counts = store.count_by_status(q.name)
        records.append(
            {
                "queue": q.name,
                "concurrency": q.concurrency,
                "worker_concurrency": q.worker_concurrency,
                "rate_limit": f"{q.limit}/{q.period_ms / 1000:g}s"
                if q.limit and q.period_ms
                else None,
                **{status.lower(): counts.get(status, 0) for status in STATUS_ORDER},
            }
        )
    df = pd.DataFrame.from_records(records, columns=list(_QUEUE_COLUMNS))
    # Nullable integers: a queue without a limit would otherwise turn the column into floats.
    for column in ("concurrency", "worker_concurrency"):
        df[column] = pd.array(list(df[column]), dtype="Int64")
    return df


_QUEUE_COLUMNS = (
    "queue",
    "concurrency",
    "worker_concurrency",
    "rate_limit",
    *(status.lower() for status in STATUS_ORDER),
)


def executors_frame() -> pd.DataFrame:
    """Live and recent executors (kernels and workers) with their heartbeat age."""
    rt = get_runtime()
    now = rt.now_ms()
    rows = rt.store.list_executors()
    return pd.DataFrame.from_records(
        [
            {
                "executor": r["executor_id"],
                "host": r["hostname"],
                "pid": r["pid"],
                "heartbeat_age_s": round((now - int(r["heartbeat_at"])) / 1000, 1),
                "this_kernel": r["executor_id"] == rt.executor_id,
            }
            for r in rows
        ],
        columns=["executor", "host", "pid", "heartbeat_age_s", "this_kernel"],
    )
