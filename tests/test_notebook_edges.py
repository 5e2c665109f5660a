"""Edge cases of the notebook layer: --rerun guards, exact DataFrame outputs, launch errors and
hidden passwords, typed errors for bad magic arguments, queued cells without a worker, and
default batch names that are the same in every process."""

from __future__ import annotations

import dataclasses
import enum
import os
import socket
import subprocess
import sys
import threading
import uuid
import warnings
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy.exc
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from sqlalchemy.engine import make_url

import dbos_nb
from conftest import (
    HELD_STEP,
    create_pg_database,
    drop_pg_database,
    launched_shell,
    new_shell,
    wait_until,
)
from conftest import run_cell as run
from dbos_nb import DBOS
from dbos_nb.core.registry import resolve
from dbos_nb.core.runtime import get_runtime
from dbos_nb.errors import DbosNbError
from dbos_nb.notebook.batch import legacy_batch_name
from dbos_nb.notebook.batch_names import default_batch_name
from dbos_nb.notebook.magics import DbosMagics, _args, parse_limit

STEPS = """
from dbos_nb import DBOS
@DBOS.step()
def fetch(i):
    if i < 0:
        raise ValueError('negative')
    return 2**60 + i
"""


@pytest.fixture
def shell(db_url: str) -> Iterator[InteractiveShell]:
    yield from launched_shell(db_url, "nbedges")


# -- 1, 2: --rerun ------------------------------------------------------------------------------


def test_rerun_never_deletes_another_workflows_id(shell: InteractiveShell) -> None:
    run(shell, STEPS)
    run(shell, "%dbos_queue q")
    batch = run(shell, "q.map(fetch, [1, 2, 3], batch='paid')")
    batch.wait(timeout=20, show=False)
    for flags in ("", " --rerun"):
        with pytest.raises(UsageError, match="belongs to"):
            run(shell, f"%%dbos_workflow scratch --id paid/0{flags}\nz = 1\n")
    assert batch.results() == [2**60 + 1, 2**60 + 2, 2**60 + 3]
    assert batch.counts()["done"] == 3


def test_rerun_keeps_the_named_batches_the_cell_mapped(shell: InteractiveShell) -> None:
    """`--rerun` runs the cell's code afresh, but the batches it mapped by name stay: mapped
    again, they are found, and no item is paid for twice (the README's promise for a batch
    name). Its other children go with the old run."""
    shell.user_ns["CALLS"] = []
    run(shell, STEPS.replace("    return 2**60 + i", "    CALLS.append(i)\n    return 2 * i"))
    run(shell, "%dbos_queue q")
    cell = (
        "%%dbos_workflow mapper{}\n"
        "b = q.map(fetch, [1, 2, 3], batch='kept-by-rerun')\n"
        "b.wait(20, show=False)\n"
        "child = DBOS.start_workflow(fetch, 10).get_result()\n"
        "b.results() + [child]\n"
    )
    assert run(shell, cell.format("")) == [2, 4, 6, 20]
    assert run(shell, cell.format(" --rerun")) == [2, 4, 6, 20]
    assert sorted(shell.user_ns["CALLS"]) == [1, 2, 3, 10, 10]


def test_rerun_of_a_cell_still_running_is_refused(shell: InteractiveShell) -> None:
    gate = threading.Event()
    shell.user_ns["gate"] = gate
    shell.user_ns["RUNS"] = []
    run(shell, HELD_STEP)
    cell = "%%dbos_workflow job --background\ntotal = held(1) + held(2)\ntotal\n"
    handle = run(shell, cell)
    wait_until(lambda: shell.user_ns["RUNS"] == [1])
    outcome: list[BaseException | None] = []

    def rerun() -> None:
        try:
            run(shell, cell.replace("--background", "--rerun"))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=rerun, daemon=True)
    thread.start()
    thread.join(15)
    gate.set()  # frees a rerun that waits (the bug) as well as the background run
    assert outcome and isinstance(outcome[0], UsageError), outcome
    assert "still running" in str(outcome[0]) and "%dbos_cancel job" in str(outcome[0])
    assert handle.get_result(timeout_sec=20) == 3  # the cell's value, not the record
    # Once it finished, --rerun runs the cell afresh.
    assert run(shell, cell.replace("--background", "--rerun")) == 3
    assert shell.user_ns["RUNS"] == [1, 2, 1, 2]


