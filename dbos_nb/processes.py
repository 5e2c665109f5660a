"""Whether a process of this machine is alive: how an executor's registration, a detached
worker's record or a schema upgrade tells a dead process from a live one on the same host."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine is alive (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed child that its parent has not reaped yet still answers signals: a zombie is dead.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
