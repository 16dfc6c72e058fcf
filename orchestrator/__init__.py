"""Durable workflows on Celery and Redis.

    from orchestrator import Workflow, START, END, WorkflowRunner

Everything public is exported here; modules starting with `_` are internal.
"""

from ._agents import EchoAgent
from ._celery import OrchestratorApp, create_app
from ._client import AmbiguousRunId, Client, InvalidInput, NoLiveWorker
from ._config import Settings
from ._definition import (
    END,
    START,
    AnyOf,
    Call,
    DefinitionError,
    Event,
    HumanApproval,
    Next,
    NonRetryable,
    Parallel,
    Sleep,
    StepOptions,
    Until,
    Wait,
    Workflow,
    step,
)
from ._engine import ControlError
from ._events import InvalidEvent
from ._middleware import Middleware
from ._records import RunError, RunRecord, RunResult, RunStatus, StepPolicy
from ._reducers import reducer
from ._runner import RunFailed, RunHandle, WorkflowRunner, local_runtime
from ._runtime import RunNotFound, UnknownWorkflow
from ._schedule_api import Schedules
from ._schedule_rules import Overlap
from ._schedules import Schedule, ScheduleExists, ScheduleNotFound
from ._steward import CatalogEntry, Steward
from ._stores import MemoryStore, RedisStore, RunStore, StoreUnavailable

__all__ = [
    # defining workflows
    "END",
    "START",
    "AnyOf",
    "Call",
    "DefinitionError",
    "Event",
    "HumanApproval",
    "Next",
    "NonRetryable",
    "Parallel",
    "StepOptions",
    "StepPolicy",
    "Sleep",
    "Until",
    "Wait",
    "Workflow",
    "reducer",
    "step",
    "EchoAgent",
    # running them
    "WorkflowRunner",
    "RunHandle",
    "RunResult",
    "RunRecord",
    "RunStatus",
    "RunError",
    "RunFailed",
    "Settings",
    "create_app",
    "OrchestratorApp",
    "Middleware",
    "local_runtime",
    # discovery and apps
    "Steward",
    "CatalogEntry",
    "Client",
    # schedules
    "Schedules",
    "Schedule",
    "Overlap",
    # stores
    "RunStore",
    "MemoryStore",
    "RedisStore",
    # errors
    "ControlError",
    "InvalidEvent",
    "InvalidInput",
    "AmbiguousRunId",
    "NoLiveWorker",
    "RunNotFound",
    "ScheduleExists",
    "ScheduleNotFound",
    "StoreUnavailable",
    "UnknownWorkflow",
]
