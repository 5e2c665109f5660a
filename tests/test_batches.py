"""Batches from Python (both backends): `retry_failed()` re-runs every item the batch counts as
failed, and only those (also items whose failure came from a child workflow, and items given up
after too many recoveries); a name conflict is told in the user's names."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from conftest import config, wait_until
from dbos_nb import DBOS, BatchConflictError, DbosNbError, Queue
from dbos_nb.errors import BatchItemsConflictError
from dbos_nb.storage.database import Database


def test_retry_reruns_items_whose_child_workflow_failed(launched: str) -> None:
    calls: list[int] = []
    fixed = {"now": False}

    @DBOS.step()
    def flaky(y: int) -> int:
        calls.append(y)
        if not fixed["now"]:
            raise ConnectionError("transient")
        return y * 10

    @DBOS.workflow()
    def child(y: int) -> int:
        return flaky(y)

    @DBOS.workflow()
    def parent(x: int) -> int:
        return child(x) + 1

    batch = Queue("retry_children").map(parent, [1, 2], batch="retry-children")
    batch.wait(timeout=20, show=False)
    assert batch.counts()["failed"] == 2 and sorted(calls) == [1, 2]
    fixed["now"] = True
    assert batch.retry_failed() == 2
    batch.wait(timeout=20, show=False)
    assert batch.results() == [11, 21]
    assert sorted(calls) == [1, 1, 2, 2]  # the failed step ran again, once per item
    children = DBOS.list_workflows(parent_workflow_id=["retry-children/0", "retry-children/1"])
    assert [c.status for c in children] == ["SUCCESS", "SUCCESS"]


def test_retry_reruns_items_given_up_after_too_many_recoveries(db_url: str) -> None:
    """An item whose process kept dying is dead-lettered (MAX_RECOVERY_ATTEMPTS_EXCEEDED) with
    an error that says why; the batch counts it failed, shows that error, and retries it."""
    runs: list[int] = []

    def body(x: int) -> int:
        runs.append(x)
        return x * 2

    def declare() -> Callable[[int], int]:
        return DBOS.workflow(name="retry_crashy", max_recovery_attempts=1)(body)

    DBOS(config=config(db_url, listen_queues=["elsewhere"]))  # enqueues, does not run
    crashy = declare()
    DBOS.launch()
    batch = Queue("retry_dead").map(crashy, [1, 2], batch="retry-dead")
    DBOS.destroy()
    # Item 0 as a process that died while running it, again and again, leaves it.
    db = Database(db_url)
    table = ("dbos_nb." if db.is_postgres else "") + "workflow_status"
    with db.write() as conn:
        conn.execute(
            sa.text(
                f"UPDATE {table} SET status = 'PENDING', owner_xid = 'dead', "
                "executor_id = 'local', recovery_attempts = 5 "
                "WHERE workflow_uuid = 'retry-dead/0'"
            )
        )
    db.dispose()
    DBOS(config=config(db_url))
    declare()  # registered again in the new DBOS, as a relaunched program does
    DBOS.launch()
    batch.wait(timeout=20, show=False)
    assert batch.counts()["failed"] == 1 and runs == [2]
    error = batch.to_pandas()["error"].iloc[0]
    assert "started 5 times" in error and "max_recovery_attempts=1" in error
    recent = batch.progress().recent_errors
    assert [wid for wid, _ in recent] == ["retry-dead/0"]
    assert batch.retry_failed() == 1
    batch.wait(timeout=20, show=False)
    assert batch.results() == [2, 4] and sorted(runs) == [1, 2]


def test_a_batch_name_conflict_names_steps_as_the_user_does(launched: str) -> None:
    @DBOS.step(name="conflict_first")
    def first(x: int) -> int:
        return x

    @DBOS.step(name="conflict_second")
    def second(x: int) -> int:
        return x

    queue = Queue("conflicts")
    queue.map(first, [1, 2], batch="conflict").wait(timeout=20, show=False)
    with pytest.raises(BatchConflictError) as refused:
        queue.map(second, [1, 2], batch="conflict")
    message = str(refused.value)
    assert "'conflict_first'" in message and "'conflict_second'" in message
    assert "__dbos_nb" not in message


def test_expanded_outputs_keep_their_types_when_items_fail(launched: str) -> None:
    @DBOS.step(name="typed_outputs")
    def measure(x: int) -> dict[str, object]:
        if x == 2:
            raise ValueError("no measure for 2")
        return {"n": x * 10, "ok": x > 1, "label": f"x{x}"}

    batch = Queue("typed").map(measure, [1, 2, 3], batch="typed")
    batch.wait(timeout=20, show=False)
    wide = batch.to_pandas(expand=True)
    assert str(wide["n"].dtype) == "Int64" and str(wide["ok"].dtype) == "boolean"
    assert wide["n"].tolist()[::2] == [10, 30] and wide["n"].isna().tolist() == [
        False,
        True,
        False,
    ]
    assert wide["ok"].tolist()[::2] == [False, True]
    assert wide["error"].tolist()[::2] == [None, None]
    assert wide["error"].iloc[1].startswith("ValueError: no measure for 2")


def test_expanded_numpy_outputs_keep_their_types_too(launched: str) -> None:
    """numpy's scalars (a model's or a frame's values) are typed as Python's are."""
    import numpy as np

    @DBOS.step(name="numpy_outputs")
    def measure(x: int) -> dict[str, object]:
        if x == 2:
            raise ValueError("no measure for 2")
        return {"n": np.int64(x * 10), "ok": np.bool_(x > 1), "mean": np.float32(x / 2)}

    batch = Queue("typed_np").map(measure, [1, 2, 3], batch="typed-np")
    wide = batch.wait(timeout=20, show=False).to_pandas(expand=True)
    dtypes = [str(wide[c].dtype) for c in ("n", "ok", "mean")]
    assert dtypes == ["Int64", "boolean", "Float64"]
    assert wide["n"].tolist()[::2] == [10, 30] and wide["ok"].tolist()[::2] == [False, True]


def test_map_refuses_other_items_under_a_name_enqueue_many_recorded(launched: str) -> None:
    """A batch made by `enqueue_many` keeps no digest of its items: mapping other items under
    its name is refused (compared by value), the same items attach to it."""

    @DBOS.step(name="undigested_times_ten")
    def times_ten(x: int) -> int:
        return x * 10

    queue = Queue("undigested")
    queue.enqueue_many(times_ten, [7, 8], batch_id="undigested")
    with pytest.raises(BatchItemsConflictError, match="other items"):
        queue.map(times_ten, [7, 9], batch="undigested")
    attached = queue.map(times_ten, [7, 8], batch="undigested")
    attached.wait(timeout=20, show=False)
    assert attached.results() == [70, 80]


def test_cancelled_items_resume_in_the_batchs_queue(launched: str) -> None:
    """After `batch.cancel()`, `resume_cancelled()` puts the cancelled items back in the
    batch's own queue (under its limits), and they go on from their last completed step."""
    gate = threading.Event()
    calls: list[tuple[str, int]] = []

    @DBOS.step(name="rc_first")
    def first(i: int) -> int:
        calls.append(("first", i))
        return i

    @DBOS.step(name="rc_held")
    def held(i: int) -> int:
        calls.append(("held", i))
        gate.wait(20)
        return i * 10

    @DBOS.workflow(name="rc_item")
    def item(i: int) -> int:
        return held(first(i))

    batch = Queue("rc_q", concurrency=1).map(item, [1, 2, 3], batch="rc")
    wait_until(lambda: ("held", 1) in calls)
    assert batch.cancel() == 3
    assert batch.counts()["cancelled"] == 3
    gate.set()
    assert batch.resume_cancelled() == 3
    batch.wait(timeout=20, show=False)
    assert batch.results() == [10, 20, 30]
    assert calls.count(("first", 1)) == 1 and calls.count(("held", 1)) == 1  # nothing paid twice
    assert {w.queue_name for w in DBOS.list_workflows(workflow_id_prefix="rc/")} == {"rc_q"}


