"""Whether a process of this machine is alive: how an executor's registration, a detached
worker's record or a schema upgrade tells a dead process from a live one on the same host."""

from __future__ import annotations

import os
import socket


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


def may_still_run(hostname: str, pid: int, silent_ms: int, lease_ms: int) -> bool:
    """Whether the process an executor's registration names may still be running: silent no
    longer than its lease, and not known to be gone (on this host: its pid is dead, or is this
    very process, whose earlier registration it finds)."""
    if silent_ms > lease_ms:
        return False
    if hostname != socket.gethostname():
        return True
    return pid != os.getpid() and pid_alive(pid)
