"""A throwaway PostgreSQL server for tests, CI and benchmarks.

Uses the machine's `initdb`/`pg_ctl` (Debian's PostgreSQL). The server refuses to run as root, so
when we are root it runs as the `postgres` user through `runuser`. It listens on a free loopback
port only.

    python tests/pgserver.py start DIR [--durable]   # prints the URL
    python tests/pgserver.py stop DIR
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


def _find(binary: str) -> str:
    found = shutil.which(binary)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{binary}"), reverse=True)
    if candidates:
        return candidates[0]
    raise RuntimeError(
        f"{binary} not found: install the PostgreSQL server (Debian: apt-get install postgresql)"
    )


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgServer:
    directory: str
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        stop(self.directory)


def start(directory: str | None = None, *, durable: bool = False) -> PgServer:
    """Create a cluster in `directory` (a new temp dir by default) and start it."""
    directory = directory or tempfile.mkdtemp(prefix="dbos_nb_pg_")
    os.makedirs(directory, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
        os.chmod(directory, 0o700)
    data = os.path.join(directory, "data")
    subprocess.run(
        _as_server_user(
            [
                _find("initdb"),
                "-D",
                data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    port = _free_port()
    settings = [
        "-p",
        str(port),
        "-k",
        directory,
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "max_connections=400",
        "-c",
        "shared_buffers=128MB",
    ]
    if not durable:
        # A test server's data is thrown away: skip the disk flushes that only guard against
        # power loss. Benchmarks pass durable=True to measure with the defaults.
        settings += [
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
    subprocess.run(
        _as_server_user(
            [
                _find("pg_ctl"),
                "-D",
                data,
                "-o",
                " ".join(settings),
                "-l",
                os.path.join(directory, "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with open(os.path.join(directory, "port"), "w") as f:
        f.write(str(port))
    _wait_ready(port)
    return PgServer(directory, port)


def _wait_ready(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL did not accept connections on port {port}")


def stop(directory: str) -> None:
    """Stop the server started in `directory` and delete its files."""
    data = os.path.join(directory, "data")
    if os.path.isdir(data):
        subprocess.run(
            _as_server_user([_find("pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"]),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "start":
        server = start(argv[1], durable="--durable" in argv)
        print(server.url)
        return 0
    if len(argv) == 2 and argv[0] == "stop":
        stop(argv[1])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
