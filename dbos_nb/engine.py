"""The composition root: builds the runtime from a configuration, launches and destroys it.

`launch()` migrates the schema, claims the executor id, stores the declared queues, puts this
executor's unfinished workflows back in their queues, and starts the scheduler. `destroy()` stops
everything it started, so a notebook can create and destroy DBOS any number of times.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dbos_nb.clock import Clock, SystemClock
from dbos_nb.core import aio
from dbos_nb.core.clock_skew import SkewWatch
from dbos_nb.core.context import check_id_length, valid_seconds
from dbos_nb.core.functions import FunctionResolver
from dbos_nb.core.pool import ElasticPool
from dbos_nb.core.queue import QUEUES, Queue, store_settings
from dbos_nb.core.registry import REGISTRY, Registration
from dbos_nb.core.runtime import Runtime, set_runtime
from dbos_nb.core.scheduler import Scheduler
from dbos_nb.core.waiters import Waiters
from dbos_nb.errors import DBOSConfigError, DBOSExecutorIdInUseError
from dbos_nb.models import INTERNAL_QUEUE, QueueSettings
from dbos_nb.processes import may_still_run
from dbos_nb.storage.database import Database
from dbos_nb.storage.migrations import migrate, migrate_app
from dbos_nb.storage.store import SystemStore

logger = logging.getLogger("dbos_nb")

_KNOWN_KEYS = {
    "name",
    "system_database_url",
    "application_database_url",
    "database_url",
    "application_version",
    "executor_id",
    "max_executor_threads",
    "run_admin_server",
    "log_level",
    "polling_interval_sec",
    "use_listen_notify",
    "heartbeat_interval_sec",
    "executor_lease_sec",
    "admin_port",
    "enable_otlp",
    "otlp_traces_endpoints",
    "otlp_logs_endpoints",
    "otlp_attributes",
    "sys_db_pool_size",
    "db_engine_kwargs",
    "dbos_system_schema",
    "serializer",
    "run_migrations",
    "system_database_engine",
    "notification_listener_polling_interval_sec",
    "conductor_key",
    "conductor_url",
    "listen_queues",
    "run_stored_functions",
    "max_concurrent_workflows",
}


# How long an executor's lease must be, at least: twice its heartbeat interval. An executor
# renews its heartbeat once per interval, when its scheduler's loop comes round; while it runs
# workflows (the only time it has work to lose) the loop turns every 100 ms, so a renewal is due
# at most a moment after one interval, and the write may then wait on the database. Two
# intervals leave a whole interval of slack after the latest on-time renewal: one late renewal
# (a busy database, a long claim, a GC pause) does not give a live executor's work to others,
# who would run its in-flight steps a second time. A longer lease only delays the takeover of
# a dead executor. (Idle, the loop may check the heartbeat up to a polling interval late; an
# executor then has no running work to lose, and the polling interval is left out of the rule.)
LEASE_HEARTBEATS = 2

# The part of the configured executor id kept in the id a process takes when another live
# process took its id over (`-` and 8 hex digits follow; ids hold at most 255 characters).
MAX_REJOIN_BASE = 246
# Claims of an executor id lost in a row to processes registering it at the same moment.
_CLAIM_ATTEMPTS = 3


def min_lease_sec(heartbeat_interval_sec: float) -> float:
    """The shortest lease accepted with this heartbeat interval (see above)."""
    return LEASE_HEARTBEATS * heartbeat_interval_sec


def lease_too_short(lease_sec: float, heartbeat_interval_sec: float) -> bool:
    """Whether a lease is shorter than `min_lease_sec` (doubling a float is exact: a lease of
    0.3 s passes with a heartbeat of 0.15 s)."""
    return lease_sec < min_lease_sec(heartbeat_interval_sec)


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated configuration with every default filled in."""

    name: str
    system_database_url: str
    application_database_url: str
    executor_id: str
    application_version: str | None
    polling_interval_sec: float
    use_listen_notify: bool
    heartbeat_interval_sec: float
    executor_lease_sec: float
    # Queues this process claims from: None = the queues it declares, ["*"] = every queue.
    listen_queues: tuple[str, ...] | None = None
    # Workers: claim and run any function stored in the database, not only their own.
    run_stored_functions: bool = False
    # At most this many workflows running at once in this process (None: no local cap).
    max_concurrent_workflows: int | None = None


