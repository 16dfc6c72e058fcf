"""WorkflowRunner and RunHandle: how apps start runs and control them."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from celery import Celery
from pydantic import BaseModel

from . import _engine as engine
from ._celery import OrchestratorApp
from ._config import Settings
from ._definition import DefinitionError, Workflow
from ._dispatch.local import LocalDispatcher
from ._middleware import Middleware
from ._records import Gate, RunRecord, RunResult, RunStatus
from ._runtime import RunNotFound, Runtime
from ._stores import MemoryStore, RedisStore, RunStore


def embedded_runtime(settings: Settings | None = None,
                     middleware: Iterable[Middleware] = ()) -> Runtime:
    """An in-process runtime (a thread pool). Each workflow's runs live where its
    `.persistence()` says: in memory by default, in Redis with `store="redis"`."""
    settings = settings or Settings.from_env()
    memory: dict[str, RunStore] = {}

    def store_for(prefix: str) -> RunStore:
        hosted = [wf for wf in runtime.workflows.values()
                  if wf.persistence_options.key_prefix == prefix]
        if any(wf.persistence_options.store == "redis" for wf in hosted):
            return RedisStore.from_settings(settings, prefix)
        return memory.setdefault(prefix, MemoryStore(prefix, settings.retain_seconds,
                                                     settings.history_limit))

    dispatcher = LocalDispatcher()
    runtime = Runtime(dispatcher, settings, store_factory=store_for, middleware=middleware)
    dispatcher.bind(runtime)
    return runtime


def local_runtime(store: RunStore, settings: Settings | None = None) -> Runtime:
    """An in-process runtime over a given store (e.g. a RedisStore, to survive restarts)."""
    dispatcher = LocalDispatcher()
    runtime = Runtime(dispatcher, settings, store_factory=lambda prefix: store)
    dispatcher.bind(runtime)
    return runtime


class WorkflowRunner:
    """Starts runs of one workflow.

    `WorkflowRunner(wf)` runs in this process (embedded) on a runtime of its own, which
    `close()` (or leaving a `with` block) stops; `WorkflowRunner(wf, app=app)` enqueues
    on a Celery cluster whose state lives in Redis.
    """

    def __init__(
        self, workflow: Workflow, *, app: Celery | None = None, runtime: Runtime | None = None,
        middleware: Iterable[Middleware] = (),
    ) -> None:
        workflow.check_complete()
        self.workflow = workflow
        durable = workflow.persistence_options
        if app is not None and durable.in_memory:
            raise DefinitionError(
                f"{workflow.name} keeps its state in memory (.persistence(enabled="
                f"{durable.enabled}, store={durable.store!r})): it can only run embedded")
        self._owned: Runtime | None = None
        if app is not None:
            if not isinstance(app, OrchestratorApp):
                raise TypeError("app must come from orchestrator.create_app()")
            app.host(workflow)
            runtime = app.runtime
        if runtime is None:
            runtime = self._owned = embedded_runtime(middleware=middleware)
        self.runtime = runtime
        self.runtime.register(workflow)
        self.store = self.runtime.store_for(workflow.persistence_options.key_prefix)

    def close(self) -> None:
        """Stop the embedded runtime this runner made (a runtime or app passed in is the
        caller's to close). Runs not finished by then stop where they are."""
        if self._owned is not None:
            self._owned.close()

    def __enter__(self) -> WorkflowRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, input: BaseModel | dict[str, Any] | None = None, *,
            run_id: str | None = None) -> RunHandle:
        """Validate `input` and start a run. Invalid input raises pydantic's ValidationError
        and creates nothing; a `run_id` that exists already returns a handle to that run."""
        run_id, _ = self.runtime.start(self.workflow, input or {}, run_id)
        return RunHandle(run_id, self.runtime, self.store)

    def attach(self, run_id: str) -> RunHandle:
        """A handle to an existing run, from any process."""
        handle = RunHandle(run_id, self.runtime, self.store)
        handle.record()  # RunNotFound now rather than on first use
        return handle

    def pending_gates(self, approver: str | None = None) -> list[RunRecord]:
        """Runs of this store waiting at a gate, optionally only those `approver` may decide."""
        return self.store.pending_gates(approver)

    def recover(self) -> int:
        """One recovery sweep over this workflow's store; returns runs moved on."""
        return self.runtime.sweep(self.store)


# Seconds between looks at a run whose end will be announced (a safety net, not a poll).
LOOK_AGAIN_EVERY = 2.0


