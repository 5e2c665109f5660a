"""PostgreSQL batches: the writes the group committer gathered, in one round trip and one commit.

The group committer (`committer.py`) hands over the parameters of every waiting statement, by
kind (step records, outcomes). All of them are sent as one pipeline (libpq's pipeline mode,
`pgwire.py`), as the one transaction that the pipeline's closing Sync commits: one round trip
and one commit (one WAL flush) for the batch, or, if any statement fails, nothing. libpq may
send the first statements of a large batch while the rest are queued, so the server can start
on them early; a process frozen at that moment (a debugger, SIGSTOP) holds the locks of the rows
written so far (its own workflows' rows) until it resumes, and
`idle_in_transaction_session_timeout` does not count that time. The window is the time this
thread takes to queue the statements, usually a fraction of a millisecond.

A kind with few statements in the batch sends them one by one: each its own one-row statement,
as `workflow_rows.py` or `step_records.py` compiled it (`prepared.py`), with scalar parameters.
A kind with many is merged into one statement over arrays (`unnest`).
Measured on PostgreSQL 15 with 2 to 16 statements a batch, the one-row statements cost the
server about a third less: an array statement spends more on parsing and binding its arrays
than on its rows, and only pays off from a few dozen rows on.

A merged statement answers, for each input, what its one-row statement would have returned,
and keeps its conditions (owner checks, status checks).
Outcomes written together are announced together (see DONES_PER_NOTIFICATION).

The merged statements find their rows of workflow_status with `workflow_uuid = ANY(<the batch's
ids>)`, an index condition whatever the table's size, before joining them to the batch. Joined
on the ids alone, the best plan depends on the table's size (one pass over a table of a few
pages, index look-ups for anything larger), and a prepared statement keeps the plan made on a
young table until its next ANALYZE, a minute and thousands of rows later: every batch meanwhile
read the whole table. With the index condition the plan holds at any size, so every statement
here is prepared like any other (psycopg prepares a statement on its fifth run).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from dbos_nb.storage import pgwire
from dbos_nb.storage.pgwire import Statement
from dbos_nb.storage.prepared import Prepared
from dbos_nb.storage.schema import PG_SCHEMA

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]
Batch = list[dict[str, Any]]

# The workflows' rows are locked (FOR KEY SHARE) until the records commit, so that none lands
# after its workflow was deleted (see `StepRecords`). Each recorded row comes back with the
# workflow's owner, so that of two executions of one
# workflow in a batch (a stale one and the one that took it over) only the owner is told its
# record was written.
_RECORD_STEPS = f"""
WITH recorded AS (
INSERT INTO {PG_SCHEMA}.operation_outputs (
    workflow_uuid, function_id, function_name, output, error, child_workflow_id,
    started_at_epoch_ms, completed_at_epoch_ms)
SELECT v.workflow_uuid, v.function_id, v.function_name, v.output, v.error, v.child_workflow_id,
       v.started_at_epoch_ms, v.completed_at_epoch_ms
FROM unnest(%(wid)s::text[], %(fid)s::integer[], %(name)s::text[], %(output)s::bytea[],
            %(error)s::bytea[], %(child)s::text[], %(started)s::bigint[],
            %(completed)s::bigint[], %(owner)s::text[])
     AS v(workflow_uuid, function_id, function_name, output, error, child_workflow_id,
          started_at_epoch_ms, completed_at_epoch_ms, owner)
JOIN {PG_SCHEMA}.workflow_status ws
  ON ws.workflow_uuid = v.workflow_uuid AND ws.owner_xid = v.owner
WHERE ws.workflow_uuid = ANY(%(wid)s::text[])
FOR KEY SHARE OF ws
ON CONFLICT DO NOTHING
RETURNING workflow_uuid, function_id
)
SELECT r.workflow_uuid, r.function_id, ws.owner_xid
FROM recorded r JOIN {PG_SCHEMA}.workflow_status ws ON ws.workflow_uuid = r.workflow_uuid
WHERE ws.workflow_uuid = ANY(%(wid)s::text[])
"""

_FINISH_BODY = f"""
WITH v AS (
    SELECT * FROM unnest(%(wid)s::text[], %(owner)s::text[], %(status)s::text[],
                         %(output)s::bytea[], %(error)s::bytea[], %(now)s::bigint[])
         AS v(wid, owner, status, output, error, now_ms)
), finished AS (
    UPDATE {PG_SCHEMA}.workflow_status ws
    SET status = v.status, output = v.output, error = v.error, updated_at = v.now_ms,
        completed_at = v.now_ms, deduplication_id = NULL
    FROM v
    WHERE ws.workflow_uuid = ANY(%(wid)s::text[])
      AND ws.workflow_uuid = v.wid AND ws.status = 'PENDING' AND ws.owner_xid = v.owner
    RETURNING ws.workflow_uuid, ws.queue_name, ws.owner_xid
)
"""
_FINISH = _FINISH_BODY + "SELECT workflow_uuid, queue_name, owner_xid FROM finished"
_FINISH_AND_WAKE = (
    _FINISH_BODY
    + f"""