def test_a_start_after_a_stopped_execution_reads_the_records_again(launched: str) -> None:
    """The mechanism behind the test above, without its race: an execution told to stop that
    ends here marks its workflow, once, so that the next execution (whose claim may have read
    the workflow's last operation before the stopped one recorded more) reads it again."""
    from dbos_nb.core.context import RunningWorkflow
    from dbos_nb.core.runtime import get_runtime

    rt = get_runtime()
    for reason in (None, "cancelled"):
        running = RunningWorkflow("marked", "owner", "wf", None)
        running.preempt_reason = reason
        assert rt.add_running(running) is None
        rt.remove_running("marked")
        assert rt.ended_after_stop("marked") is (reason is not None)
        assert not rt.ended_after_stop("marked")  # told once


def test_results_say_what_became_of_failed_items(launched: str) -> None:
    @DBOS.step(name="results_odd_fails")
    def odd_fails(x: int) -> int:
        if x % 2:
            raise ValueError(f"odd {x}")
        return x

    batch = Queue("results_q").map(odd_fails, [0, 1, 2, 3], batch="results-b")
    batch.wait(timeout=20, show=False)
    with pytest.warns(UserWarning, match="'results-b': 2 of 4 items failed"):
        assert batch.results() == [0, None, 2, None]
    with pytest.raises(ValueError, match="odd 1") as raised:
        batch.results(errors="raise")
    assert raised.value.__notes__ == ["item 1 of batch 'results-b' (results-b/1)"]
    returned = batch.results(errors="return")
    assert returned[0::2] == [0, 2] and [str(e) for e in returned[1::2]] == ["odd 1", "odd 3"]
    with pytest.raises(DbosNbError, match=r"errors=\.\.\.\) must be one of 'none'"):
        batch.results(errors="ignore")


