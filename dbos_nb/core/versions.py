"""Which version of a function a workflow row records, so that work runs the code it was
enqueued with, wherever it runs.

A function importable from a module is stored by reference: its version is a hash of its source,
and a worker imports the module. A function defined in a notebook (or a script run as
`__main__`) is stored by value: cloudpickle copies its code together with the notebook values
and helper functions it refers to. For those, the version is `<source>.<state>`, the state part
changing when any of that changes, or a worker would keep running the first copy it was given:
a prompt template reassigned in a later cell, a helper redefined. A process that has the same
source registered runs its own definition (`same_code`): a recovering kernel or script uses its
own values (a mode or a key read from its environment), as DBOS would; a worker, which has no
definition of its own, runs the copy made when the work was enqueued. Pickling the function at
every enqueue to find out would cost more than the enqueue, so its state is recorded by
identity (`State`): the code objects, and the objects its global names, closure cells and
defaults refer to (following helpers defined in the notebook, a few levels deep). Reassigning
or redefining anything changes an identity; only then is the function pickled again and a new
version made. The state holds the objects (weakly where it can), not their `id()`s: a freed
object's address can be reused at once by the value that replaced it. A value mutated in place
keeps its identity and is not noticed (documented).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Any

# How far the state follows notebook functions that call notebook functions.
_MAX_DEPTH = 4


def same_code(version: str, reg: Any) -> bool:
    """Whether a recorded version has the code of registration `reg` (the source part of a
    by-value version, `<source>.<state>`, or the whole of a by-reference one)."""
    source: str = reg.source_hash
    return version.split(".", 1)[0] == source


def source_digest(kind: str, name: str, func: Any) -> str:
    """A hash of the function's source; of its compiled code where there is no source (code
    compiled from a string that linecache does not hold)."""
    try:
        text = inspect.getsource(func)
    except (OSError, TypeError):
        code = getattr(func, "__code__", None)
        text = code_digest(code) if code is not None else name
    # A durable notebook cell runs through one generic body: the cell's own source is its code.
    # With it in the version, a run of an edited cell's earlier code is not "the same code" as
    # the body registered now, and stays queued until that code is registered again.
    cell_source = cell_source_hash(func)
    if cell_source is not None:
        text += cell_source
    return hashlib.sha256(f"{kind}:{name}:{text}".encode()).hexdigest()[:16]


# Where a durable notebook cell's body carries the hash of the cell's source.
CELL_SOURCE_ATTR = "__dbos_nb_source_hash__"


def cell_source_hash(func: Any) -> str | None:
    """The source hash of the notebook cell a function runs (None if it is not a cell's body)."""
    value = getattr(func, CELL_SOURCE_ATTR, None)
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=4096)
def code_digest(code: types.CodeType) -> str:
    """A hash of everything a code object does: bytecode, constants (nested code objects
    included), names and arguments; the same in every process (sets of constants sorted)."""
    digest = hashlib.sha256()
    for part in (code.co_code, code.co_name, code.co_names, code.co_varnames):
        digest.update(repr(part).encode())
    digest.update(repr((code.co_freevars, code.co_cellvars, code.co_argcount)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            digest.update(code_digest(const).encode())
        elif isinstance(const, frozenset):
            digest.update(repr(sorted(repr(c) for c in const)).encode())
        else:
            digest.update(repr(const).encode())
    return digest.hexdigest()


def pickled_by_value(func: Any) -> bool:
    """Whether cloudpickle copies the function rather than naming it: defined in `__main__`
    (a notebook, a script) or in a module that cannot be imported by its name."""
    module = getattr(func, "__module__", None)
    return module is None or module == "__main__" or module not in sys.modules


# id(code) -> (code, its global names). By identity: hashing a code object hashes all of it,
# which would cost more than the state check that asks. The entry keeps its code alive, so
# the id is not reused while the entry stands; the cache is cleared when it grows past a
# bound (notebook cells make new code objects as they are run again).
_names_cache: dict[int, tuple[types.CodeType, tuple[str, ...]]] = {}


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The global names a code object and the code nested in it can refer to."""
    entry = _names_cache.get(id(code))
    if entry is not None and entry[0] is code:
        return entry[1]
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    found = tuple(sorted(names))
    if len(_names_cache) > 10_000:
        _names_cache.clear()
    _names_cache[id(code)] = (code, found)
    return found


@dataclass(frozen=True)
class State:
    """What pickling a function by value would copy, as found at one moment (see the module
    docstring): each global name looked up with the object it named, each closure cell with
    its contents, each function followed with its code and defaults. `current()` checks them
    all again with plain identity tests, cheap enough for every enqueue."""

    names: tuple[tuple[dict[str, Any], str, Any], ...]
    cells: tuple[tuple[Any, Any], ...]
    functions: tuple[tuple[Any, Any, Any, Any], ...]

    def current(self) -> bool:
        """Whether every name, cell and function still holds the same object."""
        weak = _Weak
        for namespace, name, held in self.names:
            value = namespace.get(name, _MISSING)
            # Inline (this runs at every enqueue): a strong hold, or a weak one.
            if held is not value and (type(held) is not weak or held.ref() is not value):
                return False
        for cell, held in self.cells:
            if not _same(held, _contents(cell)):
                return False
        for f, code, defaults, kwdefaults in self.functions:
            if (
                f.__code__ is not code
                or f.__defaults__ is not defaults
                or f.__kwdefaults__ is not kwdefaults
            ):
                return False
        return True


def state_of(func: Any) -> State:
    """The state of `func` now, following the notebook functions it refers to."""
    names: list[tuple[dict[str, Any], str, Any]] = []
    cells: list[tuple[Any, Any]] = []
    functions: list[tuple[Any, Any, Any, Any]] = []
    seen: set[int] = set()

    def visit(f: Any, depth: int) -> None:
        if id(f) in seen or depth > _MAX_DEPTH:
            return
        seen.add(id(f))
        functions.append((f, f.__code__, f.__defaults__, f.__kwdefaults__))
        namespace = f.__globals__
        for name in _global_names(f.__code__):
            value = namespace.get(name, _MISSING)
            names.append((namespace, name, _hold(value)))
            follow(value, depth)
        for cell in f.__closure__ or ():
            contents = _contents(cell)
            cells.append((cell, _hold(contents)))
            follow(contents, depth)

    def follow(value: Any, depth: int) -> None:
        # A notebook function, or one decorated (functools.wraps names it `__wrapped__`).
        if type(value) is not types.FunctionType:
            return
        attributes = value.__dict__
        inner = attributes.get("__wrapped__")
        if type(inner) is types.FunctionType and pickled_by_value(inner):
            visit(inner, depth + 1)
        # dbos_nb's own decorator: its wrapper's code is the library's, the same for all.
        if _REGISTERED not in attributes and pickled_by_value(value):
            visit(value, depth + 1)

    if type(func) is types.FunctionType:
        visit(func, 0)
    return State(tuple(names), tuple(cells), tuple(functions))


class _Weak:
    """A value held weakly: a large frame or model replaced in the notebook is freed at once,
    not kept until the function's state is next checked. A dead reference means the name
    holds something else now (the object it held is gone), which is a change."""

    __slots__ = ("ref",)

    def __init__(self, ref: weakref.ref[Any]) -> None:
        self.ref = ref


def _hold(value: Any) -> Any:
    """`value` as the state keeps it: weakly where it can be (most objects), else itself
    (ints, strings, tuples, lists, dicts: objects of builtin types, which cannot be)."""
    try:
        return _Weak(weakref.ref(value))
    except TypeError:
        return value


def _same(held: Any, value: Any) -> bool:
    if type(held) is _Weak:
        return held.ref() is value
    return held is value


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return _MISSING


_MISSING = object()
# The attribute dbos_nb's decorators set on their wrapper (see `registry.registration_of`).
_REGISTERED = "__dbos_nb_registration__"