SELECT workflow_uuid, queue_name, owner_xid,
       CASE WHEN EXISTS (SELECT 1 FROM {PG_SCHEMA}.queues q
                         WHERE q.name = finished.queue_name
                           AND (q.concurrency IS NOT NULL
                                OR q.partition_concurrency IS NOT NULL))
            THEN pg_notify(%(channel)s, %(origin)s || 'q:' || queue_name) END
FROM finished
"""
)

# Workflows finished together are announced together: one `dones:` notification per
# DONES_PER_NOTIFICATION ids, or fewer where long ids would pass PostgreSQL's 8,000-byte payload
# limit (a JSON list, since an id may hold any character, made here rather than in SQL, which
# PostgreSQL would plan at every run), rather than a `done:` each, which every listening process
# would receive and handle one by one. Every id of the batch is announced: one whose finish was
# refused (another owner) only makes its waiters look again.
DONES_PER_NOTIFICATION = 25
_PAYLOAD_BYTES = 7_000  # below the limit, with room for the origin and the prefix
_ANNOUNCE = "SELECT count(pg_notify(%(channel)s, note)) FROM unnest(%(dones)s::text[]) AS note"

# Below this many statements of a kind in a batch, each is sent as it is (see the docstring).
MERGE_FROM = 32


class MergedKind:
    """One kind of statement: the statements that write a batch of its one-row parameter
    dicts, and each input's answer read from their rows."""

    __slots__ = ("_announce", "_answers", "_merged", "_one", "name")

    def __init__(
        self,
        name: str,
        one: Prepared,
        merged: Callable[[Batch], Statement],
        answers: Callable[[Batch, list[Row]], list[Row | None]],
        announce: Callable[[Batch], Statement] | None = None,
    ) -> None:
        self.name = name
        self._one = one
        self._merged = merged
        self._answers = answers
        self._announce = announce

    def statements(self, batch: Batch) -> list[Statement]:
        """The statements that write `batch`: one per input or one for all, then its
        announcement, if any."""
        if len(batch) >= MERGE_FROM:
            statements = [self._merged(batch)]
        else:
            one = self._one
            statements = [(one.sql, one.arguments(params)) for params in batch]
        if self._announce is not None:
            statements.append(self._announce(batch))
        return statements

    def answers(self, batch: Batch, results: list[list[Row]]) -> list[Row | None]:
        """Each input's answer, from the rows of `statements(batch)`, in the same order."""
        if len(batch) >= MERGE_FROM:
            return self._answers(batch, results[0])
        return [rows[0] if rows else None for rows in results[: len(batch)]]

    def __repr__(self) -> str:
        return f"MergedKind({self.name})"


def run_merged(conn: Any, parts: list[tuple[MergedKind, Batch]]) -> list[list[Row | None]]:
    """Write every part (a kind and the parameters of its statements) in one round trip and
    one transaction (see the module docstring); the answers of each part, in order."""
    assert conn.autocommit, "batches run on an autocommit connection"
    plans = [kind.statements(batch) for kind, batch in parts]
    statements = [statement for plan in plans for statement in plan]
    if pgwire.supported():
        results = pgwire.run(conn, statements)
    elif len(statements) == 1:
        results = [_rows(conn, *statements[0])]
    else:  # libpq before 14, without pipeline mode: a round trip each
        with conn.transaction():
            results = [_rows(conn, sql, params) for sql, params in statements]
    answers: list[list[Row | None]] = []
    start = 0
    for (kind, batch), plan in zip(parts, plans, strict=True):
        answers.append(kind.answers(batch, results[start : start + len(plan)]))
        start += len(plan)
    return answers


