"""Enqueueing a workflow by name from options (`EnqueueOptions`): `DBOSClient.enqueue` from a
process without the application's code, and `DBOS.enqueue_workflow_with_options` from inside
the application, where workflow code records it as a child, as any other enqueue.

Both validate the same options (every value against its column, before anything is written)
and refuse, unless `allow_unregistered`, a queue that no process has declared and a name that
no process has registered: the work would wait, unseen, for ever.
"""

from __future__ import annotations

from typing import Any, Required, TypedDict

from dbos_nb.core.context import (
    MAX_DEDUPLICATION_ID_LENGTH,
    MAX_NAME_LENGTH,
    Context,
    check_id_length,
    check_partition_key,
    check_priority,
    current,
    derive,
    using,
    valid_seconds,
)
from dbos_nb.core.queue import QUEUES
from dbos_nb.core.runtime import Runtime
from dbos_nb.core.workflows import enqueue_named, enqueue_workflow, replaying_a_recorded_operation
from dbos_nb.errors import DbosNbError, UnknownQueueError, UnknownWorkflowNameError
from dbos_nb.models import STEP_WORKFLOW_PREFIX


class EnqueueOptions(TypedDict, total=False):
    """Options of `DBOSClient.enqueue` and `DBOS.enqueue_workflow_with_options` (DBOS's keys,
    plus `allow_unregistered`)."""

    queue_name: Required[str]
    workflow_name: Required[str]
    workflow_id: str
    workflow_timeout: float
    deduplication_id: str
    priority: int
    app_version: str
    # The partition of a partitioned queue (needed there, refused with a deduplication_id).
    queue_partition_key: str
    # Enqueue even if no process has declared the queue or registered the workflow name yet.
    allow_unregistered: bool


_KNOWN_OPTIONS = set(EnqueueOptions.__annotations__)


def validate_options(options: Any) -> EnqueueOptions:
    """The options, checked; raises `DbosNbError` naming the first bad one."""
    if not isinstance(options, dict):
        raise DbosNbError(f"enqueue options must be a dict (EnqueueOptions), got {options!r}")
    unknown = set(options) - _KNOWN_OPTIONS
    if unknown:
        raise DbosNbError(f"unknown enqueue option(s) {sorted(unknown)}")
    for key in ("queue_name", "workflow_name"):
        if not isinstance(options.get(key), str) or not options[key]:
            raise DbosNbError(f"enqueue options need {key!r} (a non-empty string)")
    for key in ("workflow_id", "deduplication_id", "app_version"):
        value = options.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise DbosNbError(f"{key} must be a non-empty string, got {value!r}")
    # Every value checked against its column before anything is written: PostgreSQL would
    # refuse an over-long one with a raw DataError, SQLite store it.
    check_id_length(options["queue_name"], "a queue name")
    check_id_length(options["workflow_name"], "a workflow name", limit=MAX_NAME_LENGTH)
    if options.get("workflow_id") is not None:
        check_id_length(options["workflow_id"], "a workflow id")
    if options.get("deduplication_id") is not None:
        check_id_length(
            options["deduplication_id"], "a deduplication_id", limit=MAX_DEDUPLICATION_ID_LENGTH
        )
    if options.get("app_version") is not None:
        check_id_length(options["app_version"], "an app_version")
    timeout = options.get("workflow_timeout")
    if timeout is not None and not valid_seconds(timeout):
        raise DbosNbError(
            f"workflow_timeout must be a positive number of seconds (at most a century), "
            f"got {timeout!r}"
        )
    check_priority(options.get("priority"))
    check_partition_key(options.get("queue_partition_key"), options.get("deduplication_id"))
    allow = options.get("allow_unregistered", False)
    if not isinstance(allow, bool):
        raise DbosNbError(f"allow_unregistered must be True or False, got {allow!r}")
    result: EnqueueOptions = options  # type: ignore[assignment]
    return result


