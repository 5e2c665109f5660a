"""This process's id, without a system call.

`os.getpid()` is one (glibc stopped caching it), and the hot path asks several times per
workflow whether it still runs in the process that opened its connections (a forked child must
open its own). The id is read once and again in every forked child.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork either
    os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """The id of the process running this code."""
    return _pid