def test_a_timed_out_item_says_so_in_the_frame(launched: str) -> None:
    from dbos_nb import SetWorkflowTimeout

    @DBOS.step(name="frame_slow_step")
    def slow(i: int) -> int:
        time.sleep(0.5)
        return i

    @DBOS.workflow(name="frame_timed_wf")
    def timed(i: int) -> int:
        return slow(i) + slow(i)

    with SetWorkflowTimeout(0.2):
        batch = Queue("frame_timeouts").map(timed, [1], batch="timed-out")
    batch.wait(timeout=20, show=False)
    frame = batch.to_pandas()
    assert list(frame["status"].astype(str)) == ["CANCELLED"]
    assert frame["error"].iloc[0].startswith("DBOSWorkflowTimedOutError: ")
    plain = Queue("frame_timeouts").map(timed, [2], batch="cancelled-by-hand")
    plain.cancel()
    plain.wait(timeout=20, show=False)
    assert plain.to_pandas()["error"].iloc[0] is None  # its status says it all


def test_items_that_do_not_fit_the_function_are_refused_before_enqueueing(launched: str) -> None:
    @DBOS.step(name="fit_add")
    def add(a: int, b: int) -> int:
        return a + b

    queue = Queue("fit_q")
    with pytest.raises(
        DbosNbError, match=r"item 0 does not fit .* fit_add\(a, b\): missing .* 'b'"
    ):
        queue.map(add, [(1, 2), (3, 4)], batch="fit-tuples")
    with pytest.raises(DbosNbError, match=r"item 1 does not fit.*unexpected keyword"):
        queue.enqueue_many(add, [{"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}], unpack=True)
    assert DBOS.list_workflows(queue_name="fit_q") == []  # nothing was written
    handles = queue.enqueue_many(add, [(1, 2), (3, 4)], unpack=True)
    assert [h.get_result() for h in handles] == [3, 7]


def test_a_batch_id_whose_key_another_batch_holds_is_refused(launched: str) -> None:
    """A batch's rows carry a 64-bit key of its id, not the id: a batch id whose key another
    batch holds already (a hash collision, made here by hand) is refused with a clear error,
    nothing of it is written, and the batches already there keep their rows."""
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.storage.schema import batch_key, batches

    @DBOS.workflow(name="keyed_batch")
    def keyed(x: int) -> int:
        return x

    queue = Queue("keyed")
    queue.enqueue_many(keyed, [1, 2], batch_id="first")
    store = get_runtime().store
    record = store.get_batch("first")
    assert record is not None and record["batch_key"] == batch_key("first")
    with store.db.write() as conn:
        conn.execute(
            batches.insert().values(
                batch_id="impostor",
                batch_key=batch_key("second"),
                queue_name="keyed",
                function_name="other",
                size=1,
                created_at=1,
            )
        )
    with pytest.raises(
        BatchConflictError, match="same 64-bit key as the existing batch 'impostor'"
    ):
        queue.enqueue_many(keyed, [3, 4, 5], batch_id="second")
    assert store.get_batch("second") is None
    assert DBOS.list_workflows(workflow_ids=["second/0", "second/1", "second/2"]) == []
    wait_until(lambda: store.batch_counts("first") == {"SUCCESS": 2}, timeout=20)
    assert store.batch_counts("second") == {} and store.batch_counts("impostor") == {}


def test_a_deleted_item_keeps_the_others_in_place(launched: str) -> None:
    """An item deleted (DBOS.delete_workflow) leaves a gap: `results()` stays aligned with the
    inputs (None in its place), `wait()` does not wait for it, progress says so, and mapping
    the batch again enqueues it anew, in its place."""
    calls: list[int] = []

    @DBOS.step()
    def tenfold(x: int) -> int:
        calls.append(x)
        return x * 10

    queue = Queue("gaps")
    batch = queue.map(tenfold, [1, 2, 3], batch="gapped").wait(timeout=20, show=False)
    DBOS.delete_workflow("gapped/1")
    assert batch.results() == [10, None, 30]
    assert batch.wait(timeout=5, show=False) is batch
    progress = batch.progress()
    assert (progress.total, progress.deleted, progress.complete) == (2, 1, True)
    assert "1 deleted" in progress.summary()
    for bad in (-1, 0, "5", float("nan")):
        with pytest.raises(DbosNbError, match=r"wait\(timeout=\.\.\.\) must be"):
            batch.wait(timeout=bad, show=False)  # type: ignore[arg-type]
    again = queue.map(tenfold, [1, 2, 3], batch="gapped").wait(timeout=20, show=False)
    assert again.results() == [10, 20, 30]
    assert list(again.to_pandas()["item"]) == [0, 1, 2]
    assert sorted(calls) == [1, 2, 2, 3]


def test_retry_with_the_current_code_needs_the_function_defined_here(db_url: str) -> None:
    """After a restart, retry_failed() before the function's cell is run again would run the
    version that failed (and pay for the same failure again): it raises, retrying nothing,
    until the function is defined; current_code=False runs the old version knowingly."""
    from dbos_nb import Batch

    def first(s: str) -> int:
        return int(s)

    DBOS(config=config(db_url))
    parse = DBOS.step(name="retry_parse")(first)
    queue = Queue("retry_here")
    DBOS.launch()
    batch = queue.map(parse, ["1", "x2"], batch="needs-code").wait(timeout=20, show=False)
    assert batch.counts()["failed"] == 1
    DBOS.destroy(destroy_registry=True)  # as a kernel restart forgets the function
    DBOS(config=config(db_url))
    Queue("retry_here")
    DBOS.launch()
    attached = Batch.attach("needs-code")
    with pytest.raises(DbosNbError, match=r"'retry_parse' is not defined in this process"):
        attached.retry_failed()
    assert attached.counts()["failed"] == 1

    def fixed(s: str) -> int:
        return int(s.lstrip("x"))

    DBOS.step(name="retry_parse")(fixed)  # the cell that defines it runs again
    assert attached.retry_failed() == 1
    assert attached.wait(timeout=20, show=False).results() == [1, 2]


class Doc:
    """An item that is not plain data (no value comparison: a plain class)."""

    def __init__(self, text: str) -> None:
        self.text = text


def test_other_items_that_cannot_be_compared_attach_with_a_warning(launched: str) -> None:
    """Under an existing name, items whose bytes differ and that cannot be compared by value
    attach to the batch (another kernel may pickle the same items differently), but say so:
    the results are the old items'."""

    @DBOS.step(name="doc_text")
    def text_of(doc: Doc) -> str:
        return doc.text

    queue = Queue("docs_q")
    first = queue.map(text_of, [Doc("old1"), Doc("old2")], batch="docs")
    assert first.wait(timeout=20, show=False).results() == ["old1", "old2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same items: no warning
        queue.map(text_of, [Doc("old1"), Doc("old2")], batch="docs")
    with pytest.warns(UserWarning, match=r"batch 'docs' exists with items that serialize"):
        again = queue.map(text_of, [Doc("NEW1"), Doc("NEW2")], batch="docs")
    assert again.results() == ["old1", "old2"]