class KernelDied(BaseException):
    """Stands in for the kernel dying in the middle of a cell."""


def test_a_background_cell_run_again_unfinished_returns_its_handle(
    shell: InteractiveShell, db_url: str
) -> None:
    """--background (and --queue) return a handle at once, also when the cell's run already
    exists unfinished: running here in the background, or left by a kernel that died."""
    gate = threading.Event()
    shell.user_ns.update(gate=gate, RUNS=[], KernelDied=KernelDied, die=[False])
    steps = (
        "from dbos_nb import DBOS\n"
        "@DBOS.step()\n"
        "def held(i):\n"
        "    RUNS.append(i)\n"
        "    gate.wait(20)\n"
        "    return i\n"
    )
    run(shell, steps)
    cell = "%%dbos_workflow bg --background\ntotal = held(1) + held(2)\nif die[0]:\n"
    cell += "    raise KernelDied()\ntotal * 10\n"
    first = run(shell, cell)
    wait_until(lambda: shell.user_ns["RUNS"] == [1])
    returned: list[Any] = []
    again = threading.Thread(target=lambda: returned.append(run(shell, cell)), daemon=True)
    again.start()
    again.join(15)
    gate.set()  # frees a re-run that waits (the bug) as well as the background run
    assert returned and returned[0].workflow_id == "bg", "the re-run blocked"
    assert first.get_result(timeout_sec=20) == returned[0].get_result(timeout_sec=20) == 30
    # A run left unfinished by a dead kernel resumes in the background, without re-running
    # its completed steps.
    shell.user_ns.update(RUNS=[], die=[True])
    dying = cell.replace("bg --background", "dies").replace("held(2)", "held(2) + held(3)")
    with pytest.raises(KernelDied):
        run(shell, dying)
    DBOS.destroy(destroy_registry=True)
    run(shell, f"%dbos_launch --db {db_url} --name nbedges")
    run(shell, steps)
    shell.user_ns["die"] = [False]
    resumed = run(shell, dying.replace("dies", "dies --background"))
    assert resumed.get_result(timeout_sec=20) == 60
    assert shell.user_ns["RUNS"] == [1, 2, 3]  # each step ran once


def test_names_bound_by_match_and_except_star_are_recorded(shell: InteractiveShell) -> None:
    cell = (
        "%%dbos_workflow matched\n"
        "config = {'mode': 'fast', 'size': 3}\n"
        "match config:\n"
        "    case {'mode': 'fast', 'size': n, **rest}:\n"
        "        speed = n * 10\n"
        "try:\n    raise ExceptionGroup('g', [ValueError('v')])\n"
        "except* ValueError as group:\n    handled = len(group.exceptions)\n"
    )
    run(shell, cell)
    for name in ("n", "rest", "speed", "handled"):
        del shell.user_ns[name]
    run(shell, cell)
    assert [shell.user_ns.get(k) for k in ("n", "rest", "speed", "handled")] == [3, {}, 30, 1]


# -- 3, 4: DataFrames ---------------------------------------------------------------------------


def test_frame_outputs_are_exactly_the_results(shell: InteractiveShell) -> None:
    run(shell, STEPS)
    run(shell, "%dbos_queue q")
    batch = run(shell, "q.map(fetch, [1, 2, -1], batch='ints')")
    batch.wait(timeout=20, show=False)
    expected = [2**60 + 1, 2**60 + 2, None]
    with pytest.warns(UserWarning, match="1 of 3 items failed"):
        assert batch.results() == expected
    frame = batch.to_pandas()
    assert frame["output"].dtype == object
    assert frame["output"].tolist() == expected
    assert [type(v) for v in frame["output"]] == [int, int, type(None)]
    flows = dbos_nb.workflows_frame(queue_name="q")
    assert sorted(flows["output"].tolist(), key=str) == sorted(expected, key=str)
    status = run(shell, "%dbos_status q")
    # Outputs are not loaded for the status (a cell's output holds all its values): no column
    # of Nones, but the failed item's error.
    assert "output" not in status.columns
    assert status["error"].tolist() == ["ValueError: negative", None, None]


