"""The registry of decorated functions, by stable name.

Decorators register at import (or cell-execution) time, before or after DBOS is created, so the
registry lives at module level and outlives any one DBOS instance. Re-running a notebook cell
registers the same name again: the new definition replaces the old one. A different module
claiming a name that is already taken is a conflict.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import cloudpickle

from dbos_nb.core import versions
from dbos_nb.core.context import MAX_NAME_LENGTH, check_id_length
from dbos_nb.errors import (
    DBOSConflictingRegistrationError,
    DbosNbError,
    DBOSWorkflowFunctionNotFoundError,
)
from dbos_nb.models import STEP_WORKFLOW_PREFIX

logger = logging.getLogger(__name__)

Kind = Literal["workflow", "step", "transaction"]


@dataclass
class Registration:
    """One decorated function and its options."""

    name: str
    kind: Kind
    func: Callable[..., Any]
    wrapper: Callable[..., Any] = field(repr=False)
    max_recovery_attempts: int = 100
    retries_allowed: bool = False
    max_attempts: int = 3
    interval_seconds: float = 1.0
    backoff_rate: float = 2.0
    # How many 429 answers a step waits out before it fails (they don't use up max_attempts).
    max_rate_limit_retries: int = 20
    isolation_level: str | None = None
    class_name: str | None = None

    @property
    def module(self) -> str:
        return str(getattr(self.func, "__module__", ""))

    # Whether workers may run it: a durable notebook cell needs its kernel's namespace.
    portable: bool = True
    _version: str | None = field(default=None, repr=False)
    # (state, version, payload) as last pickled; see `versions`.
    _state: tuple[versions.State, str, bytes | None] | None = field(default=None, repr=False)

    @functools.cached_property
    def is_async(self) -> bool:
        # Asked at every start of the function's work: `inspect` takes longer than the lookup.
        return inspect.iscoroutinefunction(self.func)

    @property
    def source_hash(self) -> str:
        """A hash of the function's source (of its compiled code where it has none)."""
        if self._version is None:
            self._version = versions.source_digest(self.kind, self.name, self.func)
        return self._version

    @functools.cached_property
    def by_value(self) -> bool:
        """Whether the function is stored by value (see `versions`), so that its version
        follows the notebook values and helpers it refers to."""
        return self.portable and versions.pickled_by_value(self.func)

    @property
    def version(self) -> str:
        """The version work is recorded with: the source hash, and for a function stored by
        value, `.` and a hash of its state as it would be pickled now (see `versions`)."""
        if not self.by_value:
            return self.source_hash
        return self._snapshot(need_payload=False)[0]

    def payload(self) -> tuple[str, bytes | None]:
        """The current version and the decorated function cloudpickled for other processes
        (None if it cannot be), taken together: a payload is stored under its own version."""
        if not self.portable:
            return self.version, None
        if self.by_value:
            version, payload = self._snapshot(need_payload=True)
            # Stored now: the bytes (which hold the notebook values the function uses, a
            # large frame perhaps) need not stay in memory; pickled again if asked again.
            self._state = None if self._state is None else (*self._state[:2], None)
            return version, payload
        return self.source_hash, self._pickle()

    def _snapshot(self, need_payload: bool) -> tuple[str, bytes | None]:
        known = self._state
        if known is not None and known[0].current() and (known[2] is not None or not need_payload):
            return known[1], known[2]
        state = versions.state_of(self.func)
        payload = self._pickle()
        version = self.source_hash
        if payload is not None:
            version += "." + hashlib.sha256(payload).hexdigest()[:16]
        if known is not None and known[0].current() and known[1] != version:
            version = known[1]  # the same state pickled again: the version it was given
        # One assignment: a thread reading meanwhile sees the old snapshot or the new one.
        self._state = (state, version, payload)
        return version, payload

    def __getstate__(self) -> dict[str, Any]:
        # A payload pickles its function's registration: not the last snapshot (it would hold
        # the previous payload, and the objects the state refers to).
        state = dict(self.__dict__)
        state["_state"] = None
        return state

    def _pickle(self) -> bytes | None:
        try:
            return bytes(cloudpickle.dumps(self.wrapper))
        except Exception as exc:
            logger.info("%s %r cannot be stored for workers: %s", self.kind, self.name, exc)
            return None


