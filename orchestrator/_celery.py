"""The Celery app: our settings, one task per step and per branch, the coordinator's sweeper.

Pass the app explicitly (no current-app magic): `create_app(settings, workflows)`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from celery import Celery, bootsteps, signals

from . import _logging
from ._config import Settings, celery_config
from ._definition import Workflow
from ._dispatch.base import branch_task_name, step_task_name
from ._dispatch.celery import CeleryDispatcher
from ._runtime import Runtime
from ._steward import CatalogHeartbeat

log = logging.getLogger("orchestrator.celery")


def create_app(
    settings: Settings | None = None,
    workflows: Iterable[Workflow] = (),
    *,
    import_modules: bool = True,
) -> Celery:
    """A Celery app hosting `workflows` plus every workflow found in `settings.workflows`."""
    settings = settings or Settings.from_env()
    from . import _kombu_fixes  # workers must survive a Redis restart under load

    _kombu_fixes.install()
    app = Celery("orchestrator", set_as_current=False)
    app.conf.update(celery_config(settings))
    runtime = Runtime(CeleryDispatcher(app), settings)
    app.orchestrator = runtime  # type: ignore[attr-defined]
    found = list(workflows)
    if import_modules:
        for module in settings.workflows:
            found += find_workflows(importlib.import_module(module))
    for wf in found:
        host(app, wf)
    # Workers and coordinators announce what they serve, and keep announcing it.
    app.steps["worker"].add(CatalogHeartbeat)

    _log_with_run_context(settings.log_format)

    return app


def _log_with_run_context(fmt: str) -> None:
    def install_on(logger: logging.Logger, **kwargs: Any) -> None:
        _logging.install(logger, fmt)

    signals.after_setup_logger.connect(install_on, weak=False)
    signals.after_setup_task_logger.connect(install_on, weak=False)


def runtime_of(app: Celery) -> Runtime:
    runtime: Runtime = app.orchestrator  # type: ignore[attr-defined]
    return runtime


def host(app: Celery, wf: Workflow) -> None:
    """Register `wf` and its step tasks on `app`."""
    runtime = runtime_of(app)
    runtime.register(wf)
    for step in wf.step_names():
        name = step_task_name(wf.name, step)
        if name not in app.tasks:
            app.task(name=name, ignore_result=True, shared=False)(_step_body(runtime, wf.name))
    name = branch_task_name(wf.name)
    if name not in app.tasks:
        app.task(name=name, ignore_result=True, shared=False)(_step_body(runtime, wf.name))


def _step_body(runtime: Runtime, workflow: str) -> Any:
    def run(run_id: str, token: int, branch: str | None = None, join: int | None = None) -> str:
        return runtime.execute(workflow, run_id, token, branch, join)

    return run


def find_workflows(module: ModuleType) -> list[Workflow]:
    """Workflows a module defines at top level, and those of its submodules' `__all__`."""
    from ._steward import Steward

    found = [v for v in vars(module).values() if isinstance(v, Workflow)]
    for steward in (v for v in vars(module).values() if isinstance(v, Steward)):
        found += list(steward)
    for sub in getattr(module, "__workflow_modules__", ()):
        found += find_workflows(importlib.import_module(f"{module.__name__}.{sub}"))
    return found


class Sweeper(bootsteps.StartStopStep):
    """Coordinator duty: fire due timers and re-drive lost work, every sweep_interval."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        runtime = runtime_of(worker.app)
        interval = runtime.settings.sweep_interval

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    runtime.sweep_all()
                except Exception:
                    log.exception("sweep failed")

        self._thread = threading.Thread(target=loop, name="orchestrator-sweeper", daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
