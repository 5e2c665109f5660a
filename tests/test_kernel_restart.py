"""A real Jupyter kernel killed in the middle of a batch and of a durable cell, then restarted.

The kernel runs the notebook's cells through jupyter_client. The test watches the database from
outside, kills the kernel with `restart_kernel(now=True)` once part of the work is done, runs the
same cells in the new kernel, and checks from a log written outside the database that no step
whose checkpoint was committed ran again.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from jupyter_client.manager import KernelManager, start_new_kernel

from dbos_nb.storage.database import normalize_url
from dbos_nb.storage.schema import PG_SCHEMA, batch_key


class Kernel:
    """A kernel and a blocking client, with a helper that fails on errors."""

    def __init__(self) -> None:
        self.km: KernelManager
        self.km, self.kc = start_new_kernel(kernel_name="python3", startup_timeout=60)

    def run(self, code: str, timeout: float = 120) -> str:
        out: list[str] = []
        errors: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            kind = msg["msg_type"]
            if kind == "stream" and msg["content"]["name"] == "stdout":
                out.append(msg["content"]["text"])
            elif kind == "stream":
                errors.append(msg["content"]["text"])
            elif kind == "error":
                errors.append("\n".join(msg["content"]["traceback"]))

        reply = self.kc.execute_interactive(code, output_hook=hook, timeout=timeout)
        if reply["content"]["status"] != "ok":
            raise AssertionError(f"cell failed:\n{code}\n{''.join(errors)}")
        self.stderr = "".join(errors)
        return "".join(out)

    def restart_now(self) -> None:
        # Kills the kernel process without any cleanup, like a crash, and starts a new one.
        self.kc.stop_channels()
        self.km.restart_kernel(now=True)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    k = Kernel()
    yield k
    k.shutdown()


def _query(url: str, sql: str) -> list[Any]:
    engine = sa.create_engine(normalize_url(url))
    prefix = f"{PG_SCHEMA}." if url.startswith("postgres") else ""
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql.replace("{s}", prefix))).all())
    except sa.exc.OperationalError:
        return []  # not created yet
    finally:
        engine.dispose()


def _wait_for(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _setup_cells(url: str, log: Path) -> list[str]:
    return [
        "%load_ext dbos_nb",
        f"%dbos_launch --db {url} --name restart_test",
        "%dbos_queue work --concurrency 3 --limit 40/1s",
        f"""
import time
from dbos_nb import DBOS
LOG = {str(log)!r}

@DBOS.step()
def work_item(i):
    with open(LOG, "a") as f:
        f.write(f"start {{i}}\\n")
    time.sleep(0.05)
    return i * i