def resolve_config(config: dict[str, Any] | None) -> ResolvedConfig:
    """Fill in defaults and validate; raises DBOSConfigError naming the bad key."""
    config = dict(config or {})
    unknown = set(config) - _KNOWN_KEYS
    if unknown:
        raise DBOSConfigError(f"unknown configuration key(s) {sorted(unknown)}")
    name = config.get("name", "dbos_app")
    if not isinstance(name, str) or not name.strip():
        raise DBOSConfigError(f"config 'name' must be a non-empty string, got {name!r}")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    system_url = config.get("system_database_url") or config.get("database_url")
    system_url = system_url or f"sqlite:///{safe}.sqlite"
    app_url = config.get("application_database_url") or config.get("database_url") or system_url
    for key in ("system_database_url", "application_database_url", "database_url"):
        if key in config and config[key] is not None and not isinstance(config[key], str):
            raise DBOSConfigError(f"config {key!r} must be a URL string, got {config[key]!r}")
    executor_id = config.get("executor_id") or os.environ.get("DBOS__VMID") or "local"
    if not isinstance(executor_id, str):
        raise DBOSConfigError(f"config 'executor_id' must be a string, got {executor_id!r}")
    # As the version: PostgreSQL would refuse it at launch, as if the database were unreachable.
    check_id_length(executor_id, "config 'executor_id'", DBOSConfigError)
    version = config.get("application_version") or os.environ.get("DBOS__APPVERSION")
    if version is not None:
        if not isinstance(version, str):
            raise DBOSConfigError(f"config 'application_version' must be a string, got {version!r}")
        # Checked here, not when the first workflow row refuses it (PostgreSQL) or keeps it
        # whole (SQLite).
        check_id_length(version, "config 'application_version'", DBOSConfigError)
    listen = config.get("listen_queues")
    if listen is not None and (
        isinstance(listen, str) or not all(isinstance(q, str) for q in listen)
    ):
        raise DBOSConfigError(
            f"config 'listen_queues' must be a list of queue names, got {listen!r}"
        )
    cap = config.get("max_concurrent_workflows")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise DBOSConfigError(
            f"config 'max_concurrent_workflows' must be a positive integer, got {cap!r}"
        )
    polling = _positive(config, "polling_interval_sec", 1.0)
    heartbeat = _positive(config, "heartbeat_interval_sec", 5.0)
    lease = _positive(config, "executor_lease_sec", 30.0)
    if lease_too_short(lease, heartbeat):
        raise DBOSConfigError(
            f"config 'executor_lease_sec' ({lease:g} s) must be at least twice "
            f"'heartbeat_interval_sec' ({heartbeat:g} s), that is {min_lease_sec(heartbeat):g} "
            "s: with a shorter lease, other processes take over this one's running workflows "
            "while it is alive (their steps would run twice)"
        )
    return ResolvedConfig(
        name=name,
        system_database_url=system_url,
        application_database_url=app_url,
        executor_id=str(executor_id),
        application_version=version,
        polling_interval_sec=polling,
        use_listen_notify=bool(config.get("use_listen_notify", True)),
        heartbeat_interval_sec=heartbeat,
        executor_lease_sec=lease,
        listen_queues=tuple(listen) if listen is not None else None,
        run_stored_functions=bool(config.get("run_stored_functions", False)),
        max_concurrent_workflows=cap,
    )


