"""Default batch names: a canonical, process-independent encoding of a `map()`'s calls.

`queue.map(fn, items)` without `batch=` names the batch after the function and the items, so that
running the cell again (after a kernel restart, say) finds the batch instead of enqueueing, and
paying for, the whole list again. That name must be the same in every process. Pickled bytes are
not: cloudpickle pickles classes defined in the notebook by value (their bytes differ between
kernels), and a set pickles in hash order, which changes with PYTHONHASHSEED. So the name is a
hash of the encoding below, which depends only on the values: sets and dicts are sorted by their
elements' encodings, floats are written exactly (`float.hex`), objects by their class's
module-qualified name and their fields.

Only plain data is encoded: anything else raises a DbosNbError asking for `batch='...'`, since a
name derived from an arbitrary object's identity would not be found again.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import hashlib
import pathlib
import sys
import uuid
from typing import Any

from dbos_nb.errors import DbosNbError

# Values whose repr is exact and stable across processes: written as class name + repr.
_BY_REPR = (
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    uuid.UUID,
    pathlib.PurePath,
    fractions.Fraction,
)
_PANDAS_BY_REPR = {"Timestamp", "Timedelta", "NaTType", "NAType"}
_MAX_DEPTH = 200


class _Unsupported(Exception):
    def __init__(self, value: Any) -> None:
        super().__init__(type(value).__qualname__)
        self.value = value


def _class_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _chunk(tag: bytes, data: bytes) -> bytes:
    return tag + len(data).to_bytes(8, "big") + data


def _text(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _numpy_encoding(value: Any, depth: int) -> bytes | None:
    np = sys.modules.get("numpy")
    if np is None:
        return None
    if isinstance(value, np.generic):
        return _chunk(b"g", _text(value.dtype.str) + encode(value.item(), depth + 1))
    if isinstance(value, np.ndarray):
        head = _text(value.dtype.str) + _text(repr(tuple(value.shape)))
        if value.dtype.hasobject:
            body = b"".join(encode(v, depth + 1) for v in value.ravel(order="C").tolist())
        else:
            body = value.tobytes(order="C")
        return _chunk(b"a", _chunk(b"h", head) + _chunk(b"d", body))
    return None


def _plain(value: tuple[Any, ...] | list[Any] | dict[Any, Any]) -> Any:
    """A container subclass's contents as the plain container."""
    if isinstance(value, tuple):
        return tuple(value)
    if isinstance(value, list):
        return list(value)
    return dict(value)


def encode(value: Any, depth: int = 0) -> bytes:
    """The canonical bytes of a plain-data value (raises _Unsupported for anything else)."""
    if depth > _MAX_DEPTH:
        raise _Unsupported(value)
    # The common items first, by exact type (a map of 100,000 strings or ints).
    kind = type(value)
    if kind is str:
        return _chunk(b"s", _text(value))
    if kind is int:
        return _chunk(b"i", _text(format(value, "x")))  # hex: no digit limit, unlike str()
    if value is None:
        return b"N"
    numpy_bytes = _numpy_encoding(value, depth)  # before int/float: numpy scalars subclass them
    if numpy_bytes is not None:
        return numpy_bytes
    if isinstance(value, enum.Enum):  # before int/str: IntEnum and StrEnum members subclass them
        return _chunk(b"e", _text(_class_name(value)) + b"\0" + _text(value.name))
    if isinstance(value, bool):
        return b"T" if value else b"F"
    if isinstance(value, int):
        return _chunk(b"i", _text(format(int(value), "x")))
    if isinstance(value, float):
        return _chunk(b"f", _text(float(value).hex()))
    if isinstance(value, complex):
        return _chunk(b"c", _text(f"{value.real.hex()},{value.imag.hex()}"))
    if isinstance(value, str):
        return _chunk(b"s", _text(value))
    if isinstance(value, bytes):
        return _chunk(b"b", bytes(value))
    if isinstance(value, bytearray):
        return _chunk(b"y", bytes(value))
    if isinstance(value, tuple | list | dict) and kind not in (tuple, list, dict):
        # A subclass (a namedtuple, OrderedDict, Counter, ...): its class is part of the value.
        inner = encode(_plain(value), depth + 1)
        return _chunk(b"n", _chunk(b"k", _text(_class_name(value))) + inner)
    if isinstance(value, tuple):
        return _chunk(b"t", b"".join(encode(v, depth + 1) for v in value))
    if isinstance(value, list):
        return _chunk(b"l", b"".join(encode(v, depth + 1) for v in value))
    if isinstance(value, dict):
        entries = sorted(
            _chunk(b"p", encode(k, depth + 1) + encode(v, depth + 1)) for k, v in value.items()
        )
        return _chunk(b"d", b"".join(entries))
    if isinstance(value, set | frozenset):
        tag = b"z" if isinstance(value, frozenset) else b"S"
        return _chunk(tag, b"".join(sorted(encode(v, depth + 1) for v in value)))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = b"".join(
            _chunk(b"x", _text(f.name) + b"\0" + encode(getattr(value, f.name), depth + 1))
            for f in dataclasses.fields(value)
        )
        return _chunk(b"o", _chunk(b"k", _text(_class_name(value))) + fields)
    cls = type(value)
    if isinstance(value, _BY_REPR) or (
        cls.__module__.startswith("pandas") and cls.__name__ in _PANDAS_BY_REPR
    ):
        return _chunk(b"r", _text(_class_name(value)) + b"\0" + _text(repr(value)))
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):  # pydantic-style models
        return _chunk(b"m", _chunk(b"k", _text(_class_name(value))) + encode(dump(), depth + 1))
    raise _Unsupported(value)


