"""Detached worker processes started from a notebook (`%dbos_workers`).

Workers run in their own session (`start_new_session`), so they outlive the kernel. Their process
ids are kept in a small JSON file beside the notebook's database, so that a restarted kernel can
still list and stop the workers its notebook started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbos_nb.core.runtime import Runtime
from dbos_nb.models import DATABASE_URL_ENV
from dbos_nb.processes import pid_alive


def state_dir(rt: Runtime) -> Path:
    folder = Path(os.environ.get("DBOS_NB_DIR") or ".dbos_nb").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _state_file(rt: Runtime) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in rt.executor_id)
    return state_dir(rt) / f"{safe}.workers.json"


def _load(rt: Runtime) -> list[dict[str, Any]]:
    path = _state_file(rt)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [w for w in data if isinstance(w, dict) and "pid" in w]


def live_workers(rt: Runtime) -> list[dict[str, Any]]:
    """The workers this notebook started whose process is alive (registered in the database
    yet or not: one just started takes a moment to)."""
    return [w for w in _load(rt) if pid_alive(int(w["pid"]))]


def _save(rt: Runtime, workers: list[dict[str, Any]]) -> None:
    # Whole or not at all: the progress view's thread may read it meanwhile.
    target = _state_file(rt)
    partial = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    partial.write_text(json.dumps(workers, indent=1))
    os.replace(partial, target)


def start_workers(
    rt: Runtime, count: int, queues: list[str], concurrency: int | None
) -> list[dict[str, Any]]:
    """Start `count` detached workers on this notebook's database."""
    known = live_workers(rt)
    started = []
    for _ in range(count):
        executor = f"{rt.executor_id}/worker-{uuid.uuid4().hex[:6]}"
        # The URL goes in the environment, where `ps` does not show its password.
        cmd = [sys.executable, "-m", "dbos_nb.cli", "worker", "--executor-id", executor]
        for queue in queues:
            cmd += ["--queue", queue]
        if concurrency is not None:
            cmd += ["--concurrency", str(concurrency)]
        log_path = state_dir(rt) / f"{executor.replace('/', '_').replace(':', '_')}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=os.getcwd(),
                env=worker_environment(rt.db.url),
            )
        entry = {
            "pid": proc.pid,
            "executor_id": executor,
            "log": str(log_path),
            "started_at": time.time(),
        }
        started.append(entry)
    _save(rt, known + started)
    return started


def worker_environment(url: str) -> dict[str, str]:
    """A worker's environment: this one, the database URL, and this kernel's import path
    (a module the notebook imports from a folder it added, `sys.path.insert(0, "src")`, is
    what the worker must import to run the notebook's functions)."""
    env = dict(os.environ)
    env[DATABASE_URL_ENV] = url
    paths = kernel_import_path()
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def kernel_import_path() -> list[str]:
    """The folders on this kernel's import path that a new interpreter would not have (the
    notebook's folder, folders the notebook added), made absolute; not the interpreter's own
    (its standard library and installed packages come first in the worker as they should)."""
    own = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    found: list[str] = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        inside_own = any(path == p or path.startswith(p + os.sep) for p in own)
        if os.path.isdir(path) and not inside_own and path not in found:
            found.append(path)
    return found


def stop_workers(
    rt: Runtime, timeout: float = 30.0, announce: Callable[[int], None] | None = None
) -> list[int]:
    """SIGTERM the workers this notebook started and wait for them to exit; `announce` is told
    how many there are before the wait."""
    workers = [w for w in _load(rt) if pid_alive(int(w["pid"]))]
    if announce is not None and workers:
        announce(len(workers))
    for w in workers:
        os.kill(int(w["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for w in workers:
        while pid_alive(int(w["pid"])) and time.monotonic() < deadline:
            _reap(int(w["pid"]))
            time.sleep(0.05)
    _save(rt, [])
    return [int(w["pid"]) for w in workers]


def _reap(pid: int) -> None:
    # Workers started by this kernel are its children until they exit: collect them.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def executors_table(rt: Runtime) -> Any:
    """Live executors with heartbeat age, how much they run, and which this notebook started."""
    import pandas as pd

    mine = {w["executor_id"]: w for w in _load(rt)}
    now = rt.now_ms()
    rows = []
    for r in rt.store.list_executors():
        counts = rt.store.count_by_executor(r["executor_id"])
        rows.append(
            {
                "executor": r["executor_id"],
                "host": r["hostname"],
                "pid": r["pid"],
                "heartbeat_age_s": round((now - int(r["heartbeat_at"])) / 1000, 1),
                "running": counts.get("PENDING", 0),
                "done": counts.get("SUCCESS", 0),
                "started_here": r["executor_id"] in mine,
                "this_kernel": r["executor_id"] == rt.executor_id,
            }
        )
    return pd.DataFrame.from_records(rows)