def _record_steps_statement(batch: Batch) -> Statement:
    return _RECORD_STEPS, {
        "wid": [p["workflow_uuid"] for p in batch],
        "fid": [p["function_id"] for p in batch],
        "name": [p["function_name"] for p in batch],
        "output": [p["output"] for p in batch],
        "error": [p["error"] for p in batch],
        "child": [p["child_workflow_id"] for p in batch],
        "started": [p["started_at_epoch_ms"] for p in batch],
        "completed": [p["completed_at_epoch_ms"] for p in batch],
        "owner": [p["b_owner"] for p in batch],
    }


def _record_steps_answers(batch: Batch, rows: list[Row]) -> list[Row | None]:
    done = {(r[0], r[1], r[2]) for r in rows}
    return [
        (p["function_id"],)
        if (p["workflow_uuid"], p["function_id"], p["b_owner"]) in done
        else None
        for p in batch
    ]


def _finish_statement(batch: Batch, wake: bool) -> Statement:
    return (_FINISH_AND_WAKE if wake else _FINISH), {
        "wid": [p["b_wid"] for p in batch],
        "owner": [p["b_owner"] for p in batch],
        "status": [p["b_status"] for p in batch],
        "output": [p["b_output"] for p in batch],
        "error": [p["b_error"] for p in batch],
        "now": [p["b_now"] for p in batch],
        "channel": batch[0]["b_channel"],
        "origin": batch[0]["b_origin"],
    }


def _finish_answers(batch: Batch, rows: list[Row]) -> list[Row | None]:
    finished = {(r[0], r[2]): (r[0], r[1]) for r in rows}
    return [finished.get((p["b_wid"], p["b_owner"])) for p in batch]


def _announce_statement(batch: Batch) -> Statement:
    wids = [p["b_wid"] for p in batch]
    origin = batch[0]["b_origin"]
    return _ANNOUNCE, {
        "channel": batch[0]["b_done_channel"],
        "dones": [f"{origin}dones:{chunk}" for chunk in _id_lists(wids)],
    }


def record_steps(one: Prepared) -> MergedKind:
    """`SystemStore.record_step` statements (`one`, the one-row statement): (function_id,) for
    each one recorded."""
    return MergedKind("record_steps", one, _record_steps_statement, _record_steps_answers)


def finish_workflows(one: Prepared, notify: bool) -> MergedKind:
    """`SystemStore.finish_workflow` statements (`one`, the one-row statement, waking the
    queue's schedulers if `notify`): (id, queue name) for each one recorded; with the
    notifications (PostgreSQL's default) or without."""
    return MergedKind(
        "finish_and_notify" if notify else "finish",
        one,
        lambda batch: _finish_statement(batch, wake=notify),
        _finish_answers,
        _announce_statement if notify else None,
    )


def _id_lists(ids: list[str]) -> list[str]:
    """`ids` as JSON lists of at most DONES_PER_NOTIFICATION ids and _PAYLOAD_BYTES bytes."""
    lists: list[str] = []
    chunk: list[str] = []  # each id already encoded as a JSON string
    size = 2  # the brackets
    for wid in ids:
        encoded = json.dumps(wid, ensure_ascii=False)
        width = len(encoded.encode()) + 2  # and its separator
        if chunk and (len(chunk) == DONES_PER_NOTIFICATION or size + width > _PAYLOAD_BYTES):
            lists.append(f"[{', '.join(chunk)}]")
            chunk, size = [], 2
        chunk.append(encoded)
        size += width
    if chunk:
        lists.append(f"[{', '.join(chunk)}]")
    return lists


def _rows(conn: Any, sql: str, params: dict[str, Any]) -> list[Row]:
    """Run on the driver connection (psycopg); its driver errors are translated by the
    connection's owner (`Database`)."""
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())
