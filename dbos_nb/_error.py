"""DBOS Transact's error module (`dbos._error`, also `dbos.error`) under dbos_nb's name.

Code written for DBOS imports its exceptions from there (`from dbos._error import
DBOSQueueDeduplicatedError`); with this module that import ports by changing the package name
alone. The classes are dbos_nb's own (`dbos_nb.errors`), not copies.
"""

from __future__ import annotations

from dbos_nb.errors import (
    DBOSAwaitedWorkflowCancelledError,
    DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded,
    DBOSConfigError,
    DBOSConflictingRegistrationError,
    DBOSConflictingWorkflowError,
    DBOSErrorCode,
    DBOSException,
    DBOSExecutorIdInUseError,
    DBOSMaxRecoveryAttemptsExceededError,
    DBOSMaxStepRetriesExceeded,
    DBOSNonExistentWorkflowError,
    DBOSNonSerializableError,
    DBOSNotImplementedError,
    DBOSNotLaunchedError,
    DBOSQueueDeduplicatedError,
    DBOSUnexpectedStepError,
    DBOSWorkflowCancelledError,
    DBOSWorkflowFunctionNotFoundError,
    DBOSWorkflowTimedOutError,
    MaxRecoveryAttemptsExceededError,
)

__all__ = [
    "DBOSAwaitedWorkflowCancelledError",
    "DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded",
    "DBOSConfigError",
    "DBOSConflictingRegistrationError",
    "DBOSConflictingWorkflowError",
    "DBOSErrorCode",
    "DBOSException",
    "DBOSExecutorIdInUseError",
    "DBOSMaxRecoveryAttemptsExceededError",
    "DBOSMaxStepRetriesExceeded",
    "DBOSNonExistentWorkflowError",
    "DBOSNonSerializableError",
    "DBOSNotImplementedError",
    "DBOSNotLaunchedError",
    "DBOSQueueDeduplicatedError",
    "DBOSUnexpectedStepError",
    "DBOSWorkflowCancelledError",
    "DBOSWorkflowFunctionNotFoundError",
    "DBOSWorkflowTimedOutError",
    "MaxRecoveryAttemptsExceededError",
]