def test_expand_keeps_outputs_that_are_not_dicts(shell: InteractiveShell) -> None:
    run(
        shell,
        "from dbos_nb import DBOS\n"
        "@DBOS.step()\n"
        "def parse(x):\n"
        "    return {'label': x, 'score': 0.5} if x != 'raw' else 'unparsed text'\n"
        "@DBOS.step()\n"
        "def plain(x):\n"
        "    return x * 10\n",
    )
    run(shell, "%dbos_queue q")
    mixed = run(shell, "q.map(parse, ['a', 'raw', 'c'], batch='mixed')")
    plain = run(shell, "q.map(plain, [1, 2], batch='plain')")
    mixed.wait(timeout=20, show=False)
    plain.wait(timeout=20, show=False)
    wide = mixed.to_pandas(expand=True)
    assert wide["output"].tolist() == [None, "unparsed text", None]
    assert wide["label"].tolist()[::2] == ["a", "c"]
    cols = list(wide.columns)
    assert cols.index("input") < cols.index("output") < cols.index("label")
    flat = plain.to_pandas(expand=True)
    assert flat["output"].tolist() == [10, 20]


# -- 5, 6: %dbos_launch -------------------------------------------------------------------------


def _with_password(url: str, password: str) -> str:
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def test_launch_never_prints_the_password(pg_server_url: str, capsys: Any) -> None:
    url = create_pg_database(pg_server_url)
    try:
        secret = "s3cr3t-" + uuid.uuid4().hex[:6]
        sh = new_shell()
        with_pw = _with_password(url, secret)
        run(sh, f"%dbos_launch --db {with_pw} --name pw")
        run(sh, f"%dbos_launch --db {with_pw} --name pw")
        with pytest.raises(UsageError) as refused:
            run(sh, "%dbos_launch --name other")
        out = capsys.readouterr().out
        assert "launched" in out and "already running" in out and "***" in out
        assert secret not in out and secret not in str(refused.value)
    finally:
        DBOS.destroy()
        drop_pg_database(pg_server_url, url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_failed_launch_can_be_corrected(pg_server_url: str) -> None:
    url = create_pg_database(pg_server_url)
    try:
        sh = new_shell()
        bad = make_url(_with_password(url, "pw-secret")).set(host="127.0.0.1", port=_free_port())
        bad_url = bad.render_as_string(hide_password=False)
        with pytest.raises(UsageError, match="cannot launch") as failed:
            run(sh, f"%dbos_launch --db {bad_url} --name retry")
        assert isinstance(failed.value.__cause__, sqlalchemy.exc.SQLAlchemyError)
        assert str(bad.port) in str(failed.value) and "pw-secret" not in str(failed.value)
        run(sh, f"%dbos_launch --db {url} --name retry")
        assert DBOS.list_workflows() == []
    finally:
        DBOS.destroy()
        drop_pg_database(pg_server_url, url)


TWIN = (
    "import socket, sys, time\n"
    "from dbos_nb import DBOS\n"
    "DBOS(config={'name': 'twin', 'system_database_url': sys.argv[1],"
    " 'executor_id': f'nb:twin@{socket.gethostname()}', 'heartbeat_interval_sec': 0.2})\n"
    "DBOS.launch()\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_second_kernel_of_the_same_notebook_is_told_what_to_do(db_url: str) -> None:
    """Two kernels of one notebook (or two that cannot tell their notebook's name) would share
    an executor id; the second is refused with the way out."""
    twin = subprocess.Popen([sys.executable, "-c", TWIN, db_url], stdout=subprocess.PIPE, text=True)
    try:
        assert twin.stdout is not None and twin.stdout.readline().strip() == "ready"
        sh = new_shell()
        with pytest.raises(UsageError, match=r"Another kernel of notebook 'twin'.*--name OTHER"):
            run(sh, f"%dbos_launch --db {db_url} --name twin")
        run(sh, f"%dbos_launch --db {db_url} --name twin --executor-id twin-2")
        assert DBOS.list_workflows() == []
    finally:
        DBOS.destroy()
        twin.kill()
        twin.wait(30)


def test_launch_again_and_cancel_say_what_really_happened(
    shell: InteractiveShell, db_url: str, capsys: Any
) -> None:
    run(shell, f"%dbos_launch --db {db_url} --name nbedges")  # the same: a no-op
    assert "already running" in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"already running here as a worker.*DBOS\.destroy"):
        run(shell, f"%dbos_launch --db {db_url} --name nbedges --no-worker")
    with pytest.raises(UsageError, match="unsupported database URL 'not-a-url'"):
        run(shell, "%dbos_launch --db not-a-url")
    run(shell, "%%dbos_workflow finished\n41 + 1\n")
    capsys.readouterr()
    run(shell, "%dbos_cancel finished")
    assert "already ended SUCCESS; nothing to cancel" in capsys.readouterr().out
    assert DBOS.get_workflow_status("finished").status == "SUCCESS"  # type: ignore[union-attr]


def test_resume_says_what_it_did_and_a_cells_handle_gives_its_value(
    shell: InteractiveShell, capsys: Any
) -> None:
    run(shell, "%%dbos_workflow finished\n41 + 1\n")
    shell.user_ns["fail"] = True
    with pytest.raises(ValueError):
        run(shell, "%%dbos_workflow failed\nif fail:\n    raise ValueError('no')\n")
    capsys.readouterr()
    for wid, status in (("finished", "SUCCESS"), ("failed", "ERROR")):
        assert run(shell, f"%dbos_resume {wid}") is None
        assert f"already ended {status}; nothing to resume" in capsys.readouterr().out
    with pytest.raises(UsageError, match="no workflow 'nope'"):
        run(shell, "%dbos_resume nope")
    # A cancelled cell, resumed: its handle gives the cell's value, not the recorded names.
    gate = threading.Event()
    shell.user_ns.update(gate=gate, RUNS=[])
    run(shell, HELD_STEP)
    run(shell, "%%dbos_workflow paused --background\ntotal = held(1) + held(2)\ntotal * 10\n")
    wait_until(lambda: shell.user_ns["RUNS"] == [1])
    run(shell, "%dbos_cancel paused")
    gate.set()
    rt = get_runtime()
    wait_until(lambda: not rt.is_running("paused"))
    handle = run(shell, "%dbos_resume paused")
    assert "resumed paused" in capsys.readouterr().out
    assert handle.get_result(timeout_sec=20) == 30
    assert shell.user_ns["total"] == 3


def test_quoted_magic_arguments_are_unquoted(
    shell: InteractiveShell, db_url: str, capsys: Any
) -> None:
    run(shell, f"%dbos_launch --db \"{db_url}\" --name 'nbedges'")
    assert "already running" in capsys.readouterr().out
    fast = run(shell, "%dbos_queue \"llm-fast\" --as 'fast' --limit '10 / 30 s'")
    assert fast.name == "llm-fast" and fast.limiter == {"limit": 10, "period": 30.0}
    assert shell.user_ns["fast"] is fast
    handle = run(shell, "%%dbos_workflow 'quoted cell' --id \"q-1\" --queue 'llm-fast'\n7\n")
    assert handle.workflow_id == "q-1" and handle.get_result(timeout_sec=20) == 7
    status = DBOS.get_workflow_status("q-1")
    assert status is not None and (status.name, status.queue_name) == (
        "cell:quoted cell",
        "llm-fast",
    )
    assert len(run(shell, "%dbos_status 'llm-fast'")) == 1
    run(shell, "%dbos_cancel 'q-1'")
    run(shell, '%dbos_resume "q-1"')
    out = capsys.readouterr().out
    assert "q-1 had already ended SUCCESS; nothing to cancel" in out
    assert "q-1 had already ended SUCCESS; nothing to resume" in out
    workers = _args(DbosMagics.dbos_workers, "2 --queue \"a b\" --queue 'c' --queue d")
    assert (workers.action, workers.queue) == ("2", ["a b", "c", "d"])
    with pytest.raises(UsageError, match="cannot read the arguments"):
        run(shell, '%dbos_queue "unclosed')


def test_status_of_an_unknown_queue_is_refused(shell: InteractiveShell) -> None:
    run(shell, "%dbos_queue known")
    assert len(run(shell, "%dbos_status known")) == 0
    with pytest.raises(UsageError, match="queue 'unknown' is not declared"):
        run(shell, "%dbos_status unknown")


# -- 7: typed errors from magic arguments -------------------------------------------------------


def test_bad_magic_arguments_raise_usage_errors(shell: InteractiveShell) -> None:
    for text in ("10/.", "10/..", "5/1.5.2s"):
        with pytest.raises(UsageError, match="LIMIT/PERIOD"):
            parse_limit(text)
    assert parse_limit("10/.5s") == {"limit": 10, "period": 0.5}
    assert parse_limit("10/2.s") == {"limit": 10, "period": 2.0}
    with pytest.raises(UsageError, match="LIMIT/PERIOD"):
        run(shell, "%dbos_queue q --limit 10/.")
    with pytest.raises(UsageError, match="--tokens 'lots'"):
        run(shell, "%dbos_queue q2 --tokens lots")
    with pytest.raises(UsageError, match=r"cell 'aw'.*await"):
        run(shell, "%%dbos_workflow aw\nimport asyncio\nawait asyncio.sleep(0)\n")
    for line in ("%time x = 1", "!ls"):
        with pytest.raises(UsageError, match=r"cell 'mg', line 2: magics and shell commands"):
            run(shell, f"%%dbos_workflow mg\ny = 0\n{line}\n")
    with pytest.raises(UsageError, match="valid variable"):
        run(shell, "%dbos_queue def")
    assert "def" not in shell.user_ns
    assert run(shell, "%dbos_queue def --as dq").name == "def"
    # The name must not silently replace a builtin or the notebook's data.
    with pytest.raises(UsageError, match="'print' is a Python builtin"):
        run(shell, "%dbos_queue print")
    assert "print" not in shell.user_ns
    run(shell, "papers = [1, 2]")
    with pytest.raises(UsageError, match="'papers' already holds a list"):
        run(shell, "%dbos_queue papers")
    assert shell.user_ns["papers"] == [1, 2]
    assert run(shell, "%dbos_queue papers --as papers_q").name == "papers"
    assert run(shell, "%dbos_queue papers --as papers_q --concurrency 2").concurrency == 2


# -- 8: queued cells need a kernel that runs queued work ----------------------------------------


def test_queued_cell_refused_without_a_worker(db_url: str) -> None:
    sh = new_shell()
    run(sh, f"%dbos_launch --db {db_url} --name noworker --no-worker")
    run(sh, "%dbos_queue q")
    with pytest.raises(UsageError, match="runs no work from queue 'q'"):
        run(sh, "%%dbos_workflow qcell --queue q\nv = 7\nv\n")
    assert DBOS.get_workflow_status("qcell") is None
    assert run(sh, "%%dbos_workflow qcell\nv = 7\nv\n") == 7


# -- 9: default batch names ---------------------------------------------------------------------


@dataclasses.dataclass
class Doc:
    id: int
    tags: set[str]


class Color(enum.Enum):
    RED = 1


Pair = namedtuple("Pair", "a b")


def _name(items: list[Any]) -> str:
    return default_batch_name("mod.fn", [((item,), {}) for item in items])


def test_default_names_depend_only_on_values() -> None:
    assert _name([1, 2]) == _name([1, 2]) and _name([1, 2]).startswith("fn-")
    distinct = [
        [1, 2],
        [2, 1],
        [1],
        [1.0],
        [True],
        ["1"],
        [b"1"],
        [(1, 2)],
        [[1, 2]],
        [Pair(1, 2)],
        [Color.RED],
        [Doc(1, {"a"})],
        [Doc(2, {"a"})],
        [{"a": 1}],
        [{"a": 2}],
        [{1, 2}],
        [frozenset({1, 2})],
        [np.int64(1)],
        [np.float32(1)],
        [np.arange(3)],
        [np.arange(3).reshape(3, 1)],
        [float("nan")],
        [1 + 2j],
        [None],
    ]
    names = [_name(items) for items in distinct]
    assert len(set(names)) == len(names)
    assert _name([{"a": 1, "b": 2}]) == _name([{"b": 2, "a": 1}])
    assert _name([{"x", "y", "z"}]) == _name([{"z", "y", "x"}])
    assert _name([np.array([1, None], dtype=object)]) == _name([np.array([1, None], dtype=object)])
    kw = default_batch_name("mod.fn", [((), {"a": 1, "b": 2})])
    assert kw == default_batch_name("mod.fn", [((), {"b": 2, "a": 1})])
    assert kw != default_batch_name("other.fn", [((), {"a": 1, "b": 2})])
    with pytest.raises(DbosNbError, match=r"item 1 .*'object'.*batch='\.\.\.'"):
        _name([1, object()])
    with pytest.raises(DbosNbError, match="item 0"):
        _name([[1, {"k": threading.Lock()}]])


SCRIPT = """
import sys
from dataclasses import dataclass
from dbos_nb import DBOS, Queue

@dataclass
class Doc:
    id: int
    tags: set

@DBOS.step()
def summarize(doc):
    return doc.id

DBOS(config={"name": "names", "system_database_url": sys.argv[1], "listen_queues": []})
DBOS.launch()
queue = Queue("names_q")
docs = [Doc(i, {"alpha", "beta", "gamma", f"x{i}"}) for i in range(4)]
batch = queue.map(summarize, docs)
# Under a name, the items' digest must match too: another seed, the same digest.
named = queue.map(summarize, docs, batch="named-docs")
print(batch.id, len(DBOS.list_workflows()), named.id)
DBOS.destroy()
"""


def test_default_name_is_the_same_in_another_process(db_url: str, tmp_path: Path) -> None:
    script = tmp_path / "nb.py"
    script.write_text(SCRIPT)
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, str(script), db_url],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.split())
    assert outputs[0] == outputs[1]  # the same batch, not enqueued twice
    assert outputs[0][0].startswith("summarize-") and outputs[0][1] == "8"  # 4 + 4 named
    assert outputs[0][2] == "named-docs"


