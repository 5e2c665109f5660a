"""Transactions: writes and checkpoint commit together, exactly once; on both backends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import config
from dbos_nb import DBOS, DBOSUnexpectedStepError, SetWorkflowID
from dbos_nb.core.runtime import get_runtime
from dbos_nb.storage.database import normalize_url
from dbos_nb.storage.schema import operation_outputs, transaction_outputs, workflow_status


def _app_engine(url: str) -> sa.Engine:
    return sa.create_engine(normalize_url(url))


def _count(url: str) -> int:
    engine = _app_engine(url)
    with engine.connect() as conn:
        n = int(conn.execute(sa.text("SELECT COUNT(*) FROM items")).scalar_one())
    engine.dispose()
    return n


@pytest.fixture
def app_url(db_url: str, new_db_url: Callable[[], str]) -> str:
    """A separate application database with an `items` table, and DBOS launched on both."""
    url = new_db_url()
    engine = _app_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE items (name VARCHAR(50) NOT NULL)"))
    engine.dispose()
    DBOS(config=config(db_url, application_database_url=url))
    DBOS.launch()
    return url


def test_transaction_commits_once_and_replays(app_url: str) -> None:
    runs: list[str] = []

    @DBOS.transaction()
    def insert_item(name: str) -> int:
        runs.append(name)
        DBOS.sql_session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
        return int(DBOS.sql_session.execute(sa.text("SELECT COUNT(*) FROM items")).scalar_one())

    @DBOS.workflow()
    def wf() -> int:
        return insert_item("a")

    with SetWorkflowID("tx-1"):
        assert wf() == 1
    forked = DBOS.fork_workflow("tx-1", 2)  # replays the recorded transaction
    assert forked.get_result() == 1
    assert runs == ["a"]
    assert _count(app_url) == 1


def test_failed_transaction_rolls_back_and_records_error(app_url: str) -> None:
    @DBOS.transaction()
    def insert_then_fail() -> None:
        DBOS.sql_session.execute(sa.text("INSERT INTO items (name) VALUES ('x')"))
        raise RuntimeError("abort after insert")

    @DBOS.workflow()
    def wf() -> str:
        try:
            insert_then_fail()
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    with SetWorkflowID("tx-fail"):
        assert wf() == "abort after insert"
    assert _count(app_url) == 0
    steps = DBOS.list_workflow_steps("tx-fail")
    assert isinstance(steps[0].error, RuntimeError)


def test_app_checkpoint_prevents_a_second_commit(app_url: str) -> None:
    """A crash after the app-database commit but before the system record: not committed again."""
    runs: list[int] = []

    @DBOS.transaction(isolation_level="READ COMMITTED")
    def insert_item() -> str:
        runs.append(1)
        DBOS.sql_session.execute(sa.text("INSERT INTO items (name) VALUES ('once')"))
        return "inserted"

    @DBOS.workflow()
    def wf() -> str:
        return insert_item()

    with SetWorkflowID("tx-gap"):
        assert wf() == "inserted"
    _as_a_crash_left_it("tx-gap")
    (recovered,) = DBOS.recover_pending_workflows()
    assert recovered.get_result(timeout_sec=10) == "inserted"
    assert runs == [1]
    assert _count(app_url) == 1
    # The system record was written from the checkpoint: the step is there to be listed.
    assert [s.function_name for s in DBOS.list_workflow_steps("tx-gap")] == [
        insert_item.__qualname__
    ]


def _as_a_crash_left_it(workflow_id: str) -> None:
    """The workflow's state after a crash between its transaction's commit (with its
    checkpoint in the application database) and the system record: running, nothing
    recorded."""
    rt = get_runtime()
    with rt.db.write() as conn:
        conn.execute(
            sa.delete(operation_outputs).where(operation_outputs.c.workflow_uuid == workflow_id)
        )
        conn.execute(
            sa.update(workflow_status)
            .where(workflow_status.c.workflow_uuid == workflow_id)
            .values(status="PENDING", output=None, completed_at=None)
        )


def test_a_checkpoint_of_another_transaction_is_not_taken_for_this_one(app_url: str) -> None:
    """A replay that reaches, at this operation's number, the checkpoint of a transaction of
    another name went astray (the code changed): it raises, as for a system record, rather
    than return the other transaction's value without running this one."""
    runs: list[str] = []

    @DBOS.transaction(name="tx_named")
    def named() -> str:
        runs.append("named")
        return "named's value"

    @DBOS.workflow()
    def wf() -> str:
        return named()

    with SetWorkflowID("tx-astray"):
        assert wf() == "named's value"
    _as_a_crash_left_it("tx-astray")
    with get_runtime().app_db.write() as conn:
        conn.execute(
            sa.update(transaction_outputs)
            .where(transaction_outputs.c.workflow_uuid == "tx-astray")
            .values(function_name="tx_other")
        )
    (recovered,) = DBOS.recover_pending_workflows()
    with pytest.raises(DBOSUnexpectedStepError, match="'tx_other' as operation 1"):
        recovered.get_result(timeout_sec=10)
    assert runs == ["named"]


def test_transaction_outside_a_workflow_and_session_errors(app_url: str) -> None:
    @DBOS.transaction()
    def plain() -> int:
        DBOS.sql_session.execute(sa.text("INSERT INTO items (name) VALUES ('p')"))
        return 1

    assert plain() == 1
    assert _count(app_url) == 1
    with pytest.raises(RuntimeError, match="only available inside"):
        _ = DBOS.sql_session
    with pytest.raises(ValueError, match="unknown isolation level"):
        DBOS.transaction(isolation_level="SOMETIMES")