""",
    ]


def test_batch_survives_a_kernel_restart(kernel: Kernel, db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "effects.log"
    cells = _setup_cells(db_url, log)
    for cell in cells:
        kernel.run(cell)
    kernel.run("b = work.map(work_item, list(range(40)), batch='restart-batch')")
    done_sql = (
        "SELECT COUNT(*) FROM {s}workflow_status "
        f"WHERE batch_key={batch_key('restart-batch')} AND status='SUCCESS'"
    )
    _wait_for(lambda: _query(db_url, done_sql)[0][0] >= 8)
    kernel.restart_now()
    checkpointed = {
        int(r[0].rsplit("/", 1)[1])
        for r in _query(db_url, "SELECT workflow_uuid FROM {s}operation_outputs")
        if r[0].startswith("restart-batch/")
    }
    assert 8 <= len(checkpointed) < 40, "the kernel should die in the middle of the batch"
    starts_at_kill = Counter(log.read_text().split("\n"))

    # The new kernel runs the notebook's cells again, then collects the batch.
    for cell in cells:
        kernel.run(cell)
    kernel.run("b = work.map(work_item, list(range(40)), batch='restart-batch')")
    out = kernel.run(
        "import json\n"
        "df = b.wait(timeout=60, show=False).to_pandas()\n"
        "print(json.dumps({'items': df['item'].tolist(),"
        " 'status': df['status'].astype(str).tolist(), 'output': df['output'].tolist()}))"
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["items"] == list(range(40))
    assert result["status"] == ["SUCCESS"] * 40
    assert result["output"] == [i * i for i in range(40)]
    starts = Counter(int(line.split()[1]) for line in log.read_text().splitlines())
    for item in range(40):
        if item in checkpointed:
            assert starts[item] == 1, f"item {item} was checkpointed but ran again"
        else:
            assert 1 <= starts[item] <= 2, item  # the attempt the kill interrupted, and one more
    assert starts_at_kill  # the log was written before the kill


def test_durable_cell_resumes_after_a_kernel_restart(
    kernel: Kernel, db_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "effects.log"
    cells = _setup_cells(db_url, log)
    for cell in cells:
        kernel.run(cell)
    durable = (
        "%%dbos_workflow long_cell\n"
        "parts = []\n"
        "for i in range(8):\n"
        "    parts.append(work_item(i))\n"
        "    time.sleep(0.1)\n"
        "sum(parts)\n"
    )
    kernel.kc.execute(durable)  # runs in the kernel while we watch the database
    steps_sql = "SELECT COUNT(*) FROM {s}operation_outputs WHERE workflow_uuid='long_cell'"
    _wait_for(lambda: bool(_query(db_url, steps_sql)) and _query(db_url, steps_sql)[0][0] >= 3)
    kernel.restart_now()
    recorded = _query(db_url, steps_sql)[0][0]
    assert 3 <= recorded < 8

    for cell in cells:
        kernel.run(cell)
    out = kernel.run(durable)  # the same cell, run again by the user
    assert "resuming workflow 'long_cell'" in out
    assert kernel.run("print('parts', parts)").strip() == f"parts {[i * i for i in range(8)]}"
    starts = Counter(int(line.split()[1]) for line in log.read_text().splitlines())
    for i in range(8):
        limit = 1 if i < recorded else 2
        assert 1 <= starts[i] <= limit, (i, starts[i], recorded)
    status = _query(db_url, "SELECT status FROM {s}workflow_status WHERE workflow_uuid='long_cell'")
    assert status[0][0] == "SUCCESS"


def test_detached_workers_keep_going_across_a_kernel_restart(
    kernel: Kernel, db_url: str, tmp_path: Path
) -> None:
    # A module in a folder only the kernel's import path has: the workers find it too.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "far_helpers.py").write_text("def neg(i):\n    return -i\n")
    setup = [
        "%load_ext dbos_nb",
        f"%dbos_launch --db {db_url} --name detached_test --no-worker",
        "%dbos_queue far --concurrency 2",
        f"import sys\nsys.path.insert(0, {str(tmp_path / 'src')!r})\nimport far_helpers",
        "import time\nfrom dbos_nb import DBOS\n"
        "@DBOS.step()\ndef far_work(i):\n    time.sleep(0.1)\n    return far_helpers.neg(i)\n",
    ]
    for cell in setup:
        kernel.run(cell)
    started = kernel.run("%dbos_workers 2")
    pids = [int(p) for p in started.split("pids [", 1)[1].split("]", 1)[0].split(", ")]
    for pid in pids:  # the URL (and a password in it) is not on the command line
        assert db_url not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    try:
        kernel.run("b = far.map(far_work, list(range(30)), batch='detached')")
        done_sql = (
            "SELECT COUNT(*) FROM {s}workflow_status "
            f"WHERE batch_key={batch_key('detached')} AND status='SUCCESS'"
        )
        _wait_for(lambda: bool(_query(db_url, done_sql)) and _query(db_url, done_sql)[0][0] >= 3)
        kernel.restart_now()
        at_restart = _query(db_url, done_sql)[0][0]
        # With no kernel at all the workers go on.
        _wait_for(lambda: _query(db_url, done_sql)[0][0] >= at_restart + 4)
        for cell in setup:
            kernel.run(cell)
        out = kernel.run(
            "from dbos_nb import Batch\n"
            "b = Batch.attach('detached')\n"
            "print(b.progress().total)\n"
            "df = b.wait(timeout=90, show=False).to_pandas()\n"
            "print(df['status'].astype(str).unique().tolist(), df['output'].tolist() == "
            "[-i for i in range(30)], df['executor'].str.contains('worker').all())"
        )
        assert out.split() == ["30", "['SUCCESS']", "True", "True"]
    finally:
        out = kernel.run("%dbos_workers stop")
    assert "stopping 2 worker(s): each ends" in out and "stopped 2 worker(s)" in out
