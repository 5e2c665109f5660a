"""Which code runs a workflow: the exact version it was enqueued with, wherever it runs.

Every registered function is stored in the database under its name and version (see
`Registration.payload` and `versions`). A workflow row records the version it was started with.
To run it, a process uses its own registration when it has the same code (the same source: a
recovering kernel or script runs its own definitions, with its own values, as DBOS does), and
otherwise loads that version from the database (cached by version). So after a notebook
redefines a function, work enqueued before still runs the old code, and a worker that never saw
the notebook runs notebook-defined functions with the values they had when the work was
enqueued.

A version this process cannot load (a module missing on this machine, say) is logged once,
reported to the database (`report`: a notebook waiting on the work reads why there, see
`Batch.wait`), and excluded from this process's claims, so the work stays queued for a process
that can run it.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable

from dbos_nb import serialization
from dbos_nb.core import versions
from dbos_nb.core.registry import Registration, Registry, registration_of
from dbos_nb.models import STEP_WORKFLOW_PREFIX
from dbos_nb.storage.store import SystemStore

logger = logging.getLogger(__name__)

MISSING_RETRY_SEC = 5.0

# Told (name, version, why) when this process finds it cannot load a version, and
# (name, version, None) when a version it could not find loads after all.
FailureReport = Callable[[str, str, str | None], None]

# Why a version without a stored copy cannot run here.
NOT_STORED = "no stored copy: it could not be pickled where it was defined"


class FunctionResolver:
    """Maps (workflow name, version hash) to a runnable Registration for this process."""

    def __init__(
        self,
        store: SystemStore,
        registry: Registry,
        *,
        run_stored: bool,
        report: FailureReport | None = None,
    ) -> None:
        self._store = store
        self._report = report
        self._registry = registry
        # Workers (run_stored=True) claim any stored function; kernels claim what they define.
        self._run_stored = run_stored
        self._lock = threading.Lock()
        self._loaded: dict[str, Registration] = {}
        self._failed: dict[str, str] = {}
        # Versions with no stored copy yet: the defining process may store it in a moment.
        self._missing: dict[str, float] = {}
        self._stored_names: set[str] = set()
        # What this process reports it cannot load, version -> (name, why; None: it can
        # now, to be withdrawn), and the reports not (yet) written. Standing ones are written
        # again when the process registers again (its reports go with its executor row).
        self._reports: dict[str, tuple[str, str | None]] = {}
        self._unwritten: set[str] = set()

    def resolve(self, workflow_name: str, version: str | None) -> Registration | None:
        """The registration to run a workflow row with, or None if this process cannot."""
        base, is_step = _split(workflow_name)
        local = self._registry.get(base)
        if local is not None and (version is None or versions.same_code(version, local)):
            return local if is_step or local.kind == "workflow" else None
        if version is None:
            return None
        with self._lock:
            if version in self._loaded:
                return self._loaded[version]
            if version in self._failed:
                return None
            if (
                time.monotonic() - self._missing.get(version, -MISSING_RETRY_SEC)
                < MISSING_RETRY_SEC
            ):
                return None
        return self._load(base, version)

    def _load(self, name: str, version: str) -> Registration | None:
        payload = self._store.load_function_version(name, version)
        reason = None
        reg = None
        if payload is None:
            with self._lock:
                # (Another thread may have loaded it, stored a moment ago, meanwhile.)
                first = version not in self._missing and version not in self._loaded
                self._missing[version] = time.monotonic()
            if first:
                logger.warning(
                    "cannot load %r version %s here (%s); its work stays queued for a process "
                    "that defines it",
                    name,
                    version,
                    NOT_STORED,
                )
                self._tell(name, version, NOT_STORED)
            return None
        else:
            try:
                reg = registration_of(pickle.loads(payload))
                if reg is None:
                    reason = "the stored object is not a decorated function"
            except Exception as exc:
                reason = serialization.error_text(exc)
        first = was_missing = False
        with self._lock:
            if reg is not None:
                self._loaded[version] = reg
                was_missing = self._missing.pop(version, None) is not None
            else:
                first = version not in self._failed
                self._failed[version] = reason or "unknown"
        if reg is not None:
            if was_missing:
                self._tell(name, version, None)
            return reg
        if first:
            logger.warning(
                "cannot load %r version %s here (%s); its work stays queued for another process",
                name,
                version,
                reason,
            )
            self._tell(name, version, reason or "unknown")
        return None

    def _tell(self, name: str, version: str, reason: str | None) -> None:
        """Report to the database; a failed write is tried again at the next `refresh` (it
        only costs the notebook the explanation for a while, never this process its claims)."""
        with self._lock:
            self._reports[version] = (name, reason)
            self._unwritten.add(version)
        self._write_reports()

    def _write_reports(self) -> None:
        if self._report is None:
            return
        with self._lock:
            pending = [(v, self._reports[v]) for v in self._unwritten if v in self._reports]
        for version, report in pending:
            try:
                self._report(report[0], version, report[1])
            except Exception as exc:
                logger.debug("could not record that version %s cannot load: %s", version, exc)
                continue
            with self._lock:
                if self._reports.get(version) == report:  # (not told anew meanwhile)
                    self._unwritten.discard(version)
                    if report[1] is None:  # a withdrawal, done
                        del self._reports[version]

    def report_again(self) -> None:
        """Write every standing report again: this process registered again (after a
        takeover, or under a new executor id), and its reports went with its old row."""
        with self._lock:
            for version, (_name, reason) in list(self._reports.items()):
                if reason is None:
                    del self._reports[version]  # nothing left to withdraw
                    self._unwritten.discard(version)
                else:
                    self._unwritten.add(version)
        self._write_reports()

    def refresh(self) -> None:
        """Workers: learn (and try to load) the versions stored since the last refresh."""
        if not self._run_stored:
            return
        if self._unwritten:
            self._write_reports()
        for name, version, kind in self._store.list_function_versions():
            with self._lock:
                known = version in self._loaded or version in self._failed
            if not known:
                self._load(name, version)
            with self._lock:
                if version in self._loaded:
                    self._stored_names.add(
                        name if kind == "workflow" else STEP_WORKFLOW_PREFIX + name
                    )

    @property
    def runs_stored(self) -> bool:
        """Whether this process claims any stored function (a worker), not only its own."""
        return self._run_stored

    def claimable_names(self) -> set[str]:
        """Workflow names this process claims."""
        names = self._registry.runnable_names()
        with self._lock:
            return names | self._stored_names

    def excluded_versions(self) -> set[str]:
        """Versions that cannot be loaded here (now): not claimed by this process."""
        now = time.monotonic()
        with self._lock:
            missing = {v for v, t in self._missing.items() if now - t < MISSING_RETRY_SEC}
            return set(self._failed) | missing


def _split(workflow_name: str) -> tuple[str, bool]:
    if workflow_name.startswith(STEP_WORKFLOW_PREFIX):
        return workflow_name[len(STEP_WORKFLOW_PREFIX) :], True
    return workflow_name, False