def check_target(
    queue_name: str, name: str, declared: bool, kind: str | None, allow: bool
) -> str | None:
    """Refuse (unless `allow`) a queue that no process declared or a name that none
    registered; returns the kind the name was registered as."""
    if not declared and not allow:
        raise UnknownQueueError(queue_name)
    if kind is None and not allow:
        raise UnknownWorkflowNameError(
            name,
            "; no process using this database has registered it (allow_unregistered=True "
            "enqueues it all the same, for a process that registers it later)",
        )
    return kind


def _check_unless_replay(
    rt: Runtime, queue_name: str, name: str, declared: bool, kind: str | None, allow: bool
) -> str | None:
    """`check_target`, except for workflow code replaying an enqueue it recorded: the queue
    (or the name's registration) may be gone since, and the replay returns the recorded child
    without writing anything."""
    try:
        return check_target(queue_name, name, declared, kind, allow)
    except (UnknownQueueError, UnknownWorkflowNameError):
        if not replaying_a_recorded_operation(rt):
            raise
        return kind


def row_name(name: str, kind: str | None) -> str:
    """The name a workflow row records for a function registered as `kind` (a step or a
    transaction enqueued alone runs as a one-operation workflow)."""
    if kind not in ("step", "transaction"):
        return name
    # Registrations leave room for the prefix; one stored by an older version of dbos_nb,
    # which did not, may not fit with it.
    prefixed = STEP_WORKFLOW_PREFIX + name
    check_id_length(prefixed, f"the workflow name of {kind} {name[:40]!r}", limit=MAX_NAME_LENGTH)
    return prefixed


def context_for(options: EnqueueOptions) -> Context:
    """The context an enqueue from options runs in: the options win, and what they leave
    unset comes from the caller's blocks (`SetWorkflowID`, `SetEnqueueOptions`,
    `SetWorkflowTimeout`), as in DBOS."""
    ambient_id = current().next_workflow_id
    changes: dict[str, Any] = {"next_workflow_id": options.get("workflow_id") or ambient_id}
    if options.get("deduplication_id") is not None:
        changes["deduplication_id"] = options["deduplication_id"]
    if options.get("priority") is not None:
        changes["priority"] = options["priority"]
    if options.get("queue_partition_key") is not None:
        changes["queue_partition_key"] = options["queue_partition_key"]
    if options.get("workflow_timeout") is not None:
        changes["timeout_sec"] = options["workflow_timeout"]
    return derive(**changes)


def enqueue_with_options(
    rt: Runtime, options: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """`DBOS.enqueue_workflow_with_options`: enqueue the workflow (or step, or transaction)
    registered under the options' name, from inside the application; returns its id.

    A name registered in this process is enqueued as `queue.enqueue` would (its code version
    is stored with it); another is written by name, as a client does, for whichever process
    registers it. Either way, workflow code records the enqueue as its child (a replay gets
    the same id back), and the row's `app_version` is the options' (none unless given: the
    workflow may belong to another application version, as in DBOS)."""
    opts = validate_options(options)
    queue_name, name = opts["queue_name"], opts["workflow_name"]
    allow = opts.get("allow_unregistered", False)
    version = opts.get("app_version")
    reg = rt.registry.get(name)
    ambient = current()
    with using(context_for(opts)):
        if reg is not None:
            here = QUEUES.get(queue_name) is not None
            declared = here or rt.store.get_queue(queue_name) is not None
            _check_unless_replay(rt, queue_name, name, declared, reg.kind, allow)
            wid = enqueue_workflow(rt, queue_name, reg, args, kwargs, app_version=version)
        else:
            declared_here, kind = rt.store.enqueue_target(queue_name, name)
            kind = _check_unless_replay(rt, queue_name, name, declared_here, kind, allow)
            wid = enqueue_named(rt, queue_name, name, row_name(name, kind), args, kwargs, version)
    # A `SetWorkflowID` around the call is used up by it, as by any start (also when the
    # options name the id, as in DBOS); not by an enqueue that failed.
    ambient.next_workflow_id = None
    return wid
