"""Where DBOS's API gives a shape or an answer, dbos_nb gives the same one (both backends).

Each case here was once different: a program written for DBOS broke on it (a status input read
by key, a list of names as a filter, a step listing read as dicts), or an option passed
silently where DBOS refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from typing import Any

import pytest

from dbos_nb import (
    DBOS,
    DBOSClient,
    DBOSMaxStepRetriesExceeded,
    DbosNbError,
    DBOSNonExistentWorkflowError,
    DBOSNotImplementedError,
    Queue,
    SetEnqueueOptions,
    SetWorkflowID,
    WorkflowActiveError,
)


def _two_named_workflows() -> tuple[Any, Any]:
    @DBOS.step()
    def parity_step(x: int) -> int:
        return x + 1

    @DBOS.workflow()
    def parity_a(x: int, *, scale: int = 1) -> int:
        return parity_step(x) * scale

    @DBOS.workflow()
    def parity_b(x: int) -> int:
        return x

    return parity_a, parity_b


def test_status_input_completed_at_and_load_flags(launched: str) -> None:
    parity_a, _ = _two_named_workflows()
    with SetWorkflowID("in-1"):
        assert parity_a(3, scale=2) == 8
    status = DBOS.get_workflow_status("in-1")
    assert status is not None
    assert status.input == {"args": (3,), "kwargs": {"scale": 2}}
    assert status.completed_at is not None and status.created_at is not None
    assert status.completed_at >= status.created_at

    (only_output,) = DBOS.list_workflows(workflow_ids=["in-1"], load_input=False)
    assert only_output.input is None and only_output.output == 8
    (only_input,) = DBOS.list_workflows(workflow_ids=["in-1"], load_output=False)
    assert only_input.input == {"args": (3,), "kwargs": {"scale": 2}}
    assert only_input.output is None


def test_list_filters_take_lists_and_parent(launched: str) -> None:
    parity_a, parity_b = _two_named_workflows()
    q1, q2 = Queue("parity_q1"), Queue("parity_q2")

    @DBOS.workflow()
    def parity_parent() -> int:
        return parity_b(5)

    handles = [q1.enqueue(parity_a, 1), q2.enqueue(parity_b, 2), q1.enqueue(parity_b, 3)]
    for h in handles:
        h.get_result()
    with SetWorkflowID("par-1"):
        parity_parent()

    a_name, b_name = handles[0].get_status().name, handles[1].get_status().name
    assert len(DBOS.list_workflows(name=[a_name, b_name])) == 4  # 3 queued + 1 child
    assert len(DBOS.list_workflows(name=b_name)) == 3
    assert len(DBOS.list_workflows(queue_name=["parity_q1", "parity_q2"])) == 3
    assert len(DBOS.list_workflows(queue_name="parity_q2")) == 1
    children = DBOS.list_workflows(parent_workflow_id="par-1")
    assert [(w.name, w.parent_workflow_id) for w in children] == [(b_name, "par-1")]
    with pytest.raises(DbosNbError, match="name must be a string or a list of strings"):
        DBOS.list_workflows(name=[a_name, 3])


def test_list_queued_workflows_by_status(launched: str) -> None:
    _, parity_b = _two_named_workflows()
    # Paused by its limiter: both stay ENQUEUED (the first start spends the whole budget).
    slow = Queue("parity_slow", limiter={"limit": 1, "period": 3600})
    gate = Queue("parity_gate", concurrency=1)
    first = slow.enqueue(parity_b, 1)
    first.get_result()
    waiting = [slow.enqueue(parity_b, i) for i in (2, 3)]
    gate.enqueue(parity_b, 4).get_result()

    enqueued = DBOS.list_queued_workflows(status="ENQUEUED")
    assert {w.workflow_id for w in enqueued} == {h.workflow_id for h in waiting}
    assert DBOS.list_queued_workflows(queue_name="parity_slow", status=["SUCCESS"])[0].input == {
        "args": (1,),
        "kwargs": {},
    }
    assert {w.workflow_id for w in DBOS.list_queued_workflows()} == {h.workflow_id for h in waiting}
    # An empty status list means the default (active work), as DBOS takes it.
    assert {w.workflow_id for w in DBOS.list_queued_workflows(status=[])} == {
        h.workflow_id for h in waiting
    }


def test_queued_listings_count_limit_and_offset_among_queued_workflows(launched: str) -> None:
    _, parity_b = _two_named_workflows()
    direct = []
    for i in range(4):  # run directly, never through a queue, and listed first
        with SetWorkflowID(f"plq-direct-{i}"):
            direct.append(parity_b(i))
    queued = [Queue("parity_lq").enqueue(parity_b, i) for i in range(3)]
    for h in queued:
        h.get_result()
    ids = [h.workflow_id for h in queued]
    listed = DBOS.list_queued_workflows(status="SUCCESS", limit=2)
    assert [w.workflow_id for w in listed] == ids[:2]
    listed = DBOS.list_queued_workflows(status="SUCCESS", limit=2, offset=2)
    assert [w.workflow_id for w in listed] == ids[2:]
    mixed = DBOS.list_workflows(workflow_id_prefix="plq-direct-") + [h.get_status() for h in queued]
    assert len(mixed) == 7
    only = DBOS.list_workflows(status="SUCCESS", queues_only=True, name=queued[0].get_status().name)
    assert [w.workflow_id for w in only] == ids
    assert [w.workflow_id for w in DBOS.list_queued_workflows(status="SUCCESS", queues_only=True)][
        -3:
    ] == ids
    with pytest.raises(DbosNbError, match="queues_only must be True or False"):
        DBOS.list_workflows(queues_only="yes")


def test_step_listing_reads_as_dicts(launched: str) -> None:
    parity_a, _ = _two_named_workflows()
    with SetWorkflowID("steps-1"):
        parity_a(1)
    (step,) = DBOS.list_workflow_steps("steps-1")
    assert step["function_name"] == step.function_name
    assert step["output"] == 2 and step.get("error") is None and step.get("nope", 7) == 7
    assert dict(step)["function_id"] == step.function_id
    assert "child_workflow_id" in step and "nope" not in step
    with pytest.raises(KeyError):
        step["nope"]


def test_cancelling_an_unknown_workflow_is_not_an_error(launched: str) -> None:
    DBOS.cancel_workflow("parity-no-such-workflow")
    with DBOSClient(launched) as client:
        client.cancel_workflow("parity-no-such-workflow")
    assert DBOS.get_workflow_status("parity-no-such-workflow") is None


def test_enqueue_options_refused_where_nothing_is_enqueued(launched: str) -> None:
    _, parity_b = _two_named_workflows()
    for options in (
        SetEnqueueOptions(deduplication_id="d"),
        SetEnqueueOptions(priority=3),
        SetEnqueueOptions(token_estimate=10),
    ):
        with options, pytest.raises(DbosNbError, match="applies to workflows enqueued"):
            parity_b(1)
        with options, pytest.raises(DbosNbError, match="applies to workflows enqueued"):
            DBOS.start_workflow(parity_b, 1)
    with SetEnqueueOptions(priority=3):  # where it belongs, it is taken
        handle = Queue("parity_prio", priority_enabled=True).enqueue(parity_b, 2)
    assert handle.get_result() == 2 and handle.get_status().priority == 3
    # The refused calls wrote nothing: the enqueued one is the function's only workflow.
    assert [w.workflow_id for w in DBOS.list_workflows(name=handle.get_status().name)] == [
        handle.workflow_id
    ]


def test_durable_sleep_outside_a_workflow_is_refused(launched: str) -> None:
    with pytest.raises(DbosNbError, match="inside a workflow"):
        DBOS.sleep(0.01)
    with pytest.raises(DbosNbError, match="inside a workflow"):
        asyncio.run(DBOS.sleep_async(0.01))

    @DBOS.step()
    def naps() -> str:
        DBOS.sleep(0.01)  # in a step: a plain sleep, nothing to record
        return "rested"

    @DBOS.workflow()
    def parity_sleeper() -> str:
        DBOS.sleep(0.01)
        return naps()

    with SetWorkflowID("sleeper"):
        assert parity_sleeper() == "rested"
    first, second = DBOS.list_workflow_steps("sleeper")
    assert first.function_name == "DBOS.sleep" and second.function_name.endswith("naps")


def test_priority_on_a_queue_without_priority_warns_once(launched: str) -> None:
    _, parity_b = _two_named_workflows()
    plain = Queue("parity_plain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with SetEnqueueOptions(priority=5):
            plain.enqueue(parity_b, 1).get_result()
            plain.enqueue(parity_b, 2).get_result()
        plain.enqueue(parity_b, 3).get_result()  # no priority given: nothing to say
    notes = [str(w.message) for w in caught if "priority_enabled" in str(w.message)]
    assert len(notes) == 1 and "parity_plain" in notes[0]


def test_delete_workflow_refuses_active_work_and_spares_other_rows(launched: str) -> None:
    parity_a, parity_b = _two_named_workflows()

    @DBOS.workflow()
    def parity_parent() -> int:
        return parity_b(7)

    with SetWorkflowID("del-parent"):
        assert parity_parent() == 7
    with SetWorkflowID("del-keep"):
        assert parity_a(1) == 2
    (child,) = DBOS.list_workflows(parent_workflow_id="del-parent")
    gate = Queue("parity_gate", limiter={"limit": 1, "period": 3600})
    gate.enqueue(parity_b, 1).get_result()  # takes the hour's only start
    waiting = gate.enqueue(parity_b, 2)
    with pytest.raises(WorkflowActiveError, match="ENQUEUED: cancel it"):
        DBOS.delete_workflow(waiting.workflow_id)
    assert waiting.get_status().status == "ENQUEUED"  # refused: nothing deleted

    DBOS.delete_workflow("del-parent")  # without its child
    assert DBOS.get_workflow_status("del-parent") is None
    assert DBOS.list_workflow_steps("del-parent") == []
    assert DBOS.get_workflow_status(child.workflow_id) is not None
    with DBOSClient(launched) as client:
        client.delete_workflow("del-no-such-workflow")  # unknown: not an error
        with SetWorkflowID("del-parent-2"):
            assert parity_parent() == 7
        client.delete_workflow("del-parent-2", delete_children=True)
    assert DBOS.list_workflows(parent_workflow_id="del-parent-2") == []
    assert DBOS.get_workflow_status("del-parent-2") is None
    kept = DBOS.get_workflow_status("del-keep")
    assert kept is not None and kept.output == 2
    assert len(DBOS.list_workflow_steps("del-keep")) == 1


def test_client_fork_and_the_async_management_calls(launched: str) -> None:
    parity_a, _ = _two_named_workflows()
    with SetWorkflowID("afork-src"):
        assert parity_a(1, scale=3) == 6

    async def with_dbos() -> tuple[Any, ...]:
        status = await DBOS.get_workflow_status_async("afork-src")
        listed = await DBOS.list_workflows_async(workflow_ids=["afork-src"])
        steps = await DBOS.list_workflow_steps_async("afork-src")
        with SetWorkflowID("afork-1"):
            forked = await DBOS.fork_workflow_async("afork-src", 2)
        result = await forked.get_result()
        queued = await DBOS.list_queued_workflows_async()
        return status, listed, steps, forked.workflow_id, result, queued

    status, listed, steps, fork_id, result, queued = asyncio.run(with_dbos())
    assert status is not None and status.output == 6
    assert [w.workflow_id for w in listed] == ["afork-src"]
    assert [s.function_id for s in steps] == [1]
    assert (fork_id, result) == ("afork-1", 6)
    assert queued == []

    with DBOSClient(launched) as client:
        handle = client.fork_workflow("afork-src", 1)
        assert handle.get_result() == 6
        fork = client.get_workflow_status(handle.workflow_id)
        assert fork is not None and fork.forked_from == "afork-src"
        with pytest.raises(DBOSNonExistentWorkflowError):
            client.fork_workflow("afork-no-such-workflow", 1)

        async def with_client() -> tuple[Any, ...]:
            steps = await client.list_workflow_steps_async(handle.workflow_id)
            again = await client.fork_workflow_async("afork-src", 2)
            result = await again.get_result()
            forks = await client.list_workflows_async(forked_from="afork-src")
            await client.delete_workflow_async(again.workflow_id)
            gone = await client.get_workflow_status_async(again.workflow_id)
            return steps, result, forks, gone

        steps, result, forks, gone = asyncio.run(with_client())
    assert result == 6
    # The fork from step 1 ran its step again: a step of its own, recorded.
    assert [s.function_id for s in steps] == [1]
    assert {w.workflow_id for w in forks} >= {"afork-1", handle.workflow_id}
    assert gone is None


def test_dbos_api_left_out_is_named_in_a_clear_error(launched: str) -> None:
    """DBOS Transact API that dbos_nb does not implement raises a typed error naming the
    feature (an AttributeError: `hasattr` answers False); a misspelt name stays a plain
    AttributeError, and what dbos_nb implements is unaffected."""
    with pytest.raises(DBOSNotImplementedError, match=r"DBOS\.set_event .*messages and events"):
        DBOS.set_event("progress", 1)
    with pytest.raises(DBOSNotImplementedError, match="streams"):
        DBOS.write_stream("k", 1)
    with pytest.raises(DBOSNotImplementedError, match="scheduled workflows"):
        DBOS.create_schedule("nightly")
    assert not hasattr(DBOS, "recv") and hasattr(DBOS, "cancel_workflow")
    with pytest.raises(AttributeError) as misspelt:
        DBOS.cancel_workflw  # noqa: B018
    assert not isinstance(misspelt.value, DBOSNotImplementedError)
    with DBOSClient(launched) as client:
        with pytest.raises(DBOSNotImplementedError, match=r"DBOSClient\.send "):
            client.send("wid", "message")
        with pytest.raises(DBOSNotImplementedError, match="get_event"):
            client.get_event("wid", "key")
        assert not hasattr(client, "get_event") and hasattr(client, "enqueue")
        with pytest.raises(AttributeError) as misspelt:
            client.enqueu  # noqa: B018
        assert not isinstance(misspelt.value, DBOSNotImplementedError)


def test_a_step_outside_a_workflow_or_inside_a_step_is_a_plain_call(launched: str) -> None:
    tries: list[str] = []

    @DBOS.step(retries_allowed=True, max_attempts=3, interval_seconds=0.0)
    def parity_flaky(tag: str) -> None:
        tries.append(tag)
        raise ValueError(f"boom {tag}")

    @DBOS.step()
    def parity_outer() -> Any:
        with contextlib.suppress(ValueError):
            parity_flaky("nested")
        return DBOS.step_id

    @DBOS.workflow()
    def parity_wraps() -> Any:
        return parity_outer()

    # As in DBOS: the function's own error, raised once (no retries, no step of its own).
    with pytest.raises(ValueError, match="boom outside"):
        parity_flaky("outside")
    assert tries == ["outside"]
    with SetWorkflowID("plain-nested"):
        assert parity_wraps() == 1  # the inner call is part of the outer step
    assert tries == ["outside", "nested"]
    assert len(DBOS.list_workflow_steps("plain-nested")) == 1
    with pytest.raises(DBOSMaxStepRetriesExceeded) as inside:

        @DBOS.workflow()
        def parity_retries() -> None:
            parity_flaky("inside")

        parity_retries()
    assert tries[2:] == ["inside"] * 3
    assert inside.value.max_retries == inside.value.max_attempts == 3


def test_dbos_error_module_names_codes_and_attributes() -> None:
    import dbos_nb
    from dbos_nb import error
    from dbos_nb._error import DBOSErrorCode, MaxRecoveryAttemptsExceededError

    assert error.DBOSQueueDeduplicatedError is dbos_nb.DBOSQueueDeduplicatedError
    assert MaxRecoveryAttemptsExceededError is dbos_nb.DBOSMaxRecoveryAttemptsExceededError
    missing = DBOSNonExistentWorkflowError("wf-9")
    assert missing.destination_id == "wf-9" and missing.message == str(missing)
    assert missing.dbos_error_code == DBOSErrorCode.NonExistentWorkflowError.value == 5
    assert DbosNbError("plain").dbos_error_code is None
    assert dbos_nb.DBOSRecordedError("T", "said").message == "said"
    with pytest.raises(error.DBOSWorkflowFunctionNotFoundError, match="not a DBOS workflow"):
        Queue("parity_undecorated").enqueue(print, 1)


@pytest.mark.parametrize(
    "name",
    [
        "run_step",
        "run_step_async",
        "listen_queues",
        "set_workflow_delay",
        "rewind_workflow",
        "send_bulk",
    ],
)
def test_more_dbos_api_left_out_is_named(name: str) -> None:
    """The DBOS 3.4 methods dbos_nb has no counterpart for raise the typed error that names
    them (no launch needed: the lookup itself raises)."""
    with pytest.raises(DBOSNotImplementedError, match=rf"DBOS\.{name} belongs to"):
        getattr(DBOS, name)
    assert not hasattr(DBOS, name)


def test_priority_must_be_in_dbos_range(launched: str) -> None:
    """As DBOS: a priority given on enqueue is 1 (first) to 2**31-1; 0 is refused, though a
    workflow enqueued without one is stored with 0."""
    _, parity_b = _two_named_workflows()
    Queue("parity_prio_range", priority_enabled=True)
    for bad in (0, -1, 2**31, 1.5, True):
        with pytest.raises(DbosNbError, match=r"Invalid priority .*between 1~2147483647"):
            SetEnqueueOptions(priority=bad)
    with DBOSClient(launched) as client:
        for bad in (0, 2**31):
            with pytest.raises(DbosNbError, match=r"Invalid priority"):
                client.enqueue(
                    {
                        "workflow_name": parity_b.__qualname__,
                        "queue_name": "parity_prio_range",
                        "priority": bad,
                    },
                    1,
                )
    for good in (1, 2**31 - 1):
        with SetEnqueueOptions(priority=good):
            handle = DBOS.enqueue_workflow("parity_prio_range", parity_b, good)
        assert handle.get_result() == good and handle.get_status().priority == good
    assert DBOS.enqueue_workflow("parity_prio_range", parity_b, 0).get_status().priority == 0


def test_every_error_comes_back_whole_from_its_record() -> None:
    """Errors are recorded as pickles (a workflow's outcome, or a management call's made by
    workflow code) and raised again on replay: each must come back as the same class with the
    same message and attributes, so that `except WorkflowActiveError:` still matches then."""
    import inspect

    from dbos_nb import errors, serialization

    samples: list[BaseException] = [
        errors.DbosNbError("plain"),
        errors.DBOSNonExistentWorkflowError("wf-1"),
        errors.DBOSConflictingWorkflowError("wf-2", "another function"),
        errors.WorkflowActiveError("wf-3", "PENDING", "deleting it"),
        errors.UnknownWorkflowNameError("name", " (a hint)"),
        errors.DBOSWorkflowFunctionNotFoundError("print is not a DBOS workflow"),
        errors.DBOSMaxStepRetriesExceeded("s", 3, [ValueError("v")]),
        errors.DBOSAwaitedWorkflowCancelledError("wf-4"),
        errors.DBOSWorkflowTimedOutError("wf-5"),
        errors.DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded("wf-6"),
        errors.DBOSQueueDeduplicatedError("wf-7", "q", "d-1"),
        errors.UnknownQueueError("nowhere"),
        errors.UnknownQueueError("gone", deleted=True),
        errors.QueueNotEmptyError("busy", {"ENQUEUED": 2, "PENDING": 1}),
        errors.RateLimited("slow down", retry_after=2.0),
        errors.DBOSRecordedError("Weird", "said"),
        errors.WorkflowPreempted("wf-8", "cancelled"),
    ]
    custom = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BaseException)
        and cls.__module__ == errors.__name__
        and "__init__" in vars(cls)
    }
    assert custom <= {type(e) for e in samples}, custom - {type(e) for e in samples}
    for original in samples:
        copy = serialization.load_error(serialization.dump_error(original))
        assert type(copy) is type(original), original
        assert str(copy) == str(original)
        # Attributes, but the mark of a recorded error and (not comparable) nested errors.
        left_out = {"_dbos_nb_recorded", "errors"}
        assert {k: v for k, v in vars(copy).items() if k not in left_out} == {
            k: v for k, v in vars(original).items() if k not in left_out
        }


def test_an_error_reads_as_its_type_and_message_even_as_a_stand_in() -> None:
    """How the CLI, the frames and the progress widget print an error: a stand-in for one that
    could not be stored is shown under the type it stands for, not as DBOSRecordedError."""
    import threading

    from dbos_nb import serialization

    assert serialization.error_text(ValueError("bad input 7")) == "ValueError: bad input 7"
    unpicklable = KeyError("k")
    unpicklable.lock = threading.Lock()  # type: ignore[attr-defined]
    stored = serialization.load_error(serialization.dump_error(unpicklable))
    assert type(stored).__name__ == "DBOSRecordedError"
    assert serialization.error_text(stored) == "KeyError: 'k'"
