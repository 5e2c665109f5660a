"""Versions of functions stored by value: what changes them, what does not, what they cost in
memory. No database: the registration's own bookkeeping (`core/versions.py`)."""

from __future__ import annotations

import types
from typing import Any

from dbos_nb.core import versions
from dbos_nb.core.registry import Registration


def _notebook_function(source: str, name: str, namespace: dict[str, Any]) -> Any:
    """Define `name` from `source` as a notebook cell would: in `__main__`'s name."""
    namespace.setdefault("__name__", "__main__")
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace[name]


def _registration(func: Any) -> Registration:
    return Registration(name=func.__name__, kind="step", func=func, wrapper=func)


def test_a_reassigned_value_or_redefined_helper_makes_a_new_version() -> None:
    ns: dict[str, Any] = {"TEMPLATE": "v1 {}"}
    _notebook_function("def helper(x):\n    return x + 1\n", "helper", ns)
    step = _notebook_function(
        "def step(x, k=1):\n    return TEMPLATE.format(helper(x) * k)\n", "step", ns
    )
    reg = _registration(step)
    assert reg.by_value
    first = reg.version
    source, state = first.split(".")
    assert source == reg.source_hash and len(state) == 16
    assert reg.version == first  # nothing changed: the same version, not pickled again
    seen = [first]
    for change in (
        "TEMPLATE = 'v2 {}'",  # a value reassigned
        "def helper(x):\n    return x + 10\n",  # a helper redefined
        "step.__defaults__ = (2,)",  # a default changed
    ):
        exec(change, ns)
        seen.append(reg.version)
    assert len(set(seen)) == 4
    assert all(versions.same_code(v, reg) for v in seen)  # one source all along
    # Changed in place, a value keeps its identity: not noticed (documented).
    ns["TEMPLATE"] = ["v3"]
    before = reg.version
    ns["TEMPLATE"].append("more")
    assert reg.version == before


def test_a_closure_cell_is_followed() -> None:
    ns: dict[str, Any] = {}
    make = _notebook_function(
        "def make(n):\n    def inner(x):\n        return x * n\n    return inner\n", "make", ns
    )
    assert versions.state_of(make(2)).current()
    two, three = _registration(make(2)), _registration(make(3))
    assert two.version != three.version and two.source_hash == three.source_hash


def test_a_stored_payload_is_not_kept_in_memory() -> None:
    ns: dict[str, Any] = {"BIG": b"x" * 100_000}
    step = _notebook_function("def step():\n    return len(BIG)\n", "step", ns)
    reg = _registration(step)
    version, payload = reg.payload()
    assert payload is not None and len(payload) > 100_000
    assert reg._state is not None and reg._state[2] is None  # dropped once handed out
    again_version, again = reg.payload()  # asked again (another database): pickled again
    assert again_version == version and again is not None


def test_functions_of_modules_keep_their_source_version() -> None:
    reg = _registration(versions.same_code)
    assert not reg.by_value and reg.version == reg.source_hash


def test_code_without_source_is_hashed_with_its_constants() -> None:
    def compiled(body: str) -> types.FunctionType:
        ns: dict[str, Any] = {"__name__": "__main__"}
        exec(compile(f"def f(x):\n    return {body}\n", "<no source>", "exec"), ns)
        return ns["f"]  # type: ignore[no-any-return]

    # The same bytecode, other constants: other versions (the bytecode alone was hashed once).
    assert versions.source_digest("step", "f", compiled("x * 2")) != versions.source_digest(
        "step", "f", compiled("x * 3")
    )
    assert versions.source_digest("step", "f", compiled("x * 2")) == versions.source_digest(
        "step", "f", compiled("x * 2")
    )


def test_a_replaced_large_value_is_not_kept_alive() -> None:
    import gc
    import weakref

    class Frame:  # stands for a DataFrame or a model: an object that can be weakly held
        def __init__(self, rows: int) -> None:
            self.rows = rows

    ns: dict[str, Any] = {"big": Frame(1)}
    step = _notebook_function("def step():\n    return big\n", "step", ns)
    reg = _registration(step)
    first = reg.version
    old = weakref.ref(ns["big"])
    ns["big"] = Frame(2)
    gc.collect()
    assert old() is None  # the state held it weakly: freed with the name's rebinding
    assert reg.version != first  # and the change is seen