class Registry:
    """Thread-safe name -> Registration map with a listener for new registrations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, Registration] = {}
        self._listeners: list[Callable[[Registration], None]] = []

    def register(self, reg: Registration) -> None:
        """Register (or re-register) a function under its name; refuses a name that is taken
        by another module's function, or that the database's name columns cannot hold."""
        check_name_length(reg.kind, reg.name)
        with self._lock:
            old = self._by_name.get(reg.name)
            if old is not None and old.func is not reg.func:
                if old.module != reg.module and _file_of(old.func) != _file_of(reg.func):
                    raise DBOSConflictingRegistrationError(
                        f"{reg.kind} name {reg.name!r} is already registered by "
                        f"{old.module}.{old.func.__qualname__}; give one of them another name "
                        "with name=..."
                    )
                logger.debug("re-registering %s %r (definition replaced)", reg.kind, reg.name)
            self._by_name[reg.name] = reg
            listeners = list(self._listeners)
        for listener in listeners:
            listener(reg)

    def get(self, name: str) -> Registration | None:
        with self._lock:
            return self._by_name.get(name)

    def all(self) -> list[Registration]:
        with self._lock:
            return list(self._by_name.values())

    def runnable_names(self) -> set[str]:
        """Workflow names a worker of this process can run (steps/transactions as one-op wfs)."""
        with self._lock:
            names = set()
            for name, reg in self._by_name.items():
                names.add(name if reg.kind == "workflow" else STEP_WORKFLOW_PREFIX + name)
            return names

    def add_listener(self, listener: Callable[[Registration], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Registration], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def clear(self) -> None:
        with self._lock:
            self._by_name.clear()


def check_name_length(kind: str, name: str) -> None:
    """Refuse, at decoration time, a name that the name columns cannot hold (PostgreSQL would
    refuse the first row with a raw DataError, SQLite store it). A step or transaction started
    or enqueued on its own is recorded as a workflow named STEP_WORKFLOW_PREFIX + its name, so
    its name has that much less room."""
    limit = MAX_NAME_LENGTH if kind == "workflow" else MAX_NAME_LENGTH - len(STEP_WORKFLOW_PREFIX)
    check_id_length(name, f"a {kind} name", limit=limit)


def _file_of(func: Callable[..., Any]) -> str | None:
    try:
        return inspect.getsourcefile(func)
    except TypeError:
        return None


def registration_of(func: Any) -> Registration | None:
    """The registration a decorated function carries, if any."""
    reg = getattr(func, "__dbos_nb_registration__", None)
    return reg if isinstance(reg, Registration) else None


def resolve(func: Any, args: tuple[Any, ...]) -> tuple[Registration, tuple[Any, ...]]:
    """The registration of a decorated function or bound method, and the call's positional
    arguments (a bound method's instance or class becomes the first one).

    Raises DBOSWorkflowFunctionNotFoundError, naming the function, for anything that was not
    decorated.
    """
    reg = registration_of(func)
    if reg is None:
        raise DBOSWorkflowFunctionNotFoundError(
            f"{getattr(func, '__qualname__', func)!r} is not a DBOS workflow, step or "
            "transaction; decorate it with @DBOS.workflow(), @DBOS.step() or "
            "@DBOS.transaction() first"
        )
    if inspect.ismethod(func):
        return reg, (func.__self__, *args)
    return reg, args


REGISTRY = Registry()


def check_calls(reg: Registration, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
    """Refuse, before anything is written, calls that do not fit the function's parameters
    (`map(add, [(1, 2)])` for `add(a, b)` would enqueue a batch whose every item fails). Each
    shape of call (number of arguments, keyword names) is checked once: a large batch of
    alike items costs one check."""
    try:
        signature = inspect.signature(reg.func)
    except (TypeError, ValueError):  # a callable without one (a builtin): nothing to check
        return
    seen: set[tuple[int, frozenset[str]]] = set()
    for index, (args, kwargs) in enumerate(calls):
        shape = (len(args), frozenset(kwargs))
        if shape in seen:
            continue
        seen.add(shape)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            params = ", ".join(signature.parameters)
            raise DbosNbError(
                f"item {index} does not fit the parameters of {reg.name}({params}): {exc}; "
                "nothing was enqueued"
            ) from None
