"""PostgreSQL statements that make many writes of one kind in one round trip.

The group committer (`committer.py`) hands these the parameters of every waiting statement of a
kind; each runs them as a single statement over arrays (`unnest`), in autocommit, and answers
for each input what the one-row statement would have returned. The one-row statements live in
`workflow_rows.py` and `step_records.py`; these must keep the same conditions (owner checks,
status checks, notifications).

Written as SQL text for the driver and run on its connection: the array parameters and `unnest`
column lists are plain PostgreSQL.

Never prepared on the server, so PostgreSQL plans them at each run, for the table as it is then:
how best to join a batch to workflow_status depends on the table's size (one pass over a table
of a few pages, index look-ups for anything larger). A prepared statement keeps the plan made
on a young table until the table's next ANALYZE, a minute or more and thousands of rows later,
and every batch meanwhile read the whole table. Planning once per batch costs little.
"""

from __future__ import annotations

import json
from typing import Any

from dbos_nb.storage.schema import PG_SCHEMA

_RECORD_STEPS = f"""
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
WHERE EXISTS (
    SELECT 1 FROM {PG_SCHEMA}.workflow_status ws
    WHERE ws.workflow_uuid = v.workflow_uuid AND ws.owner_xid = v.owner)
ON CONFLICT DO NOTHING
RETURNING workflow_uuid, function_id
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
    WHERE ws.workflow_uuid = v.wid AND ws.status = 'PENDING' AND ws.owner_xid = v.owner
    RETURNING ws.workflow_uuid, ws.queue_name
)
"""

_FINISH = _FINISH_BODY + "SELECT workflow_uuid, queue_name FROM finished"

# Workflows finished together are announced together: one `dones:` notification per
# DONES_PER_NOTIFICATION ids, or fewer where long ids would pass PostgreSQL's 8,000-byte payload
# limit (a JSON list, since an id may hold any character, made here rather than in SQL, which
# PostgreSQL would plan at every run), rather than a `done:` each, which every listening process
# would receive and handle one by one. Every id of the batch is announced: one whose finish was
# refused (another owner) only makes its waiters look again. A freed slot wakes its queue's
# schedulers (`q:`; PostgreSQL delivers identical notifications of a transaction once).
DONES_PER_NOTIFICATION = 25
_PAYLOAD_BYTES = 7_000  # below the limit, with room for the origin and the prefix
_FINISH_AND_NOTIFY = (
    _FINISH_BODY
    + """
SELECT f.workflow_uuid, f.queue_name,
       CASE WHEN f.queue_name IS NOT NULL
            THEN pg_notify(%(channel)s, %(origin)s || 'q:' || f.queue_name) END,
       (SELECT count(pg_notify(%(channel)s, note)) FROM unnest(%(dones)s::text[]) AS note)
FROM finished f
"""
)


def record_steps(conn: Any, batch: list[dict[str, Any]]) -> list[tuple[Any, ...] | None]:
    """Many `SystemStore.record_step` statements: (function_id,) for each one recorded."""
    params = {
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
    done = {(r[0], r[1]) for r in _rows(conn, _RECORD_STEPS, params)}
    return [
        (p["function_id"],) if (p["workflow_uuid"], p["function_id"]) in done else None
        for p in batch
    ]


def finish_workflows(
    conn: Any, batch: list[dict[str, Any]], notify: bool
) -> list[tuple[Any, ...] | None]:
    """Many `SystemStore.finish_workflow` statements: (id, queue name) for each one recorded."""
    params = {
        "wid": [p["b_wid"] for p in batch],
        "owner": [p["b_owner"] for p in batch],
        "status": [p["b_status"] for p in batch],
        "output": [p["b_output"] for p in batch],
        "error": [p["b_error"] for p in batch],
        "now": [p["b_now"] for p in batch],
        "channel": batch[0]["b_channel"],
        "origin": batch[0]["b_origin"],
    }
    if notify:
        params["dones"] = [f"{params['origin']}dones:{chunk}" for chunk in _id_lists(params["wid"])]
    sql = _FINISH_AND_NOTIFY if notify else _FINISH
    finished = {r[0]: (r[0], r[1]) for r in _rows(conn, sql, params)}
    return [finished.get(p["b_wid"]) for p in batch]


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


def _rows(conn: Any, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Run on the driver connection (psycopg); its driver errors are translated by the
    connection's owner (`Database`)."""
    with conn.cursor() as cursor:
        # Never a server-side prepared statement: see the module docstring.
        cursor.execute(sql, params, prepare=False)
        return list(cursor.fetchall())
