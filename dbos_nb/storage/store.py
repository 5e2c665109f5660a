"""SystemStore: every query the engine makes against the system database.

Methods are named for what they do, take and return plain values, and each runs as one
transaction. Their docstrings say what is atomic and what is idempotent. The store knows nothing of
Python functions, queues objects or threads; queue claiming lives in `claims.py`.

The queries live in one module per job, each a part (mixin) of `SystemStore`:

- `workflow_rows.py`: write, finish, read, list and count workflow rows;
- `workflow_control.py`: cancel, resume, fork, delete;
- `ownership.py`: claim, release, requeue, take over; lost executions;
- `step_records.py`: step preflight and records;
- `batch_records.py`: batches of workflows;
- `queue_records.py`: queue settings, back-off and usage;
- `function_catalogue.py`: registered functions and their versions;
- `executor_registry.py`: executors and their heartbeats;
- `rows.py`: what they share (row types, the base class, helpers).
"""

from __future__ import annotations

import logging

from dbos_nb.storage.batch_records import BatchRecords, ParentRecord
from dbos_nb.storage.database import Database
from dbos_nb.storage.executor_registry import ExecutorRegistry
from dbos_nb.storage.function_catalogue import FunctionCatalogue
from dbos_nb.storage.ownership import WorkflowOwnership
from dbos_nb.storage.queue_records import QueueRecords, queue_settings_from_row
from dbos_nb.storage.rows import NewWorkflow, StepPreflight
from dbos_nb.storage.step_records import StepRecords
from dbos_nb.storage.workflow_control import WorkflowControl
from dbos_nb.storage.workflow_rows import WorkflowRows

logger = logging.getLogger(__name__)


class SystemStore(
    WorkflowRows,
    WorkflowControl,
    WorkflowOwnership,
    StepRecords,
    BatchRecords,
    QueueRecords,
    FunctionCatalogue,
    ExecutorRegistry,
):
    """The system database's queries."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._build_workflow_statements(db)
        self._build_step_statements(db)


__all__ = ["NewWorkflow", "ParentRecord", "StepPreflight", "SystemStore", "queue_settings_from_row"]
