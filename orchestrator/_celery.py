"""The Celery app: our settings, one task per step and per branch, the coordinator's sweeper.

Pass the app explicitly (no current-app magic): `create_app(settings, workflows)` returns
an `OrchestratorApp`, a Celery app that owns the runtime its tasks run in.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery, bootsteps, signals

from . import _kombu_fixes, _logging
from ._config import Settings, celery_config
from ._definition import Workflow
from ._dispatch.base import branch_task_name, step_task_name
from ._dispatch.celery import CeleryDispatcher
from ._middleware import Middleware
from ._records import RunError
from ._runtime import Runtime
from ._steward import CatalogHeartbeat
from ._stores.redis import connect

log = logging.getLogger("orchestrator.celery")


class StepFailed(Exception):
    """Raised from a step's Celery task after the step's failure is committed, so Flower
    and Celery's events show it as FAILURE, with the error. Late acknowledgement acks a
    task that raised (task_acks_on_failure_or_timeout): it is not redelivered."""

    def __init__(self, error: RunError) -> None:
        super().__init__(str(error))


class OrchestratorApp(Celery):
    """A Celery app that hosts workflows: its tasks run steps in `runtime`."""

    runtime: Runtime

    def host(self, wf: Workflow) -> None:
        """Register `wf` and its step tasks."""
        self.runtime.register(wf)
        for step in wf.step_names():
            self._task(step_task_name(wf.name, step), wf.name)
        self._task(branch_task_name(wf.name), wf.name)

    def _task(self, name: str, workflow: str) -> None:
        if name in self.tasks:
            return
        runtime = self.runtime

        def run(run_id: str, token: int, branch: str | None = None, join: int | None = None,
                attempt: int = 1) -> str:
            try:
                outcome = runtime.execute(workflow, run_id, token, branch, join, attempt)
            except SoftTimeLimitExceeded:
                # The step's time limit covers the whole task: it can fire after the step
                # returned, while its outcome is committed or sent. What was committed
                # stands, and the sweep sends what was not.
                log.warning("run %s: time limit reached after the step of token %s returned",
                            run_id, token)
                return "interrupted"
            # Only a branch that failed the run, and any failed step, is shown as FAILURE:
            # a branch that will be retried is not (in a chord sent by an older version,
            # a FAILURE would fail the chord, and its body would never join).
            if outcome.error is not None and (branch is None or outcome.status == "failed"):
                raise StepFailed(outcome.error)
            return outcome.status

        self.task(name=name, ignore_result=True, shared=False)(run)


def create_app(
    settings: Settings | None = None,
    workflows: Iterable[Workflow] = (),
    *,
    import_modules: bool = True,
    middleware: Iterable[Middleware] = (),
) -> OrchestratorApp:
    """A Celery app hosting `workflows` plus every workflow found in `settings.workflows`."""
    settings = settings or Settings.from_env()
    _kombu_fixes.install()  # workers must survive a Redis restart under load
    app = OrchestratorApp("orchestrator", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.runtime = Runtime(CeleryDispatcher(app), settings, middleware=middleware)
    found = list(workflows)
    if import_modules:
        for module in settings.workflows:
            found += find_workflows(importlib.import_module(module))
    for wf in found:
        app.host(wf)
    # Workers and coordinators announce what they serve, and keep announcing it.
    app.steps["worker"].add(CatalogHeartbeat)
    app.steps["consumer"].add(ReuseRedisClients)
    return app


def find_workflows(module: ModuleType) -> list[Workflow]:
    """Workflows a module defines at top level, and those of its submodules' `__all__`."""
    from ._steward import Steward

    found = [v for v in vars(module).values() if isinstance(v, Workflow)]
    for steward in (v for v in vars(module).values() if isinstance(v, Steward)):
        found += list(steward)
    for sub in getattr(module, "__workflow_modules__", ()):
        found += find_workflows(importlib.import_module(f"{module.__name__}.{sub}"))
    return found


def _run_context_logs(logger: logging.Logger, **kwargs: Any) -> None:
    """Worker logs carry the run id and step, as text or JSON lines. Celery sets up logging
    in the worker and again in every pool child; it is the current app by then."""
    from celery import current_app

    runtime = getattr(current_app, "runtime", None)
    _logging.install(logger, runtime.settings.log_format if runtime is not None else "text")


# Connected once for the process (dispatch_uid), not once per app.
for _signal in (signals.after_setup_logger, signals.after_setup_task_logger):
    _signal.connect(_run_context_logs, weak=False, dispatch_uid="orchestrator-run-context")


class ReuseRedisClients(bootsteps.StartStopStep):
    """The worker's task channel keeps one Redis client for its acks and deliveries:
    kombu builds a client for each (see _kombu_fixes.reuse_client), an eighth of a
    worker's main-process CPU per message. Started again with every new connection."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        if c.task_consumer is not None:
            _kombu_fixes.reuse_client(c.task_consumer.channel)


class Sweeper(bootsteps.StartStopStep):
    """Coordinator duty: fire due timers and schedules, re-drive lost work, every
    sweep_interval."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self._stop = threading.Event()

    def start(self, worker: Any) -> None:
        from ._schedule_firer import ScheduleFirer  # it starts runs as the Client does

        runtime: Runtime = worker.app.runtime
        interval = runtime.settings.sweep_interval
        schedules = ScheduleFirer(runtime, connect(runtime.settings.redis_url))

        def loop() -> None:
            # A pass that claimed a full batch left more due: the next one starts at once.
            while not self._stop.wait(0 if runtime.sweeper.saturated else interval):
                for duty in (runtime.sweep_all, schedules.fire_due):
                    try:
                        duty()
                    except Exception:
                        log.exception("%s failed", duty.__name__)

        threading.Thread(target=loop, name="orchestrator-sweeper", daemon=True).start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
