"""Random identifiers: workflow ids (UUID version 4 strings) and ownership tokens.

An enqueue makes two of them. `uuid.uuid4()` and `os.urandom` ask the kernel for every one (a
system call of about 12 microseconds on a virtual machine; the two came to a fifth of the Python
an enqueue costs), and `uuid.UUID` builds an object only to format it. Here the bits come from a
generator of this module's own, seeded from `os.urandom`: 128 bits per id, so ids never collide
in practice, and nothing secret depends on them (an id is a name, not a credential).

The generator is private so that a notebook's `random.seed(42)`, common before sampling data,
cannot make a later session draw the same ids again: an enqueue under an id that exists is
idempotent and would silently return the old workflow. A forked child reseeds it, so parent and
child never share a sequence (a fork made in C, bypassing Python's fork hooks, would not).
"""

from __future__ import annotations

import os
import random

_rng = random.Random()  # seeded from os.urandom
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork either
    os.register_at_fork(after_in_child=_rng.seed)

_bits = _rng.getrandbits
# The version (4) and variant (RFC 4122, binary 10) fields of a UUID, as integer masks.
_VERSION_VARIANT = (0x4 << 76) | (0x2 << 62)
_CLEAR = ~((0xF << 76) | (0x3 << 62))


def new_workflow_id() -> str:
    """A random UUID (version 4) in its canonical string form, as `str(uuid.uuid4())`."""
    h = f"{(_bits(128) & _CLEAR) | _VERSION_VARIANT:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_token() -> str:
    """128 random bits as 32 hexadecimal digits (ownership tokens of executions and claims)."""
    return f"{_bits(128):032x}"