def test_transaction_enqueued_alone(app_url: str) -> None:
    from dbos_nb import Queue

    q = Queue("tx_queue")

    @DBOS.transaction()
    def insert_named(name: str) -> str:
        DBOS.sql_session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
        return name

    handles = [q.enqueue(insert_named, f"n{i}") for i in range(5)]
    assert [h.get_result(timeout_sec=10) for h in handles] == [f"n{i}" for i in range(5)]
    assert _count(app_url) == 5


def _launching_in_a_transaction(
    name: str, launch: Callable[[int], Any]
) -> Callable[[int, bool], str]:
    """A workflow whose transaction launches a workflow (`launch(x)`, returning its handle),
    then fails if asked to, after the launch; the workflow returns the launched id."""

    @DBOS.transaction(name=f"{name}_txn")
    def txn(x: int, fail: bool) -> str:
        DBOS.sql_session.execute(sa.text("SELECT 1"))
        wid: str = launch(x).workflow_id
        if fail:
            raise ValueError("rolled back")
        return wid

    @DBOS.workflow(name=f"{name}_wf")
    def wf(x: int, fail: bool) -> str:
        return txn(x, fail)

    return wf


def test_a_transaction_on_the_system_database_enqueues(launched: str) -> None:
    """The default set-up: the application's transactions run in the system database. One that
    enqueues a workflow must not wait on its own write lock (SQLite): the enqueue joins the
    transaction there, and so commits only with it; on PostgreSQL it commits on its own."""
    from dbos_nb import Queue

    queue = Queue("txq")

    @DBOS.workflow()
    def child(x: int) -> int:
        return x + 1

    parent = _launching_in_a_transaction("tx_enqueue", lambda x: queue.enqueue(child, x))
    wid = DBOS.start_workflow(parent, 1, False).get_result(timeout_sec=20)
    assert DBOS.retrieve_workflow(wid).get_result(timeout_sec=20) == 2
    failed = DBOS.start_workflow(parent, 5, True)
    with pytest.raises(ValueError, match="rolled back"):
        failed.get_result(timeout_sec=20)
    children = [s for s in DBOS.list_workflows(queue_name="txq") if s.workflow_id != wid]
    rt = get_runtime()
    if rt.db.is_postgres:
        assert [s.input for s in children] == [{"args": (5,), "kwargs": {}}]
    else:
        assert children == []  # the enqueue was rolled back with the transaction
    # Started (not enqueued) inside the transaction: it runs once committed, and never for a
    # row rolled back; a function version stored in a rolled-back transaction is stored again.
    ran: list[int] = []

    @DBOS.workflow(name="tx_started")
    def started(x: int) -> int:
        ran.append(x)
        return x * 3

    starter = _launching_in_a_transaction("tx_start", lambda x: DBOS.start_workflow(started, x))
    with pytest.raises(ValueError, match="rolled back"):
        DBOS.start_workflow(starter, 7, True).get_result(timeout_sec=20)
    ok = DBOS.start_workflow(starter, 8, False).get_result(timeout_sec=20)
    assert DBOS.retrieve_workflow(ok).get_result(timeout_sec=20) == 24
    assert ran == [8] if not rt.db.is_postgres else sorted(ran) == [7, 8]
    stored = {name for name, _, _ in rt.store.list_function_versions()}
    assert "tx_started" in stored  # its first start's record rolled back: stored by the second


def test_a_transaction_committed_by_a_racing_execution_is_replayed(
    app_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two executions of one workflow (a take-over, a resume) both find no checkpoint and run
    the transaction; the second to commit meets the first's checkpoint key. Its writes roll
    back and it takes the first's outcome, instead of recording the key conflict as the
    transaction's error. The interleaving is forced: the first commits right after the second
    has looked."""
    from dbos_nb.core import steps
    from dbos_nb.serialization import dumps
    from dbos_nb.storage.schema import transaction_outputs

    runs: list[str] = []
    looked = steps._app_checkpoint

    def other_commits_after_the_check(rt: Any, workflow_id: str, fid: int, name: str) -> Any:
        monkeypatch.setattr(steps, "_app_checkpoint", looked)
        with rt.app_db.write() as conn:  # the other execution: its writes and its checkpoint
            conn.execute(sa.text("INSERT INTO items (name) VALUES ('by-the-other')"))
            conn.execute(
                transaction_outputs.insert().values(
                    workflow_uuid=workflow_id,
                    function_id=fid,
                    function_name="insert_once",
                    output=dumps("committed by the other"),
                    created_at=1,
                )
            )
        return None  # what this execution saw a moment before

    @DBOS.transaction(name="insert_once")
    def insert_once() -> str:
        runs.append("here")
        DBOS.sql_session.execute(sa.text("INSERT INTO items (name) VALUES ('here')"))
        return "committed here"

    @DBOS.workflow()
    def wf() -> str:
        return insert_once()

    monkeypatch.setattr(steps, "_app_checkpoint", other_commits_after_the_check)
    assert wf() == "committed by the other"
    assert runs == ["here"]  # it ran, and its writes rolled back
    engine = _app_engine(app_url)
    with engine.connect() as conn:
        names = list(conn.execute(sa.text("SELECT name FROM items")).scalars())
    engine.dispose()
    assert names == ["by-the-other"]
