"""The parts of DBOS Transact's API that dbos_nb does not implement, named in a clear error.

Code written for DBOS that reaches one of them gets `DBOSNotImplementedError` (an AttributeError,
so `hasattr` still answers False) naming the feature, rather than a bare AttributeError that
reads like a typo in the program.
"""

from __future__ import annotations

from dbos_nb.errors import DBOSNotImplementedError

_MESSAGES = "workflow messages and events (send/recv, set_event/get_event)"
_STREAMS = "workflow streams"
_SCHEDULES = "scheduled workflows"
_RUN_STEP = "ad-hoc steps (decorate the function with @DBOS.step)"

# DBOS attribute name -> the feature it belongs to.
_DBOS_FEATURES: dict[str, str] = {
    **dict.fromkeys(
        (
            "send",
            "send_async",
            "recv",
            "recv_async",
            "set_event",
            "set_event_async",
            "get_event",
            "get_event_async",
            "get_all_events",
            "get_all_events_async",
            "send_bulk",
            "send_bulk_async",
        ),
        _MESSAGES,
    ),
    **dict.fromkeys(
        (
            "write_stream",
            "write_stream_async",
            "read_stream",
            "read_stream_async",
            "close_stream",
            "close_stream_async",
        ),
        _STREAMS,
    ),
    **dict.fromkeys(
        (
            "scheduled",
            "create_schedule",
            "list_schedules",
            "get_schedule",
            "delete_schedule",
            "pause_schedule",
            "resume_schedule",
            "trigger_schedule",
            "apply_schedules",
            "backfill_schedule",
        ),
        _SCHEDULES,
    ),
    **dict.fromkeys(("run_step", "run_step_async"), _RUN_STEP),
    "listen_queues": "choosing the queues to serve by a call (set the config key 'listen_queues')",
    **dict.fromkeys(("set_workflow_delay", "set_workflow_delay_async"), "delayed workflows"),
    **dict.fromkeys(
        ("rewind_workflow", "rewind_workflow_async"),
        "rewinding a workflow (fork_workflow from a step runs it again under a new id)",
    ),
    "kafka_consumer": "Kafka consumers",
    "required_roles": "role-based access checks",
    "default_required_roles": "role-based access checks",
    "patch": "workflow patching",
    "deprecate_patch": "workflow patching",
}

# DBOSClient's share of the same features.
_CLIENT_FEATURES: dict[str, str] = {
    name: feature
    for name, feature in _DBOS_FEATURES.items()
    if feature in (_MESSAGES, _STREAMS, _SCHEDULES)
}


def refuse(owner: str, name: str, client: bool = False) -> DBOSNotImplementedError | None:
    """The error for `owner.name` if it is a DBOS API that dbos_nb leaves out, else None."""
    feature = (_CLIENT_FEATURES if client else _DBOS_FEATURES).get(name)
    if feature is None:
        return None
    return DBOSNotImplementedError(
        f"{owner}.{name} belongs to a part of DBOS Transact that dbos_nb does not implement: "
        f"{feature}. dbos_nb implements workflows, steps, transactions, queues and their "
        "management (README: 'Not in dbos_nb')"
    )