class Opaque:
    """Not plain data: its batch has no items digest."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()

    def __reduce__(self) -> Any:
        return (Opaque, (self.n,))


def test_map_under_an_existing_name_with_other_items_is_refused(
    shell: InteractiveShell,
) -> None:
    """A re-run cell whose list changed, under the same batch name, would otherwise attach to
    the old items and never run the new ones."""
    run(shell, STEPS)
    run(shell, "%dbos_queue q --limit 1/3600s")  # nothing starts: the rows stay as enqueued
    first = run(shell, "q.map(fetch, [1, 2, 3], batch='b')")
    assert run(shell, "q.map(fetch, [1, 2, 3], batch='b')").id == first.id == "b"
    with pytest.raises(dbos_nb.BatchConflictError, match=r"'b' already exists with other items"):
        run(shell, "q.map(fetch, [1, 2, 4], batch='b')")
    with pytest.raises(dbos_nb.BatchConflictError, match="other items"):
        run(shell, "q.map(fetch, [{'a': 1}, 2, 3], batch='b')")
    assert len(DBOS.list_workflows(queue_name="q")) == 3
    assert [DBOS.retrieve_workflow(f"b/{i}").get_status().input for i in range(3)] == [
        {"args": (1,), "kwargs": {}},
        {"args": (2,), "kwargs": {}},
        {"args": (3,), "kwargs": {}},
    ]
    # The same values pickled otherwise (a set's order follows its insertion history, as it
    # follows the hash seed in another kernel) are the same items.
    assert list({8, 0}) != [0, 8]  # the premise: equal sets, another order
    first_set = run(shell, "q.map(fetch, [{0, 8}, 1], batch='sets')")
    assert run(shell, "q.map(fetch, [{8, 0}, 1], batch='sets')").id == first_set.id
    with pytest.raises(dbos_nb.BatchConflictError, match="other items"):
        run(shell, "q.map(fetch, [{8, 1}, 1], batch='sets')")
    # Items that are not plain data cannot be compared by value: the name decides, as before,
    # with a warning that the results are the old items'.
    shell.user_ns["Opaque"] = Opaque
    run(shell, "q.map(fetch, [Opaque(1), Opaque(2)], batch='opaque')")
    with pytest.warns(UserWarning, match="cannot be compared by value"):
        assert run(shell, "q.map(fetch, [Opaque(5), Opaque(6)], batch='opaque')").id == "opaque"
    # Default names come from the items: other items are another batch, never a conflict.
    assert run(shell, "q.map(fetch, [7, 8])").id != run(shell, "q.map(fetch, [7, 9])").id
    assert len(DBOS.list_workflows(queue_name="q")) == 3 + 2 + 2 + 2 + 2


def test_attaching_to_a_batch_of_another_version_warns(shell: InteractiveShell) -> None:
    """Editing a step and mapping the same items again attaches to the batch already paid
    for; its results come from the old code, which is said."""
    run(shell, STEPS)
    run(shell, "%dbos_queue q --limit 1/3600s")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = run(shell, "q.map(fetch, [1, 2])")
        run(shell, "q.map(fetch, [1, 2], batch='named')")
        assert run(shell, "q.map(fetch, [1, 2])").id == first.id  # the same version: silent
    run(shell, STEPS.replace("2**60 + i", "2**61 + i"))  # the step is edited
    for code in ("q.map(fetch, [1, 2])", "q.map(fetch, [1, 2], batch='named')"):
        with pytest.warns(UserWarning, match=r"another version of .*fetch.*new batch name"):
            run(shell, code)


def test_batches_named_by_earlier_versions_are_found(shell: InteractiveShell) -> None:
    run(shell, STEPS)
    run(shell, "%dbos_queue q")
    reg, _ = resolve(shell.user_ns["fetch"], ())
    from dbos_nb import serialization

    items = [3, 4]
    old = legacy_batch_name(
        reg.name, [serialization.dump_inputs(reg.name, (i,), {}) for i in items]
    )
    first = run(shell, f"q.map(fetch, {items}, batch={old!r})")
    assert run(shell, f"q.map(fetch, {items})").id == first.id == old
    assert run(shell, "q.map(fetch, [5, 6])").id != old
    with pytest.raises(DbosNbError, match="batch="):
        run(shell, "q.map(fetch, [object()])")


# -- waiting on a batch that nothing can run ------------------------------------------------------


@contextmanager
def _batch_nothing_serves(db_url: str, name: str, items: list[int]) -> Iterator[Any]:
    """DBOS launched serving no queue, and a batch of a step on the queue `<name>_q`: nothing
    in this process runs it (as in a kernel restarted with --no-worker)."""
    from dbos_nb import Queue

    DBOS(config={"name": name, "system_database_url": db_url, "listen_queues": []})
    DBOS.launch()
    try:

        @DBOS.step(name=f"{name}_step")
        def step(x: int) -> int:
            return x

        yield Queue(f"{name}_q").map(step, items, batch=name)
    finally:
        DBOS.destroy()


def test_waiting_on_a_batch_that_nothing_runs_warns(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart (here: a kernel that runs no queued work) a batch's items wait for a
    process that serves its queue: wait() says so, once the batch has made no progress for a
    while, instead of only hanging."""
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.notebook import batch as batch_module

    # No grace period: the check runs at the first poll that sees no progress.
    monkeypatch.setattr(batch_module, "IDLE_WARNING_AFTER_S", 0.0)
    with _batch_nothing_serves(db_url, "nbwait", [1, 2]) as batch:
        with (
            pytest.warns(RuntimeWarning, match="'nbwait_q' is not served here"),
            pytest.raises(TimeoutError),
        ):
            batch.wait(timeout=0.2, show=False)
        rt = get_runtime()
        # A worker this notebook just started (%dbos_workers) may run it before it has
        # registered: no warning then.
        from dbos_nb.notebook import workers

        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            workers._save(rt, [{"pid": sleeper.pid, "executor_id": "not-registered-yet"}])
            _waits_without_warning(batch)
        finally:
            sleeper.kill()
            sleeper.wait(30)
        with (  # it died
            pytest.warns(RuntimeWarning, match="no worker process is alive"),
            pytest.raises(TimeoutError),
        ):
            batch.wait(timeout=0.2, show=False)
        # A live worker process may run it: no warning then.
        rt.store.register_executor("nbwait-worker", "host", 1, "token", rt.now_ms())
        _waits_without_warning(batch)


