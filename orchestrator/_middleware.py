"""A seam around step execution and commits, for metrics, tracing and audit.

Subclass `Middleware`, override the hooks you need, and pass instances to
`create_app(..., middleware=[...])` or `WorkflowRunner(wf, middleware=[...])`. Hooks run
in the process doing the work (a worker for steps, whoever commits for commits); an
exception in a hook is logged and never changes the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ._records import RunError, RunRecord, Task

log = logging.getLogger("orchestrator.middleware")

__all__ = ["Middleware"]


class Middleware:
    """Hooks around a run's work. Every hook is optional."""

    def before_step(self, run: RunRecord, task: Task) -> None:
        """A worker is about to run `task` (a step or a branch) of `run`."""

    def step_failed(self, run: RunRecord, task: Task, error: RunError) -> None:
        """The step's code raised (or returned what the runtime cannot use); called just
        before `after_step`, with what failed."""

    def after_step(self, run: RunRecord, task: Task, failed: bool, seconds: float) -> None:
        """The step's code returned (or raised: `failed`); its outcome is not committed yet."""

    def after_commit(self, previous: RunRecord | None, record: RunRecord,
                     history: list[dict[str, Any]]) -> None:
        """A transition was committed (`previous` is None for a new run); `history` holds
        the entries it appended (step_completed, failed, step_redispatched, ...). Where the
        commit itself sent the next task (the outbox), that task may already be running
        on another worker."""

    def on_ignored(self, run_id: str, what: str, reason: str) -> None:
        """A late, duplicate or stale completion was ignored."""


class Hooks:
    """Calls every middleware's hook, containing their failures."""

    def __init__(self, middleware: Iterable[Middleware] = ()) -> None:
        self.middleware = list(middleware)

    def __bool__(self) -> bool:
        return bool(self.middleware)

    def call(self, hook: str, *args: Any) -> None:
        for m in self.middleware:
            try:
                getattr(m, hook)(*args)
            except Exception:
                log.exception("middleware %s.%s failed", type(m).__name__, hook)
