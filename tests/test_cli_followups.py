"""The `dbos-nb` command after a bug hunt: a worker's application database, inspection that
writes nothing (no upgrade, no file or folder created, a read-only file readable), SQLite paths
(`~`, a new database said), unusable files refused by name, failed `--import`s in one line, and
the help texts."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import cli_command, config, start_cli_worker, wait_until
from dbos_nb import DBOS, DBOSClient, Queue
from dbos_nb.cli import main
from dbos_nb.errors import DBOSConfigError
from dbos_nb.storage.database import Database, normalize_url, sqlite_file
from dbos_nb.storage.schema import SCHEMA_VERSION

# The user that runs a command that must not be able to write, when the tests run as root (for
# whom file permissions do not apply).
NOBODY = 65534


def _declare(url: str, *queues: str) -> None:
    """Create the database (with these queues declared), as an application's launch would."""
    DBOS(config=config(url))
    for name in queues:
        Queue(name)
    DBOS.launch()
    DBOS.destroy()


def _sqlite_url(path: Path | str) -> str:
    return f"sqlite:///{path}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stop_worker(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- 1. a worker's application database --------------------------------------------------------


def _table_names(url: str) -> set[str]:
    engine = sa.create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def test_a_worker_runs_transactions_in_the_app_database(
    db_url: str, new_db_url: Any, tmp_path: Path
) -> None:
    """An application with its own application database, and a worker given it with --app-db:
    the worker's `@DBOS.transaction` writes there (it ran them against the system database,
    which failed with "no such table", or wrote to the wrong database)."""
    app_url = new_db_url()
    engine = sa.create_engine(normalize_url(app_url))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE fu_ledger (n INTEGER NOT NULL)"))
    module = f"fu_txmod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from sqlalchemy import text

            from dbos_nb import DBOS, Queue

            Queue("fu_tx")


            @DBOS.transaction(name="fu_record")
            def record(n: int) -> int:
                DBOS.sql_session.execute(text("INSERT INTO fu_ledger (n) VALUES (:n)"), {"n": n})
                return n


            @DBOS.workflow(name="fu_wf")
            def wf(n: int) -> int:
                return record(n) + 1
            """
        )
    )
    proc, log = start_cli_worker(
        "--db", db_url, "--app-db", app_url, "--import", module, "--queue", "fu_tx", cwd=tmp_path
    )
    try:
        assert proc.poll() is None, "".join(log)
        with DBOSClient(db_url) as client:
            handle = client.enqueue({"queue_name": "fu_tx", "workflow_name": "fu_wf"}, 41)

            def finished() -> bool:
                status = client.get_workflow_status(handle.workflow_id)
                done = status is not None and status.status in ("SUCCESS", "ERROR")
                return done or proc.poll() is not None

            wait_until(finished, timeout=60)
            status = client.get_workflow_status(handle.workflow_id)
            assert status is not None and status.status == "SUCCESS", (status, log)
            assert client.get_result(handle.workflow_id) == 42
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT n FROM fu_ledger")).scalars().all() == [41]
        assert "fu_ledger" not in _table_names(db_url)
    finally:
        _stop_worker(proc)
        engine.dispose()


def test_worker_help_documents_app_db_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--app-db URL application database URL" in out
    for default in ("default: 30)", "(default: 5)", "(default: 1)", "(default: 10)"):
        assert default in out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 500)" in out and "(default: sqlite:///dbos_nb_demo.sqlite)" in out


def test_the_command_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "run workers" in out and "demo" in out.splitlines()[2]
    assert "from a terminal" not in out


# -- 2. inspection writes nothing ---------------------------------------------------------------


def _set_version(path: Path, version: int) -> None:
    """Make a database look as an installation of another schema version left it (an older
    one also lacks the columns its successor added)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(
            "UPDATE schema_migrations SET version = ? WHERE version = ?", (version, SCHEMA_VERSION)
        )
        if version < 9:
            conn.execute("DROP INDEX ix_ws_partition_fifo")
            conn.execute("ALTER TABLE workflow_status DROP COLUMN queue_partition_key")
            for column in (
                "partition_concurrency",
                "partition_worker_concurrency",
                "partition_rate_limit",
                "partition_rate_period_ms",
            ):
                conn.execute(f"ALTER TABLE queues DROP COLUMN {column}")
            conn.execute("ALTER TABLE queue_starts DROP COLUMN partition_key")
        if version < 7:
            conn.execute("DROP INDEX ix_ws_batch")
            conn.execute("DROP INDEX ux_batches_key")
            conn.execute("ALTER TABLE workflow_status DROP COLUMN batch_key")
            conn.execute("ALTER TABLE batches DROP COLUMN batch_key")
            conn.execute("ALTER TABLE workflow_status ADD COLUMN batch_id VARCHAR(255)")
        if version < 6:
            conn.execute("DROP TABLE load_failures")
        if version < 5:
            conn.execute("ALTER TABLE workflow_status DROP COLUMN forked_from")
            conn.execute("ALTER TABLE executors DROP COLUMN lease_ms")
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("command", ["status", "workflows"])
@pytest.mark.parametrize(("version", "words"), [(4, "older"), (99, "newer")])
def test_inspection_neither_upgrades_nor_reads_another_schema(
    tmp_path: Path, command: str, version: int, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dbos-nb status` upgraded an older database (after which the installations that made it
    refused it): it is refused, saying who upgrades it, and left as it was."""
    assert SCHEMA_VERSION == 9  # the faked versions below are relative to this one
    path = tmp_path / "system.sqlite"
    _declare(_sqlite_url(path))
    _set_version(path, version)
    before = _digest(path)
    assert main([command, "--db", _sqlite_url(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dbos-nb: ") and err.count("\n") == 1
    assert f"schema version {version}, {words} than this installation's {SCHEMA_VERSION}" in err
    if version < SCHEMA_VERSION:
        assert "dbos-nb worker" in err and "upgrade" in err
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] == version
    finally:
        conn.close()
    assert _digest(path) == before


def test_a_read_only_connection_refuses_writes(db_url: str) -> None:
    """What inspection opens cannot write, on either backend (SQLite `mode=ro`, PostgreSQL
    sessions in read-only transactions)."""
    _declare(db_url)
    db = Database(db_url, read_only=True)
    try:
        with pytest.raises(sa.exc.DBAPIError), db.read() as conn:
            conn.execute(sa.text("CREATE TABLE fu_written (a INTEGER)"))
        with db.read() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        db.dispose()


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder another user can reach (pytest's are private to their user)."""
    folder = Path(tempfile.mkdtemp(prefix="dbos_nb_ro_"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        folder.chmod(0o755)
        for child in folder.iterdir():
            child.chmod(0o644)
        shutil.rmtree(folder)


def _as_a_reader(folder: Path, path: Path, argv: list[str]) -> list[str]:
    """Make `path` and its folder read-only; `argv` as run by a user who cannot write them
    (root ignores permissions: the command then runs as nobody, through `setpriv`, which
    unlike subprocess's own `user=` can still execute this interpreter here)."""
    path.chmod(0o444)
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: no user for whom the file is read-only")
    ids = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    as_nobody = [setpriv, *ids]
    # Nobody must reach this interpreter and this checkout (not so under a private home folder).
    probe = subprocess.run(
        [*as_nobody, sys.executable, "-c", "import dbos_nb"], capture_output=True, cwd=folder
    )
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run {sys.executable} with dbos_nb from here")
    return [*as_nobody, *argv]


def test_inspection_reads_a_database_it_may_not_write(
    shared_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file and folder the user may only read (with no -shm file there: no process has it
    open): `status` and `workflows` failed with "attempt to write a readonly database"."""
    path = shared_folder / "system.sqlite"
    _declare(_sqlite_url(path), "fu_ro_queue")
    before = (_digest(path), sorted(os.listdir(shared_folder)))
    assert before[1] == ["system.sqlite"]
    for command in ("status", "workflows"):
        proc = subprocess.run(
            _as_a_reader(shared_folder, path, cli_command(command, "--db", _sqlite_url(path))),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=shared_folder,
        )
        assert (proc.returncode, proc.stderr) == (0, "")
        if command == "status":
            assert "fu_ro_queue" in proc.stdout
    assert (_digest(path), sorted(os.listdir(shared_folder))) == before


# -- 3. SQLite paths ----------------------------------------------------------------------------


def test_a_tilde_names_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    url = "sqlite:///~/fu_data/system.sqlite"
    assert sqlite_file(url) == str(home / "fu_data" / "system.sqlite")
    _declare(url)
    assert (home / "fu_data" / "system.sqlite").is_file()
    assert os.listdir(cwd) == []  # no folder called `~`


def test_inspection_creates_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`status` on a mistyped path said "no database at ...", after creating its folders."""
    path = tmp_path / "no" / "such" / "dir" / "x.sqlite"
    assert main(["status", "--db", _sqlite_url(path)]) == 2
    assert capsys.readouterr().err == f"dbos-nb: no database at {path}\n"
    assert os.listdir(tmp_path) == []


def test_a_worker_says_it_created_a_new_database(tmp_path: Path) -> None:
    """A worker may be the first process on a database, so it creates it, but says so: a typo'd
    path would otherwise leave it waiting on an empty database."""
    path = tmp_path / "typo.sqlite"
    proc, log = start_cli_worker("--db", _sqlite_url(path))
    try:
        assert proc.poll() is None, "".join(log)
        notices = [line for line in log if "created a new database" in line]
        assert len(notices) == 1, "".join(log)
        assert f"created a new database at {path} " in notices[0]
        assert any("running every queue (no concurrency limit)" in line for line in log)
    finally:
        _stop_worker(proc)
    assert path.is_file()
    # The next worker finds it, and says nothing.
    proc, log = start_cli_worker("--db", _sqlite_url(path))
    try:
        assert proc.poll() is None, "".join(log)
        assert not [line for line in log if "created a new database" in line], "".join(log)
    finally:
        _stop_worker(proc)


# -- 4. unusable files refused by name ---------------------------------------------------------


def _launch(url: str) -> None:
    DBOS(config=config(url))
    DBOS.launch()


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite"
    path.write_text("not a database\n" * 100)
    before = _digest(path)
    with pytest.raises(DBOSConfigError) as info:
        _launch(_sqlite_url(path))
    assert f"cannot use the SQLite database {path}: the file is not a SQLite database" in str(
        info.value
    )
    assert _digest(path) == before
    assert os.listdir(tmp_path) == ["notes.sqlite"]


def test_a_folder_that_cannot_be_made_is_refused(tmp_path: Path) -> None:
    """A file where the database's folder should be (refused to root too)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("in the way\n")
    path = blocker / "sub" / "db.sqlite"
    with pytest.raises(DBOSConfigError) as info:
        _launch(_sqlite_url(path))
    assert str(info.value) == (
        f"cannot create the folder of the SQLite database {path}: {blocker} is a file, not a folder"
    )
    assert blocker.read_text() == "in the way\n"


LAUNCH_SCRIPT = """
import sys
from dbos_nb import DBOS
try:
    DBOS(config={"name": "fu", "system_database_url": sys.argv[1]})
    DBOS.launch()
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_read_only_database_is_refused_by_a_process_that_runs_work(
    shared_folder: Path,
) -> None:
    path = shared_folder / "system.sqlite"
    _declare(_sqlite_url(path))
    before = _digest(path)
    argv = [sys.executable, "-c", LAUNCH_SCRIPT, _sqlite_url(path)]
    proc = subprocess.run(
        _as_a_reader(shared_folder, path, argv),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=shared_folder,
    )
    assert proc.stdout.startswith(
        f"DBOSConfigError cannot use the SQLite database {path}: the file or its folder is "
        "read-only for this user"
    ), proc.stdout + proc.stderr
    assert _digest(path) == before


# -- 5. a failed --import -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "module", "message"),
    [
        (None, "fu_no_such_module", "no module named 'fu_no_such_module'"),
        (None, "fu_no_such_pkg.sub", "no module named 'fu_no_such_pkg'"),
        ("raise RuntimeError('boom')\n", "fu_raises", "importing it raised RuntimeError: boom"),
        ("import fu_missing_dependency\n", "fu_needs", "importing it raised ModuleNotFoundError"),
        # A script that exits on import: said, rather than the worker exiting silently.
        ("import sys\nsys.exit(3)\n", "fu_exits", "importing it called sys.exit(3)"),
    ],
)
def test_a_failed_import_is_one_line(
    tmp_path: Path, source: str | None, module: str, message: str
) -> None:
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    url = _sqlite_url(tmp_path / "system.sqlite")
    argv = ["--db", url, "--import", module]
    proc = subprocess.run(
        cli_command("worker", *argv), capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"dbos-nb: --import {module}: {message}"), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "system.sqlite").exists()  # refused before the launch
    # --verbose adds the traceback.
    proc = subprocess.run(
        cli_command("worker", *argv, "-v"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"dbos-nb: --import {module}: {message}")


# -- 6. workflows --queue ----------------------------------------------------------------------


def test_workflows_refuses_an_unknown_queue(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _declare(db_url, "fu_known")
    assert main(["workflows", "--db", db_url, "--queue", "fu_nosuch"]) == 2
    assert capsys.readouterr().err == (
        "dbos-nb: queue 'fu_nosuch' is not declared in this database; `dbos-nb status` lists "
        "the declared queues\n"
    )
    # A declared queue without workflows is an empty table.
    assert main(["workflows", "--db", db_url, "--queue", "fu_known"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("workflow id")


def test_an_unreachable_application_database_is_named(tmp_path: Path) -> None:
    """The error may come from either database: both are named, rather than the system
    database alone, which was reported as unreachable when it was the application's."""
    url = _sqlite_url(tmp_path / "system.sqlite")
    app = "postgresql://postgres@127.0.0.1:1/appdb"  # nothing listens on port 1
    proc = subprocess.run(
        cli_command("worker", "--db", url, "--app-db", app),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    said = proc.stderr.splitlines()[-1]  # (after the log line of the system schema's creation)
    assert said.startswith(f"dbos-nb: cannot use {url} or the application database {app}: "), said