def _positive(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    # NaN or infinity would pass a `<= 0` check and stop the scheduler's thread later.
    if not valid_seconds(value):
        raise DBOSConfigError(
            f"config {key!r} must be a positive, finite number of seconds (at most a century), "
            f"got {value!r}"
        )
    return float(value)


def _default_version() -> str:
    """A hash of the registered workflows' code, like DBOS's default application version."""
    digest = hashlib.md5(usedforsecurity=False)
    for name in sorted(REGISTRY.runnable_names()):
        reg = REGISTRY.get(name)
        digest.update(name.encode())
        if reg is not None:
            digest.update(reg.source_hash.encode())
    return digest.hexdigest()


class Engine:
    """One DBOS instance's resources, from launch to destroy."""

    def __init__(self, config: ResolvedConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.runtime: Runtime | None = None
        self._scheduler: Scheduler | None = None
        self._token = uuid.uuid4().hex
        self._renewals = Renewals(
            config.heartbeat_interval_sec, real_clock=isinstance(self.clock, SystemClock)
        )
        self._skew = SkewWatch(self.clock)
        # The executor id as configured (a process whose id was taken over goes on under another).
        self._configured_executor_id = config.executor_id

    @property
    def launched(self) -> bool:
        return self.runtime is not None

    def launch(self) -> Runtime:
        if self.runtime is not None:
            logger.warning("DBOS.launch() called again; it is already launched")
            return self.runtime
        cfg = self.config
        # A transaction left open longer than the lease can only be a frozen process's: its
        # work goes to others after the lease, so must the locks that work needs.
        db = Database(
            cfg.system_database_url,
            notifications=cfg.use_listen_notify,
            stalled_transaction_timeout_sec=cfg.executor_lease_sec,
            system_tables=True,
        )
        try:
            migrate(db)
            if cfg.application_database_url == cfg.system_database_url:
                app_db = db
            else:
                app_db = Database(cfg.application_database_url)
            migrate_app(app_db)
            store = SystemStore(db)
        except BaseException:
            db.dispose()
            raise
        rt = Runtime(
            db=db,
            store=store,
            app_db=app_db,
            clock=self.clock,
            registry=REGISTRY,
            pool=ElasticPool("dbos_nb-worker"),
            waiters=Waiters(),
            executor_id=cfg.executor_id,
            app_version=cfg.application_version or _default_version(),
            polling_interval_sec=cfg.polling_interval_sec,
            resolver=FunctionResolver(
                store,
                REGISTRY,
                run_stored=cfg.run_stored_functions,
                # Under the id and token this process holds when it reports (see
                # `_rejoin_as_new_executor`).
                report=lambda name, version, reason: store.record_load_failure(
                    self.config.executor_id,
                    self._token,
                    name,
                    version,
                    reason,
                    self.clock.now_ms(),
                ),
            ),
        )
        rt.run_async = lambda ex: aio.start_on_loop(rt, ex)
        # The running workflows are the writers a commit can wait a moment for.
        db.committer.expect_writers(rt.running_count)
        store.upsert_queue(QueueSettings(name=INTERNAL_QUEUE), rt.now_ms())
        _record_functions(rt, REGISTRY.all())
        for queue in QUEUES.all():
            self._store_queue(rt, queue)
        # Registered last: a live executor's functions and queues are already in the catalogue
        # (a client may check them as soon as it sees the worker).
        try:
            self._claim_executor_id(store)
        except BaseException:
            db.dispose()
            if app_db is not db:
                app_db.dispose()
            raise
        self._compare_clocks(db)
        recovered = store.requeue_pending(cfg.executor_id, rt.now_ms())
        if recovered:
            logger.info(
                "recovering %d unfinished workflow(s) of executor %r",
                len(recovered),
                cfg.executor_id,
            )
        self._scheduler = Scheduler(
            rt,
            self._listened_queues,
            poll_ms=self._poll_ms,
            heartbeat=lambda: self._heartbeat(rt),
            heartbeat_interval_sec=cfg.heartbeat_interval_sec,
            use_listen_notify=cfg.use_listen_notify,
            max_running=cfg.max_concurrent_workflows,
        )
        REGISTRY.add_listener(self._on_register)
        QUEUES.add_listener(self._on_queue)
        self.runtime = rt
        set_runtime(rt)
        self._scheduler.start()
        rt.direct = self._scheduler
        return rt

    def serves(self, queue_name: str) -> bool:
        """Whether this process claims work from `queue_name`."""
        return queue_name in self._listened_queues()

    def executor_alive(self, row: dict[str, Any], now_ms: int) -> bool:
        """Whether an executor's registration row has renewed its heartbeat within its own
        lease (this process's lease for a row registered without one), as `take_over_expired`
        judges it."""
        return now_ms - int(row["heartbeat_at"]) <= self._lease_of(row)

    def _lease_of(self, row: dict[str, Any]) -> int:
        """An executor's own lease (this process's for a row registered without one)."""
        lease_ms = row.get("lease_ms")
        return int(lease_ms) if lease_ms is not None else self._lease_ms

    @property
    def _lease_ms(self) -> int:
        """This executor's lease in milliseconds, as it registers it."""
        return round(self.config.executor_lease_sec * 1000)

    def _listened_queues(self) -> list[str]:
        listen = self.config.listen_queues
        if listen is None:
            return [INTERNAL_QUEUE, *QUEUES.names()]
        if "*" in listen and self.runtime is not None:
            return [q.name for q in self.runtime.store.list_queues()]
        return [INTERNAL_QUEUE, *(q for q in listen if q != "*")]

    def _poll_ms(self) -> int:
        """How often the fallback poll runs: at the config's `polling_interval_sec`, or at a
        served queue's own if shorter (as DBOS polls each queue at its own interval). This
        process's declarations give it, which its setters keep up to date."""
        listen = self.config.listen_queues
        own = [
            q.settings.polling_interval_ms
            for q in QUEUES.all()
            if listen is None or "*" in listen or q.name in listen
        ]
        return min([round(self.config.polling_interval_sec * 1000), *own])

    def _store_queue(self, rt: Runtime, queue: Queue) -> None:
        settings = queue.settings
        if queue.adopts_stored:
            # Only the name given: the stored settings apply (the defaults only for a new queue).
            queue.settings = rt.store.adopt_queue(settings, rt.now_ms())
            return
        store_settings(rt.store, settings, rt.now_ms())

    def _on_register(self, reg: Registration) -> None:
        rt = self.runtime
        if rt is not None:
            _record_functions(rt, [reg])
            # A newly registered function can make queued or recovered work runnable here.
            rt.wake_scheduler()

    def _on_queue(self, queue: Queue) -> None:
        rt = self.runtime
        if rt is not None:
            self._store_queue(rt, queue)
            rt.wake_scheduler(queue.name)

    def _claim_executor_id(self, store: SystemStore) -> None:
        cfg = self.config
        for _ in range(_CLAIM_ATTEMPTS):
            now = self.clock.now_ms()
            row = store.get_executor(cfg.executor_id)
            if row is not None and row["token"] != self._token:
                silent_ms = now - int(row["heartbeat_at"])
                if may_still_run(row["hostname"], int(row["pid"]), silent_ms, self._lease_of(row)):
                    raise DBOSExecutorIdInUseError(
                        f"executor id {cfg.executor_id!r} is in use by process {row['pid']} on "
                        f"{row['hostname']} (heartbeat {silent_ms / 1000:.1f} s ago); give each "
                        "process its own executor_id"
                    )
            replacing = str(row["token"]) if row is not None else None
            if self._register(store, cfg.executor_id, now, replacing=replacing):
                self._renewals.renewed(self.clock.now_ms())
                return
            # Another process registered the id since the look: judge its row in turn (a
            # live one refuses this launch above).
        raise DBOSExecutorIdInUseError(
            f"executor id {cfg.executor_id!r} was claimed by other processes at the same moment "
            f"{_CLAIM_ATTEMPTS} times; give each process its own executor_id"
        )

    def _register(
        self, store: SystemStore, executor_id: str, now: int, *, replacing: str | None
    ) -> bool:
        """Register this process (its host, pid, token and own lease) under `executor_id`, in
        place of the row with token `replacing` (None: of no row); False if the row is no
        longer that one."""
        return store.claim_executor(
            executor_id,
            socket.gethostname(),
            os.getpid(),
            self._token,
            now,
            self._lease_ms,
            replacing=replacing,
        )

    def _heartbeat(self, rt: Runtime) -> None:
        """Renew this executor's lease, and take over the work of executors whose lease ran out."""
        now = rt.now_ms()
        if not rt.store.heartbeat(rt.executor_id, self._token, now):
            owners = rt.running_owners()
            rt.preempt_all("taken over by another executor")
            holder = rt.store.get_executor(rt.executor_id)
            if holder is not None and holder["token"] != self._token:
                self._rejoin_as_new_executor(rt, holder, owners, now)
                return
            logger.error(
                "executor %r missed its lease and its work was given to others; stopping its "
                "current workflows (their results would be refused) and joining again",
                rt.executor_id,
            )
            self._token = uuid.uuid4().hex
            if not self._register(rt.store, rt.executor_id, now, replacing=None):
                # Another process took the id just now: go on under a new one, as above.
                holder = rt.store.get_executor(rt.executor_id)
                if holder is not None:
                    self._rejoin_as_new_executor(rt, holder, owners, now)
                return  # (gone again: the next heartbeat tries anew)
            rt.resolver.report_again()
            # Work claimed after the take-over (which requeued only what was PENDING then)
            # would stay PENDING under this live executor, run by nobody: back to its queue.
            if rt.store.requeue_pending(rt.executor_id, now):
                rt.wake_scheduler()
        now = self._renewals.renewed(rt.now_ms())
        # Each executor is judged by its own registered lease; ours only for old rows.
        taken = rt.store.take_over_expired(
            now, self._lease_ms, keep=rt.executor_id, silent_since=self._renewals.silent_since
        )
        for executor_id, ids in taken.items():
            # A warning only when work was left behind: a kernel closed while idle is news to
            # nobody.
            logger.log(
                logging.WARNING if ids else logging.INFO,
                "executor %r sent no heartbeat within its lease: %d unfinished workflow(s) "
                "returned to their queues",
                executor_id,
                len(ids),
            )
        if taken:
            rt.wake_scheduler()
        self._compare_clocks(rt.db)

    def _compare_clocks(self, db: Database) -> None:
        """Warn if this machine's clock and the database server's disagree (see
        `clock_skew`); a failed reading only waits for the next."""
        try:
            self._skew.check(db.server_time_ms)
        except Exception as exc:  # the heartbeat and the launch go on without it
            logger.debug("could not compare clocks with the database server: %r", exc)

    def _rejoin_as_new_executor(
        self, rt: Runtime, holder: dict[str, Any], owners: dict[str, str], now: int
    ) -> None:
        """Another process registered this executor id while this one could not renew it (it
        took the id over as a dead one's). Joining again under the same id would delete that
        process's registration and put its running work back in the queues, and it would do
        the same in turn, for ever: this process goes on under a new id instead, and puts back
        only the work its own executions held."""
        old = rt.executor_id
        new = self._rejoin_id()
        logger.error(
            "executor id %r was taken by process %s on %s while this process could not renew "
            "its lease; stopping this process's current workflows and going on as %r (give "
            "each live process its own executor_id)",
            old,
            holder["pid"],
            holder["hostname"],
            new,
        )
        self._token = uuid.uuid4().hex
        while not self._register(rt.store, new, now, replacing=None):
            new = self._rejoin_id()  # (taken: eight random hex digits rarely are)
        rt.executor_id = new
        # What this process is now, for DBOS.launch() asked again and for destroy.
        self.config = replace(self.config, executor_id=new)
        rt.resolver.report_again()
        # Only rows that executions of this process still own: what the other process runs
        # under the old id is its own.
        requeued = [w for w, owner in owners.items() if rt.store.requeue_workflow(w, now, owner)]
        if requeued:
            rt.wake_scheduler()

    def _rejoin_id(self) -> str:
        # From the configured id, so that ids do not grow with each rejoin (255 at most).
        return f"{self._configured_executor_id[:MAX_REJOIN_BASE]}-{uuid.uuid4().hex[:8]}"

    def destroy(self, workflow_completion_timeout_sec: float = 0.0) -> None:
        rt = self.runtime
        if rt is None:
            return
        REGISTRY.remove_listener(self._on_register)
        QUEUES.remove_listener(self._on_queue)
        rt.direct = None
        if self._scheduler is not None:
            self._scheduler.stop()
        deadline = time.monotonic() + max(workflow_completion_timeout_sec, 0.0)
        while rt.running_ids() and time.monotonic() < deadline:
            time.sleep(0.01)
        rt.stopping.set()
        rt.preempt_all("shutdown")
        rt.waiters.notify_all()
        rt.aio.stop()
        if not rt.pool.shutdown(timeout=5.0):
            logger.warning(
                "some workflow threads are still inside user code; they stop at their next step"
            )
        try:
            # What this process had claimed but not finished goes back to its queue at once,
            # for whichever process runs next (this one after a restart, or another worker).
            released = rt.store.requeue_pending(rt.executor_id, rt.now_ms())
            if released:
                logger.info("returned %d unfinished workflow(s) to their queues", len(released))
            rt.store.unregister_executor(rt.executor_id, self._token)
        except Exception:
            logger.warning("could not unregister executor %r", rt.executor_id, exc_info=True)
        set_runtime(None)
        self.runtime = None
        rt.db.dispose()
        if rt.app_db is not rt.db:
            rt.app_db.dispose()


def _record_functions(rt: Runtime, regs: list[Registration]) -> None:
    """Publish registered names (and their latest versions) so that clients can check the names
    they enqueue and pin the version."""
    rt.store.record_functions(
        [(r.name, r.kind, r.module, r.source_hash) for r in regs], rt.now_ms()
    )


class Renewals:
    """When this executor last renewed its lease, and since when the others' silence counts.

    If this executor's own renewals stopped for longer than two heartbeat intervals, so did
    everyone's, most likely: a long transaction held SQLite's write lock (every process's
    heartbeat waits for it), or the database did not answer. The others' rows then look stale
    for that reason alone, and taking their work would run their in-flight steps a second time.
    So after such a gap their silence counts only from its end (`silent_since`): each gets a
    whole lease of its own to renew. A gap counts if it shows on both the monotonic clock (a
    real wait) and the engine's clock (an injected clock moved by a test is no wait).

    With the real clock, so does a jump of the wall clock past the time this process ran: the
    machine slept (a laptop's lid closed on a notebook and its workers: the monotonic clock
    stops meanwhile, the wall clock does not) or the clock was set forward. Every process on
    the machine slept alike, and the first to wake would otherwise find the others' heartbeats
    as old as the sleep and take their running workflows.
    """

    def __init__(
        self,
        heartbeat_interval_sec: float,
        real_clock: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit_sec = LEASE_HEARTBEATS * heartbeat_interval_sec
        self._real_clock = real_clock
        self._monotonic = monotonic
        self._last: tuple[float, int] | None = None  # (monotonic s, engine clock ms)
        self.silent_since = 0

    def renewed(self, now_ms: int) -> int:
        """Note a renewal that ended at `now_ms`; returns `now_ms`."""
        mono = self._monotonic()
        if self._last is not None:
            last_mono, last_ms = self._last
            waited = mono - last_mono
            moved = (now_ms - last_ms) / 1000
            gap = min(waited, moved)
            if gap > self._limit_sec:
                logger.info(
                    "this executor could not renew its lease for %.1f s; other executors get a "
                    "whole lease from now before their work is taken over",
                    gap,
                )
                self.silent_since = now_ms
            elif self._real_clock and moved - waited > self._limit_sec:
                logger.info(
                    "the clock moved %.1f s while this process ran %.1f s (the machine slept, or "
                    "the clock was set forward); other executors get a whole lease from now "
                    "before their work is taken over",
                    moved,
                    waited,
                )
                self.silent_since = now_ms
        self._last = (mono, now_ms)
        return now_ms