def _encode_instance(obj: Any) -> bytes:
    """A bound method's instance (or class): plain data, else its class and attributes."""
    if isinstance(obj, type):
        return _chunk(b"K", _text(f"{obj.__module__}.{obj.__qualname__}"))
    try:
        return encode(obj)
    except _Unsupported:
        pass
    state = getattr(obj, "__dict__", None)
    if state is None:
        raise _Unsupported(obj)
    return _chunk(b"I", _chunk(b"k", _text(_class_name(obj))) + encode(dict(state)))


def default_batch_name(
    function_name: str,
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    bound: tuple[Any, ...] = (),
) -> str:
    """`<function>-<12 hex digits>`, the same for the same calls in any process.

    `bound`: the leading arguments every call shares (a bound method's instance).
    Raises DbosNbError, naming the item, when an item is not plain data."""
    digest = hashlib.sha256(_chunk(b"F", _text(function_name)))
    try:
        for obj in bound:
            digest.update(_encode_instance(obj))
    except _Unsupported as exc:
        raise _unnameable(exc.value, "the method's instance") from None
    for index, (args, kwargs) in enumerate(calls):
        try:
            digest.update(encode(tuple(args[len(bound) :])) + encode(dict(kwargs)))
        except _Unsupported as exc:
            raise _unnameable(exc.value, f"item {index}") from None
    short = function_name.rsplit(".", 1)[-1]
    return f"{short}-{digest.hexdigest()[:12]}"


def equal_items(
    left: list[tuple[tuple[Any, ...], dict[str, Any]]],
    right: list[tuple[tuple[Any, ...], dict[str, Any]]],
    skip: int = 0,
) -> bool | None:
    """Whether two lists of calls hold the same plain-data items (arguments after the first
    `skip`, and keywords), by their encodings: the same values however they were pickled (a
    set in another hash order, a notebook's dataclass pickled by value in another kernel).
    None when that cannot be told: an item that is not plain data."""
    if len(left) != len(right):
        return False
    try:
        for (a_args, a_kwargs), (b_args, b_kwargs) in zip(left, right, strict=True):
            if encode(tuple(a_args[skip:])) != encode(tuple(b_args[skip:])):
                return False
            if encode(dict(a_kwargs)) != encode(dict(b_kwargs)):
                return False
    except _Unsupported:
        return None
    return True


def _unnameable(value: Any, where: str) -> DbosNbError:
    return DbosNbError(
        "map() can only name a batch after plain-data items (numbers, strings, lists, dicts, "
        f"dataclasses, ...); {where} holds a {type(value).__qualname__!r} "
        f"({_class_name(value)}). Pass batch='...' so that running the cell again finds the "
        "batch instead of enqueueing it again."
    )
