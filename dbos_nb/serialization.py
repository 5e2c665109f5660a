"""Serialization of workflow inputs, step outputs and errors (cloudpickle into bytes).

cloudpickle is used rather than pickle because functions and classes defined in a notebook live in
`__main__`, which plain pickle can only store by reference; cloudpickle stores them by value.

Arguments are checked one by one when a workflow starts so that the error names the offending
argument, and nothing is written to the database before every argument has been serialized.
"""

from __future__ import annotations

import contextlib
import pickle
from typing import Any

import cloudpickle

from dbos_nb.errors import DBOSNonSerializableError, DBOSRecordedError

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _fast_dumps(value: Any) -> bytes | None:
    """Plain pickle, when its output is as portable as cloudpickle's would be.

    Plain pickle is several times faster but stores classes and functions by reference. That is
    only a problem for objects of `__main__` (a notebook or script), which another process cannot
    import; those payloads, and whatever plain pickle refuses, go through cloudpickle.
    """
    try:
        data = pickle.dumps(value, protocol=_PROTOCOL)
    except Exception:
        return None
    return None if b"__main__" in data else data


# Outputs up to this size are loaded back once when recorded (see `dumps`).
_CHECKED_BYTES = 1 << 20


def dumps(value: Any) -> bytes:
    """Serialize a value (a step's or workflow's output); raises `DBOSNonSerializableError`
    when it cannot be, or when it could not be loaded back.

    A recorded output is read back on replay (recovery, resume, fork), often in another process:
    one that pickles but does not load (an exception class with its own `__init__`, returned as
    a value) would make every replay fail long after the step ran. So an output is loaded back
    once here, where that costs a microsecond or two; past `_CHECKED_BYTES` (a large array or
    frame, whose loading costs as much as its pickling and which such classes hardly are) it
    is not."""
    data = _fast_dumps(value)
    if data is None:
        try:
            data = bytes(cloudpickle.dumps(value, protocol=_PROTOCOL))
        except Exception as exc:
            raise DBOSNonSerializableError(
                f"value of type {type(value).__name__} cannot be serialized: {exc}"
            ) from exc
    if len(data) <= _CHECKED_BYTES:
        try:
            pickle.loads(data)
        except Exception as exc:
            raise DBOSNonSerializableError(
                f"value of type {type(value).__name__} is serialized but cannot be loaded back "
                f"({type(exc).__name__}: {exc}); a replay could not read it. Return plain data "
                "instead (an exception's message, say), or give the class a __reduce__"
            ) from exc
    return data


def loads(data: bytes | None) -> Any:
    """Deserialize bytes produced by `dumps` (None stays None)."""
    if data is None:
        return None
    return pickle.loads(data)


def dump_many_inputs(
    func_name: str, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
) -> list[bytes]:
    """`dump_inputs` of each call: the same bytes, in a loop without per-item calls (an
    `enqueue_many` of 100,000 items spends a good part of its time here)."""
    fast = pickle.dumps
    out: list[bytes] = []
    # One payload dict, refilled: pickle's output depends on the content only.
    payload: dict[str, Any] = {"args": (), "kwargs": {}}
    for args, kwargs in calls:
        payload["args"] = args
        payload["kwargs"] = kwargs
        try:
            data: bytes | None = fast(payload, _PROTOCOL)
        except Exception:
            data = None
        if data is None or b"__main__" in data:
            data = dump_inputs(func_name, args, kwargs)
        out.append(data)
    return out


def dump_inputs(func_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Serialize a call's arguments, naming the first argument that cannot be serialized."""
    payload = {"args": args, "kwargs": kwargs}
    fast = _fast_dumps(payload)
    if fast is not None:
        return fast
    try:
        return bytes(cloudpickle.dumps(payload, protocol=_PROTOCOL))
    except Exception as whole_error:
        for position, value in enumerate(args):
            _check_one(func_name, f"positional argument {position}", value)
        for key, value in kwargs.items():
            _check_one(func_name, f"argument {key!r}", value)
        raise DBOSNonSerializableError(
            f"the arguments of {func_name!r} cannot be serialized: {whole_error}"
        ) from whole_error


def _check_one(func_name: str, label: str, value: Any) -> None:
    try:
        cloudpickle.dumps(value, protocol=_PROTOCOL)
    except Exception as exc:
        raise DBOSNonSerializableError(
            f"{label} of {func_name!r} (a {type(value).__name__}) cannot be serialized, "
            f"so the workflow was not started: {exc}"
        ) from exc


def load_inputs(data: bytes | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The (args, kwargs) pair stored by `dump_inputs`."""
    if data is None:
        return (), {}
    value = pickle.loads(data)
    return tuple(value["args"]), dict(value["kwargs"])


def dump_error(error: BaseException) -> bytes:
    """Serialize an exception; one that cannot round-trip is stored as a `DBOSRecordedError`."""
    return dump_error_as_stored(error)[0]


def dump_error_as_stored(error: BaseException) -> tuple[bytes, BaseException]:
    """`dump_error`, and the exception as a replay will read it back: `error` itself, or
    the `DBOSRecordedError` stored in its place."""
    try:
        data = bytes(cloudpickle.dumps(error, protocol=_PROTOCOL))
        pickle.loads(data)
        return data, error
    except Exception:
        stand_in = DBOSRecordedError(type(error).__qualname__, str(error))
        return bytes(cloudpickle.dumps(stand_in, protocol=_PROTOCOL)), stand_in


def load_error(data: bytes | None) -> BaseException | None:
    """Deserialize an exception stored by `dump_error`."""
    if data is None:
        return None
    try:
        value = pickle.loads(data)
    except Exception as exc:
        return DBOSRecordedError("UnreadableError", f"the recorded error cannot be loaded: {exc}")
    if isinstance(value, BaseException):
        return mark_recorded(value)
    return DBOSRecordedError(type(value).__name__, repr(value))


def error_text(error: BaseException) -> str:
    """An error as people read it, `Type: message`; a stand-in for one that could not be
    stored or read back (`DBOSRecordedError`) under the type it stands for."""
    if isinstance(error, DBOSRecordedError):
        return f"{error.type_name}: {error.message}"
    return f"{type(error).__name__}: {error}"


_RECORDED = "_dbos_nb_recorded"


def mark_recorded(error: BaseException) -> BaseException:
    """Mark an error as a recorded outcome (a step's, a child workflow's): raised again in a
    workflow, it is the workflow's own failure, even when it tells of a lost database
    connection (the step's own database, say), never one of dbos_nb's checkpoints."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(error, _RECORDED, True)
    return error


def is_recorded(error: BaseException) -> bool:
    return bool(getattr(error, _RECORDED, False))