class RunFailed(RuntimeError):
    """A run ended failed or stopped; `.result` holds its RunResult (error included)."""

    def __init__(self, result: RunResult) -> None:
        detail = f": {result.error}" if result.error else ""
        super().__init__(f"run {result.run_id} {result.status.value}{detail}")
        self.result = result


class RunHandle:
    def __init__(self, run_id: str, runtime: Runtime, store: RunStore) -> None:
        self.run_id = run_id
        self._runtime = runtime
        self._store = store

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id!r})"

    # ---- reading ------------------------------------------------------------------------

    def record(self) -> RunRecord:
        rec = self._store.load(self.run_id).record
        if rec is None:
            raise RunNotFound(f"no run {self.run_id!r}")
        return rec

    def status(self) -> RunStatus:
        return self.record().status

    def gate(self) -> Gate | None:
        """The gate the run waits at (approvers, prompt, payload, approvals so far)."""
        return self.record().gate

    def history(self, start: int = 0) -> list[dict[str, Any]]:
        return self._store.history(self.run_id, start)

    def result(self, timeout: float | None = None, poll: float = 0.02, *,
               raise_on_failure: bool = False) -> RunResult:
        """Wait until the run has completed, failed or stopped. TimeoutError if not by then.
        The store tells the handle when the run ends (Redis pub/sub); `poll` is the first
        interval where it cannot (then up to 0.25 s).

        With `raise_on_failure=True` a run that failed or was stopped raises `RunFailed`
        (carrying the result) instead of returning it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = poll

        def ended() -> RunResult | None:
            rec = self.record()
            if not rec.status.is_terminal:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"run {self.run_id} is still {rec.status.value} after {timeout}s")
                return None
            result = RunResult(run_id=rec.run_id, status=rec.status, state=rec.state,
                               step_results=rec.step_results, output=rec.output,
                               error=rec.error)
            if raise_on_failure and result.status is not RunStatus.COMPLETED:
                raise RunFailed(result)
            return result

        if timeout is not None and timeout <= 0:
            # A caller that will not wait (a poll) needs one read and no subscription: a
            # poller looking every few ms would otherwise open and close a pub/sub
            # subscription each time.
            result = ended()  # TimeoutError if the run has not ended
            assert result is not None
            return result
        # Told when the run ends (pub/sub on Redis); where that cannot be, or a word was
        # lost (a process died right after the commit), looking again now and then.
        with self._store.watch_end(self.run_id) as watch:
            while True:
                if (result := ended()) is not None:
                    return result
                pause = LOOK_AGAIN_EVERY if watch.live else wait
                watch.wait(pause if deadline is None
                           else min(pause, max(0.0, deadline - time.monotonic())))
                wait = min(wait * 1.5, 0.25)

    # ---- control ----------------------------------------------------------------------

    # `by` and `source` go to the run's history: who asked, and through what ("cli",
    # "client", "api", "console"). `by` here is what the caller says: code that holds
    # Redis credentials is trusted to name itself.

    def pause(self, *, by: str | None = None, source: str = "client") -> None:
        """Let the step in flight finish; start nothing new until resume()."""
        self._apply(lambda r, now: engine.Pause(now, by, source))

    def resume(self, *, by: str | None = None, source: str = "client") -> None:
        self._apply(lambda r, now: engine.Resume(now, by, source))

    def stop(self, reason: str | None = None, *, by: str | None = None,
             source: str = "client") -> None:
        """Revoke what is in flight; no step starts after this returns."""
        self._apply(lambda r, now: engine.Stop(now, reason, by, source))

    def send(self, name: str, payload: Any = None, *, key: str | None = None) -> str:
        """Send event `name` to the run. Returns "delivered" (its wait took it), "queued"
        (kept in the run's mailbox for its next wait for `name`) or "duplicate" (`key` was
        sent before: stored once). The payload is checked against the event's declared
        model first: InvalidEvent, and nothing is stored, if it does not fit."""
        return self._runtime.send(self._store, self.run_id, name, payload, key)

    def approve(self, by: str, comment: str | None = None, *,
                groups: Iterable[str] = (), source: str = "client") -> None:
        """Decide the gate as `by`, a member of `groups` (for `group:<g>` approvers);
        PermissionError if neither is listed."""
        member = frozenset(groups)
        self._apply(lambda r, now: engine.Decide(now, True, by, comment, member, source))

    def reject(self, by: str, reason: str | None = None, *,
               groups: Iterable[str] = (), source: str = "client") -> None:
        member = frozenset(groups)
        self._apply(lambda r, now: engine.Decide(now, False, by, reason, member, source))

    def _apply(self, make: Any) -> None:
        self._runtime.apply(self._store, self.run_id, make)