def test_the_progress_view_says_why_a_stalled_batch_does_not_move(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live view and the summary left in the cell show what wait() warns of: a batch
    that has stood still with nothing running, and why nothing runs it."""
    from dbos_nb.notebook import batch as batch_module
    from dbos_nb.notebook import views

    monkeypatch.setattr(batch_module, "IDLE_WARNING_AFTER_S", 0.0)
    with _batch_nothing_serves(db_url, "nbstall", [1, 2]) as batch:
        assert batch.progress().stalled is None  # first seen: it may yet move
        stalled = batch.progress()
        assert stalled.stalled is not None
        assert "'nbstall_q' is not served here" in stalled.stalled
        assert "stalled: nothing runs the unfinished items" in views.progress_text(stalled)
        assert "<b>stalled:</b> nothing runs" in views.progress_html(stalled)
        # It moves (one item cancelled): no verdict until it has stood still again.
        DBOS.cancel_workflow(batch.workflow_ids[0])
        assert batch.progress().stalled is None
        view = views.LiveView(batch)  # the widget, refreshed from the same batch
        view._apply(batch.progress())
        assert "<b>stalled:</b> nothing runs" in view.stalled.value


def test_wait_finds_a_worker_that_registered_again_under_a_new_id(db_url: str) -> None:
    """A worker of this notebook whose executor id another process took goes on under a new
    id: it is found by its process, and what it reported is quoted (it was taken for a
    worker still starting, and the wait said nothing)."""

    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.models import shown_function_name
    from dbos_nb.notebook import workers

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with _batch_nothing_serves(db_url, "nbrejoin", [1]) as batch:
            rt = get_runtime()
            workers._save(rt, [{"pid": sleeper.pid, "executor_id": "nbrejoin-worker"}])
            assert batch._why_nothing_runs() is None  # not registered yet: it may be starting
            now = rt.now_ms()
            # The id it was started with, now held by another process (which reported nothing).
            rt.store.register_executor(
                "nbrejoin-worker", "elsewhere", 1, "tok-0", now, lease_ms=600_000
            )
            rt.store.register_executor(
                "nbrejoin-worker-1a2b3c4d",
                socket.gethostname(),
                sleeper.pid,
                "tok",
                now,
                lease_ms=600_000,
            )
            [version] = rt.store.waiting_versions(batch_id="nbrejoin")
            function = shown_function_name(batch.function_name)
            rt.store.record_load_failure(
                "nbrejoin-worker-1a2b3c4d", "tok", function, version, "ImportError: gone", now
            )
            said = batch._why_nothing_runs()
            assert said is not None
            assert f"nbrejoin-worker-1a2b3c4d on {socket.gethostname()}" in said
            assert "ImportError: gone" in said
    finally:
        sleeper.kill()
        sleeper.wait(30)


def test_a_wait_judges_a_stall_from_what_it_sees_itself(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verdict the progress view reached earlier is not a new wait's: workers started
    since are not registered yet, and the wait gives them its own grace period."""
    from dbos_nb.notebook import batch as batch_module

    monkeypatch.setattr(batch_module, "IDLE_WARNING_AFTER_S", 0.0)
    with _batch_nothing_serves(db_url, "nbfresh", [1]) as batch:
        batch.progress()
        assert batch.progress().stalled is not None
        monkeypatch.setattr(batch_module, "IDLE_WARNING_AFTER_S", 5.0)
        _waits_without_warning(batch)


def _waits_without_warning(batch: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TimeoutError):
            batch.wait(timeout=0.2, show=False)


def test_a_batch_still_shows_after_dbos_is_destroyed(db_url: str) -> None:
    from dbos_nb import Queue

    DBOS(config={"name": "nbrepr", "system_database_url": db_url})
    DBOS.launch()

    @DBOS.step(name="nbrepr_step")
    def nbrepr_step(x: int) -> int:
        return x

    batch = Queue("nbrepr_q").map(nbrepr_step, [1, 2], batch="nbrepr")
    batch.wait(timeout=20, show=False)
    assert "2 done" in repr(batch)
    DBOS.destroy()
    assert repr(batch) == "<Batch 'nbrepr': 2 items (DBOS is not launched)>"
    assert "not launched" in batch._repr_html_()
