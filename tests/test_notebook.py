"""The notebook layer through a real IPython InteractiveShell: magics, durable cells, batches,
progress views and DataFrames, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import dbos_nb
from conftest import run_cell as run
from dbos_nb import DBOS, Batch, UnknownBatchError
from dbos_nb.notebook.magics import parse_limit
from dbos_nb.notebook.views import Snapshot, progress_html, progress_text, widgets_available

CALLS: list[Any] = []  # side effects of steps, outside the database


@pytest.fixture
def shell(db_url: str) -> Iterator[InteractiveShell]:
    sh = InteractiveShell.instance()
    sh.reset(new_session=True)
    sh.user_ns["CALLS"] = CALLS
    CALLS.clear()
    sh.run_line_magic("load_ext", "dbos_nb")
    sh.run_line_magic("load_ext", "dbos_nb")  # loading twice is harmless
    run(sh, f"%dbos_launch --db {db_url} --name nbtest")
    yield sh
    DBOS.destroy()


STEPS = """
from dbos_nb import DBOS
@DBOS.step()
def fetch(i):
    CALLS.append(("fetch", i))
    return i * 10
"""


def test_launch_is_idempotent_and_queue_magic(
    shell: InteractiveShell, db_url: str, capsys: Any
) -> None:
    run(shell, f"%dbos_launch --db {db_url} --name nbtest")
    assert "already running" in capsys.readouterr().out
    with pytest.raises(UsageError, match="already launched"):
        run(shell, "%dbos_launch --name elsewhere")
    q = run(shell, "%dbos_queue llm --concurrency 4 --worker-concurrency 2 --limit 50/30s")
    assert shell.user_ns["llm"] is q
    assert (q.concurrency, q.worker_concurrency, q.limiter) == (4, 2, {"limit": 50, "period": 30})
    parts = run(shell, "%dbos_queue users --partition-concurrency 1 --partition-limit 10/1m")
    assert (parts.partition_concurrency, parts.partition_limiter) == (
        1,
        {"limit": 10, "period": 60},
    )
    with pytest.raises(UsageError, match=r"partition_concurrency \(5\) cannot exceed"):
        run(shell, "%dbos_queue bad3 --concurrency 2 --partition-concurrency 5")
    run(shell, "%dbos_queue other-q --as oq --priority")
    assert shell.user_ns["oq"].priority_enabled
    with pytest.raises(UsageError, match="cannot exceed"):
        run(shell, "%dbos_queue bad --concurrency 1 --worker-concurrency 3")
    with pytest.raises(UsageError, match="LIMIT/PERIOD"):
        run(shell, "%dbos_queue bad2 --limit fifty")
    with pytest.raises(UsageError, match="valid variable"):
        run(shell, "%dbos_queue my-queue")


def test_parse_limit() -> None:
    assert parse_limit("50/30s") == {"limit": 50, "period": 30.0}
    assert parse_limit("500/1m") == {"limit": 500, "period": 60.0}
    assert parse_limit("10/s") == {"limit": 10, "period": 1.0}
    assert parse_limit("5/250ms") == {"limit": 5, "period": 0.25}
    with pytest.raises(UsageError):
        parse_limit("0/1s")


def test_durable_cell_runs_once_and_replays(shell: InteractiveShell, capsys: Any) -> None:
    run(shell, STEPS)
    cell = (
        "%%dbos_workflow scores\n"
        "total = 0\n"
        "for i in range(3):\n"
        "    total += fetch(i)\n"
        "label = 'sum'\n"
        "total * 2\n"
    )
    assert run(shell, cell) == 60
    assert CALLS == [("fetch", 0), ("fetch", 1), ("fetch", 2)]
    assert shell.user_ns["total"] == 30
    for name in ("total", "label", "i"):
        del shell.user_ns[name]
    # Running the finished cell again: the recorded variables come back and nothing runs.
    assert run(shell, cell) == 60
    assert CALLS == [("fetch", 0), ("fetch", 1), ("fetch", 2)]
    assert (shell.user_ns["total"], shell.user_ns["label"], shell.user_ns["i"]) == (30, "sum", 2)
    status = DBOS.get_workflow_status("scores")
    assert status is not None and status.status == "SUCCESS"
    # A changed finished cell: the recorded result, with a note.
    assert run(shell, cell.replace("total * 2", "total * 3")) == 60
    assert "cell changed" in capsys.readouterr().out


def test_replayed_cell_brings_back_its_definitions(shell: InteractiveShell) -> None:
    cell = (
        "%%dbos_workflow defs\nimport math\ndef helper(x):\n    return x + 1\nvalue = helper(1)\n"
    )
    run(shell, cell)
    for name in ("math", "helper", "value"):
        del shell.user_ns[name]
    run(shell, cell)
    assert shell.user_ns["value"] == 2
    assert shell.user_ns["helper"](5) == 6
    assert shell.user_ns["math"].sqrt(4) == 2


def test_replay_restores_guarded_imports_and_names_what_it_cannot(
    shell: InteractiveShell, capsys: Any
) -> None:
    """A `try` of imports only runs again on replay; a def inside an `if` does not (running
    the condition again is running the cell again): the replay says which names it lacks."""
    cell = (
        "%%dbos_workflow guarded_defs\n"
        "try:\n    import no_such_module_here as fastjson\n"
        "except ImportError:\n    import json as fastjson\n"
        "if True:\n    def nested(x):\n        return x * 3\n"
        "lock = __import__('threading').Lock()\n"
        "value = nested(2)\n"
        "def top(x):\n    return x\n"
        "def cached(x):\n    return x\n"
        "cached = __import__('functools').lru_cache(cached)\n"  # not what the def gives back
    )
    run(shell, cell)
    # The first run names what a replay will lack: not what the definitions bring back.
    first = capsys.readouterr().out
    assert "not recorded (cannot be serialized): nested, lock, cached\n" in first
    run(shell, cell)  # replayed in the same kernel: the cached function stays as it was
    assert hasattr(shell.user_ns["cached"], "cache_info")
    capsys.readouterr()
    for name in ("fastjson", "nested", "lock", "value", "cached"):
        del shell.user_ns[name]
    run(shell, cell)
    assert shell.user_ns["value"] == 6
    assert shell.user_ns["fastjson"].dumps([1]) == "[1]"
    out = capsys.readouterr().out
    assert "bind): nested, lock, cached. Define" in out and shell.user_ns["top"](4) == 4
    assert "cached" not in shell.user_ns  # not the plain function in the cached one's place
    assert "nested" not in shell.user_ns


NOTEBOOK_DATA = """
import random, types
import pandas as pd
df = pd.DataFrame({"text": ["a", "bb"]})
config = {"model": "x"}
seen = []
items = [1, 2, 3, 4, 5, 6]
untouched = {"k": 1}
scratch = types.ModuleType("scratch")
"""


def test_replay_brings_back_changes_in_place(
    shell: InteractiveShell, db_url: str, capsys: Any
) -> None:
    """A cell that changes objects made by earlier cells: after a restart, with the earlier
    cells run again, the replay brings back those objects as the cell left them."""
    run(shell, STEPS)
    run(shell, NOTEBOOK_DATA)
    cell = (
        "%%dbos_workflow enrich\n"
        "df['summary'] = [fetch(len(t)) for t in df.text]\n"
        "df.loc[0, 'summary'] += 1\n"
        "config['done'] = True\n"
        "del config['model']\n"
        "seen.append(fetch(5))\n"  # changed by a method call
        "random.Random(0).shuffle(items)\n"  # changed by a function it is passed to
        "size = len(untouched)\n"  # only read
        "scratch.flag = True\n"  # a module: not recorded, and said so
        "df.shape\n"
    )
    assert run(shell, cell) == (2, 2)
    assert "scratch" in capsys.readouterr().out
    shuffled = list(shell.user_ns["items"])
    assert shuffled != [1, 2, 3, 4, 5, 6]
    # A new kernel: the earlier cells run again, then the finished cell replays.
    DBOS.destroy(destroy_registry=True)
    run(shell, f"%dbos_launch --db {db_url} --name nbtest")
    run(shell, STEPS)
    run(shell, NOTEBOOK_DATA)
    untouched = shell.user_ns["untouched"]
    assert run(shell, cell) == (2, 2)
    assert CALLS == [("fetch", 1), ("fetch", 2), ("fetch", 5)]  # nothing ran again
    ns = shell.user_ns
    assert ns["df"]["summary"].tolist() == [11, 20]
    assert ns["config"] == {"done": True}
    assert ns["seen"] == [50] and ns["items"] == shuffled
    assert ns["untouched"] is untouched  # read, not changed: the kernel's object stays
    assert not hasattr(ns["scratch"], "flag")
    assert "changes this cell made in place to scratch, if any, are not restored" in (
        capsys.readouterr().out
    )


def test_replay_brings_back_large_frames_changed_by_a_call(
    shell: InteractiveShell, db_url: str
) -> None:
    """A frame and an array of a few megabytes, changed in place by calls (`insert`,
    `shuffle`): pickled with out-of-band buffers, they are still told changed, and come back
    as the cell left them."""
    data = (
        "import numpy as np, pandas as pd\n"
        "big = pd.DataFrame({'a': np.arange(200_000), 'b': np.arange(200_000) * 2})\n"
        "arr = np.arange(500_000)\n"
    )
    run(shell, data)
    cell = (
        "%%dbos_workflow reshape\n"
        "big.insert(0, 'c', 1)\n"
        "np.random.default_rng(0).shuffle(arr)\n"
        "list(big.columns)\n"
    )
    assert run(shell, cell) == ["c", "a", "b"]
    shuffled = shell.user_ns["arr"].copy()
    DBOS.destroy(destroy_registry=True)
    run(shell, f"%dbos_launch --db {db_url} --name nbtest")
    run(shell, data)
    assert run(shell, cell) == ["c", "a", "b"]
    assert list(shell.user_ns["big"].columns) == ["c", "a", "b"]
    restored = shell.user_ns["arr"]
    assert (restored == shuffled).all() and (restored != sorted(shuffled)).any()


class KernelDied(BaseException):
    """Stands in for the kernel dying in the middle of a cell."""


def test_unfinished_cell_resumes_after_a_restart(shell: InteractiveShell, db_url: str) -> None:
    run(shell, STEPS)
    shell.user_ns["KernelDied"] = KernelDied
    shell.user_ns["die_once"] = [True]
    cell = (
        "%%dbos_workflow resumable\n"
        "a = fetch(1)\n"
        "if die_once.pop():\n"
        "    raise KernelDied()\n"
        "b = fetch(2)\n"
        "a + b\n"
    )
    with pytest.raises(KernelDied):
        run(shell, cell)
    assert CALLS == [("fetch", 1)]
    # A new kernel: DBOS and every registration are gone; the notebook's cells run again.
    DBOS.destroy(destroy_registry=True)
    run(shell, f"%dbos_launch --db {db_url} --name nbtest")
    run(shell, STEPS)
    shell.user_ns["die_once"] = [False]
    assert run(shell, cell) == 30
    assert CALLS == [("fetch", 1), ("fetch", 2)]  # fetch(1) was not run again


def test_a_cells_last_value_that_cannot_be_recorded_is_shown_by_its_run(
    shell: InteractiveShell, capsys: Any
) -> None:
    """A cell ending in a value that cannot be serialized (a lock, a model) shows it, as an
    ordinary cell would, and says that a replay cannot; the replay says so too."""
    import threading

    cell = "%%dbos_workflow lockcell\nimport threading\nthreading.Lock()\n"
    shown = run(shell, cell)
    assert isinstance(shown, type(threading.Lock()))
    assert "last value is shown but not recorded" in capsys.readouterr().out
    assert run(shell, cell) is None  # the replay
    assert "last value was not recorded" in capsys.readouterr().out


def test_a_batch_mapped_in_a_durable_cell_comes_back_after_a_restart(
    shell: InteractiveShell, db_url: str
) -> None:
    """A Batch pickles as its name: a cell's `b = q.map(...)` is recorded, and the replay in a
    new kernel gives `b` back, attached to the same batch, without paying again."""
    run(shell, STEPS)
    run(shell, "%dbos_queue mapped_in_cell")
    cell = (
        "%%dbos_workflow maps\n"
        "b = mapped_in_cell.map(fetch, [1, 2], batch='from-a-cell')\n"
        "b.wait(20, show=False)\n"
        "b\n"
    )
    first = run(shell, cell)
    assert isinstance(first, Batch) and first.results() == [10, 20]
    DBOS.destroy(destroy_registry=True)  # a new kernel
    shell.user_ns.pop("b")
    run(shell, f"%dbos_launch --db {db_url} --name nbtest")
    run(shell, STEPS)
    run(shell, "%dbos_queue mapped_in_cell")
    again = run(shell, cell)
    assert isinstance(again, Batch) and again.id == "from-a-cell"
    assert shell.user_ns["b"].results() == [10, 20]
    assert sorted(CALLS) == [("fetch", 1), ("fetch", 2)]


def test_changed_unfinished_cell_is_refused(shell: InteractiveShell, db_url: str) -> None:
    run(shell, STEPS)
    shell.user_ns["KernelDied"] = KernelDied
    cell = "%%dbos_workflow guarded\nx = fetch(1)\nraise KernelDied()\n"
    with pytest.raises(KernelDied):
        run(shell, cell)
    DBOS.destroy(destroy_registry=True)
    run(shell, f"%dbos_launch --db {db_url} --name nbtest")
    run(shell, STEPS)
    with pytest.raises(UsageError, match="cell changed"):
        run(shell, "%%dbos_workflow guarded\nx = fetch(100)\n")
    assert run(shell, "%%dbos_workflow guarded --rerun\nx = fetch(100)\nx\n") == 1000


def test_failed_cell_shows_error_and_rerun(shell: InteractiveShell, capsys: Any) -> None:
    shell.user_ns["fail"] = [True]
    cell = "%%dbos_workflow flaky\nif fail[0]:\n    raise ValueError('upstream 500')\n'ok'\n"
    with pytest.raises(ValueError, match="upstream 500"):
        run(shell, cell)
    # The traceback goes from the magic's line to the cell's own line, without dbos_nb's frames.
    shown = capsys.readouterr().out
    assert "<dbos_workflow flaky>" in shown and "skipping hidden" in shown
    assert "dbos_nb/core" not in shown and "dbos_nb/notebook" not in shown
    shell.user_ns["fail"] = [False]
    capsys.readouterr()
    # Raised again (Run All stops here, as the first time), without running the cell.
    with pytest.raises(ValueError, match="upstream 500"):
        run(shell, cell)
    assert "'flaky' ended ERROR" in capsys.readouterr().out
    assert run(shell, cell.replace("flaky\n", "flaky --rerun\n", 1)) == "ok"


def test_cell_on_a_queue_and_in_background(shell: InteractiveShell) -> None:
    run(shell, STEPS)
    run(shell, "%dbos_queue cellq")
    handle = run(shell, "%%dbos_workflow queued_cell --queue cellq\nq_out = fetch(7)\nq_out\n")
    assert handle.get_result(timeout_sec=10) == 70  # the cell's last value
    bg = run(shell, "%%dbos_workflow bg_cell --background\nbg_out = fetch(8)\n")
    assert bg.get_result(timeout_sec=10) is None  # no last expression
    assert shell.user_ns["bg_out"] == 80  # the names it binds land in the namespace
    with pytest.raises(UsageError, match="not declared"):
        run(shell, "%%dbos_workflow nowhere --queue missing\n1\n")


def test_map_batches_and_dataframes(shell: InteractiveShell) -> None:
    run(shell, STEPS)
    run(shell, "%dbos_queue work --concurrency 3")
    batch = run(shell, "b = work.map(fetch, list(range(12)), batch='tens')\nb")
    assert isinstance(batch, Batch) and len(batch) == 12
    batch.wait(timeout=20)
    assert batch.counts() == {"queued": 0, "running": 0, "done": 12, "failed": 0, "cancelled": 0}
    # Mapping again (a re-run cell) enqueues nothing twice.
    again = run(shell, "work.map(fetch, list(range(12)), batch='tens')")
    assert again.id == "tens" and len(DBOS.list_workflows(queue_name="work")) == 12
    assert sorted(c[1] for c in CALLS) == list(range(12))
    df = batch.to_pandas()
    assert list(df["item"]) == list(range(12))
    assert list(df["output"]) == [i * 10 for i in range(12)]
    assert list(df["input"]) == list(range(12))
    assert str(df["status"].dtype) == "category" and set(df["status"]) == {"SUCCESS"}
    assert str(df["started"].dtype).startswith("datetime64")
    assert (df["duration"] >= pd.Timedelta(0)).all()
    attached = Batch.attach("tens")
    assert attached.results() == [i * 10 for i in range(12)]
    with pytest.raises(UnknownBatchError, match="tens"):
        Batch.attach("no-such-batch")
    with pytest.raises(dbos_nb.BatchConflictError, match="already exists with 12 items"):
        run(shell, "work.map(fetch, [1, 2], batch='tens')")


def test_batch_from_dataframe_expand_retry_and_cancel(shell: InteractiveShell) -> None:
    shell.user_ns["fail_for"] = {3}
    run(
        shell,
        "from dbos_nb import DBOS\n"
        "@DBOS.step()\n"
        "def score(text, weight):\n"
        "    CALLS.append(text)\n"
        "    if weight in fail_for:\n"
        "        raise RuntimeError(f'429 for {text}')\n"
        "    return {'len': len(text), 'w': weight}\n",
    )
    run(shell, "%dbos_queue scoring --concurrency 2")
    frame = pd.DataFrame({"text": ["a", "bb", "ccc", "dddd"], "weight": [1, 2, 3, 4]})
    shell.user_ns["frame"] = frame
    batch = run(shell, "scoring.map(score, frame, batch='df')")
    batch.wait(timeout=20)
    assert batch.counts()["failed"] == 1
    progress = batch.progress()
    assert progress.recent_errors and "429 for ccc" in progress.recent_errors[0][1]
    wide = batch.to_pandas(expand=True)
    assert list(wide.columns[:4]) == ["item", "workflow_id", "status", "input"]
    assert list(wide["len"].iloc[[0, 1, 3]]) == [1, 2, 4]
    assert wide["error"].iloc[2].startswith("RuntimeError: 429 for ccc")
    shell.user_ns["fail_for"].clear()
    assert batch.retry_failed() == 1
    batch.wait(timeout=20)
    assert batch.counts()["done"] == 4
    assert CALLS.count("a") == 1 and CALLS.count("ccc") == 2  # only the failed item re-ran
    gate = threading.Event()
    shell.user_ns["gate"] = gate
    run(shell, "@DBOS.step()\ndef slow(x):\n    gate.wait(10)\n    return x\n")
    run(shell, "%dbos_queue single --concurrency 1")
    slow_batch = run(shell, "single.map(slow, list(range(5)), batch='slow')")
    assert slow_batch.cancel() >= 4
    gate.set()
    slow_batch.wait(timeout=20)
    assert slow_batch.counts()["cancelled"] >= 4


def test_progress_views_and_status_magics(shell: InteractiveShell) -> None:
    run(shell, STEPS)
    run(shell, "%dbos_queue viewq --limit 100/1m")
    batch = run(shell, "viewq.map(fetch, [1, 2, 3], batch='view')")
    batch.wait(timeout=20)
    p = batch.progress()
    assert p.complete and p.finished == 3 and p.rate_limit == 100 and p.rate_used == 3
    assert "3/3 finished" in progress_text(p) and "###" in progress_text(p)
    assert "batch view" in progress_html(p) and "rate limit: 3/100" in progress_html(p)
    assert "3/3 finished" in repr(batch)
    assert not widgets_available()  # a plain shell, not a kernel
    assert "3 done" in repr(Snapshot(p))
    frame = run(shell, "%dbos_status viewq")
    assert isinstance(frame, pd.DataFrame) and len(frame) == 3
    frame_all = dbos_nb.workflows_frame(queue_name="viewq")
    assert list(frame_all["status"]) == ["SUCCESS"] * 3
    with pytest.raises(UsageError, match="no workflow 'nope'"):
        run(shell, "%dbos_cancel nope")


def test_redefining_cells_while_work_is_queued(shell: InteractiveShell) -> None:
    """Re-running definition cells never raises; work enqueued before runs the version it was
    enqueued with, work enqueued after runs the new one."""
    gate = threading.Event()
    shell.user_ns["gate"] = gate
    run(shell, "%dbos_queue serial --concurrency 1")
    definition = (
        "from dbos_nb import DBOS\n"
        "@DBOS.step()\n"
        "def blocker():\n"
        "    gate.wait(10)\n"
        "@DBOS.step()\n"
        "def version(x):\n"
        "    return ('{v}', x)\n"
    )
    run(shell, definition.format(v="v1"))
    run(shell, "%dbos_queue serial --concurrency 1")  # declared again: harmless
    first = run(shell, "serial.enqueue(blocker)")
    old_work = run(shell, "serial.enqueue(version, 1)")
    run(shell, definition.format(v="v2"))  # the cell is edited and run again
    new_work = run(shell, "serial.enqueue(version, 2)")
    gate.set()
    first.get_result(timeout_sec=10)
    assert old_work.get_result(timeout_sec=10) == ("v1", 1)
    assert new_work.get_result(timeout_sec=10) == ("v2", 2)
    versions = {s.workflow_id: s for s in DBOS.list_workflows(queue_name="serial")}
    assert len({versions[h.workflow_id].output for h in (old_work, new_work)}) == 2


def test_live_view_and_frames_while_running(shell: InteractiveShell) -> None:
    from dbos_nb.notebook.views import LiveView

    gate = threading.Event()
    shell.user_ns["gate"] = gate
    run(
        shell,
        "from dbos_nb import DBOS\n@DBOS.step()\ndef held(x):\n    gate.wait(10)\n    return x\n",
    )
    run(shell, "%dbos_queue liveq --concurrency 2")
    batch = run(shell, "liveq.map(held, list(range(6)), batch='live')")
    time.sleep(0.3)
    frame = batch.to_pandas()  # while the batch runs
    assert len(frame) == 6 and set(frame["status"].astype(str)) <= {"ENQUEUED", "PENDING"}
    assert frame["output"].isna().all()
    view = LiveView(batch)
    view.start()
    assert view.bar.value == 0.0 and "0/6 finished" in view.title.value
    gate.set()
    batch.wait(timeout=20, show=False)
    view._thread.join(5)  # the view's thread ends by itself once the batch is complete
    assert not view._thread.is_alive()
    assert view.bar.value == 1.0 and view.bar.bar_style == "success"
    assert "6/6 finished" in view.title.value and "6</b> done" in view.counts.value


def test_workers_magic_lists_executors(shell: InteractiveShell) -> None:
    table = run(shell, "%dbos_workers")
    assert list(table["executor"]) == [DBOS.executor_id]
    assert bool(table["this_kernel"].iloc[0]) and table["heartbeat_age_s"].iloc[0] < 5
    with pytest.raises(UsageError, match="number of workers"):
        run(shell, "%dbos_workers many")
