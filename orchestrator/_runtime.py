"""The I/O loop around the engine: load, decide, commit, then send what was decided.

Both modes use this one loop; they differ only in the store and the dispatcher. A worker
that finishes a step applies its completion here itself (it has the definition and the
engine is pure), so a step hop costs one message, as in a raw Celery chain. Coordinators
run the same loop for joins, timers and recovery.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel

from . import _engine as engine
from ._config import Settings
from ._definition import Workflow
from ._dispatch.base import Dispatcher
from ._executor import run_task
from ._logging import run_context
from ._records import BranchResult, FlowSpec, RunRecord, StepSpec, Task
from ._reducers import reducers_of
from ._stores import Loaded, MemoryStore, RedisStore, RunStore

log = logging.getLogger("orchestrator")

MAX_CAS_ATTEMPTS = 50


class RunNotFound(LookupError):
    pass


class UnknownWorkflow(LookupError):
    pass


class CommitConflict(RuntimeError):
    """Too many concurrent writers on one run; nothing was committed."""


EventMaker = Callable[[RunRecord, float], engine.Event]


class Runtime:
    """Workflows this process hosts, their stores, and one dispatcher."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        settings: Settings | None = None,
        workflows: Iterable[Workflow] = (),
        store_factory: Callable[[str], RunStore] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.dispatcher = dispatcher
        self.workflows: dict[str, Workflow] = {}
        self._specs: dict[str, FlowSpec] = {}
        self._stores: dict[str, RunStore] = {}
        self._store_factory = store_factory or self._redis_store
        for wf in workflows:
            self.register(wf)

    # ---- registry ----------------------------------------------------------------------

    def register(self, wf: Workflow) -> None:
        known = self.workflows.get(wf.name)
        if known is wf:  # every start registers: keep that free
            return
        wf.check_complete()
        if known is not None and known.version != wf.version:
            raise ValueError(f"two different workflows are named {wf.name!r}")
        self.workflows[wf.name] = wf
        self._specs[wf.name] = spec_of(wf)

    def workflow(self, name: str) -> Workflow:
        try:
            return self.workflows[name]
        except KeyError:
            raise UnknownWorkflow(
                f"no workflow {name!r} here; known: {sorted(self.workflows)}") from None

    def spec(self, name: str) -> FlowSpec | None:
        return self._specs.get(name)

    def store_for(self, key_prefix: str) -> RunStore:
        store = self._stores.get(key_prefix)
        if store is None:
            store = self._stores[key_prefix] = self._store_factory(key_prefix)
        return store

    def stores(self) -> list[RunStore]:
        """One store per key prefix: workflows that share a prefix share a store."""
        prefixes = {wf.persistence_options.key_prefix for wf in self.workflows.values()}
        return [self.store_for(prefix) for prefix in sorted(prefixes)]

    def _redis_store(self, prefix: str) -> RunStore:
        return RedisStore(self.settings.redis_url, prefix, self.settings.retain_seconds)

    # ---- the loop --------------------------------------------------------------------

    def apply(
        self,
        store: RunStore,
        run_id: str,
        make_event: EventMaker,
        spec: FlowSpec | None = None,
        *,
        release: str | None = None,
        loaded: Loaded | None = None,
        run_here: Callable[[engine.Command], bool] | None = None,
    ) -> engine.Decision:
        """Decide and commit one event; retried on a concurrent write. Raises what the
        engine raises for a request that does not apply (nothing is written then).
        Commands `run_here` picks are not sent: the caller carries them out itself."""
        for _ in range(MAX_CAS_ATTEMPTS):
            current = loaded or store.load(run_id)
            loaded = None
            if current.record is None:
                raise RunNotFound(f"no run {run_id!r} in {store.key_prefix!r}")
            event = make_event(current.record, current.now)
            spec = spec or self.spec(current.record.workflow)
            decision = engine.apply(current.record, event, spec)
            if not decision.changed:
                if release is not None:  # a worker's late or duplicate result: keep a trace
                    log.info("run %s: ignored %s (%s)", run_id, type(event).__name__,
                             decision.ignored)
                    store.note(run_id, {"at": current.now, "event": "ignored",
                                        "what": type(event).__name__, "token": release,
                                        "reason": decision.ignored}, release)
                return decision
            assert decision.record is not None
            due = self._due(decision.record)
            if store.commit(current.record, current.version, decision.record, decision.history,
                            due, release):
                self.dispatcher.send([c for c in decision.commands
                                      if run_here is None or not run_here(c)])
                return decision
        raise CommitConflict(f"run {run_id}: gave up after {MAX_CAS_ATTEMPTS} conflicting writes")

    def _due(self, rec: RunRecord) -> float | None:
        return engine.next_due(rec, self.settings.redispatch_after, self.settings.join_after)

    # ---- starting -------------------------------------------------------------------

    def start(
        self, wf: Workflow, input: BaseModel | dict[str, Any], run_id: str | None = None
    ) -> tuple[str, bool]:
        """Validate, create and dispatch a run. Returns (run id, created); a run id that
        exists already is not started again."""
        self.register(wf)
        data = input.model_dump() if isinstance(input, BaseModel) else input
        model = wf.input_model.model_validate(data)  # ValidationError: nothing written
        return self.start_spec(self._specs[wf.name], wf.persistence_options.key_prefix,
                               model.model_dump(mode="json"),
                               wf.state_model().model_dump(mode="json"), run_id)

    def start_spec(
        self, spec: FlowSpec, key_prefix: str, input: dict[str, Any], state: dict[str, Any],
        run_id: str | None = None,
    ) -> tuple[str, bool]:
        """Start from validated data; for apps that know a workflow only by its catalog."""
        run_id = run_id or uuid.uuid4().hex
        _check_run_id(run_id)
        size = len(json.dumps(input))
        if size > self.settings.max_payload:
            raise ValueError(f"input is {size} bytes of JSON, over the "
                             f"{self.settings.max_payload}-byte limit (ORCHESTRATOR_MAX_PAYLOAD)")
        store = self.store_for(key_prefix)
        now = store.now()  # fails fast (StoreUnavailable) before anything is written
        d = engine.start(spec, run_id, input, state, now)
        assert d.record is not None
        if not store.create(d.record, d.history, self._due(d.record)):
            return run_id, False
        self.dispatcher.send(d.commands)
        return run_id, True

    # ---- on a worker ----------------------------------------------------------------

    def execute(self, workflow: str, run_id: str, token: int, branch: str | None = None,
                join: int | None = None) -> str:
        """Run one dispatched task if the run still expects it; commit its outcome.

        With `join`, this is a chord's body: join fork `join` first, and run the step after
        it (task `token`) only if this join is the one that closed the fork. Running it here
        saves the hop a join on the coordinator would cost."""
        wf = self.workflow(workflow)
        store = self.store_for(wf.persistence_options.key_prefix)
        if join is not None and not self._join_into(wf.name, run_id, join, token):
            return "skipped"
        lease_id = f"{token}" if branch is None else f"{token}:{branch}"
        began = store.begin_task(run_id, lease_id, self.settings.lease_ttl)
        started = time.monotonic()
        rec = began.record
        if rec is None or not engine.expects(rec, token, branch):
            log.info("run %s: token %s%s is no longer expected; skipped", run_id, token,
                     f" branch {branch}" if branch else "")
            return "skipped"
        task = rec.task if branch is None else rec.fork.branches[branch].task  # type: ignore[union-attr]
        assert task is not None
        spec = self._specs[wf.name]

        def checkpoint(patch: dict[str, Any]) -> None:
            self.apply(store, run_id, lambda r, now: engine.Checkpoint(token, now, patch), spec)

        seen = task.model_copy(update={"attempt": task.attempt + began.starts - 1})
        where = seen.step if branch is None else f"{seen.step}[{branch}]"
        with run_context(run_id, where), store.lease(run_id, lease_id, self.settings.lease_ttl):
            log.info("step started, attempt %s", seen.attempt)
            event = run_task(wf, rec, seen, max_payload=self.settings.max_payload,
                             on_checkpoint=checkpoint)
            log.info("step %s", "finished" if isinstance(event, engine.StepDone) else
                     f"failed: {event.error.type}: {event.error.message}")
        finished = began.now + (time.monotonic() - started)
        if branch is not None:
            return self._finish_branch(store, wf, rec, task, event, finished, lease_id)
        if isinstance(event, engine.StepFailed):
            event = dataclasses.replace(event, attempt=task.attempt)
        # Checkpoints of an imperative body moved the version on: reload instead of reusing.
        first = None if wf.is_imperative else dataclasses.replace(began, now=finished)
        d = self.apply(store, run_id,
                       lambda r, now: dataclasses.replace(event, now=max(now, finished)), spec,
                       release=lease_id, loaded=first)
        return "ignored" if d.ignored else "done"

    def _finish_branch(self, store: RunStore, wf: Workflow, rec: RunRecord, task: Task,
                       event: engine.StepDone | engine.StepFailed, finished: float,
                       lease_id: str) -> str:
        """A branch's success is kept beside the record (no contention between siblings);
        a failure goes through the engine (retry, or fail the run and revoke the rest)."""
        assert rec.fork is not None and task.branch is not None
        run_id, token, branch = rec.run_id, task.token, task.branch
        if isinstance(event, engine.StepFailed) and branch in store.branch_results(run_id,
                                                                                    token):
            store.note(run_id, {"at": finished, "event": "ignored", "what": "StepFailed",
                                "token": lease_id, "reason": "branch already succeeded"},
                       lease_id)
            return "ignored"
        if isinstance(event, engine.StepFailed) or event.outcome.kind == "parallel":
            # A failure (retry, or fail the run) or a branch fanning out again changes the
            # fork itself: that goes through the engine.
            changed: engine.Event = (dataclasses.replace(event, attempt=task.attempt)
                                     if isinstance(event, engine.StepFailed) else event)
            d = self.apply(store, run_id, lambda r, now: dataclasses.replace(changed, now=now),
                           self._specs[wf.name], release=lease_id)
            return "ignored" if d.ignored else "done"
        result = BranchResult(output=event.outcome.output, state_patch=event.state_patch,
                              finished_at=finished, attempt=task.attempt)
        entry = {"at": finished, "event": "branch_completed", "step": rec.fork.step,
                 "branch": branch}
        width = len(rec.fork.leaves())
        kept = store.record_branch(run_id, token, branch, result, entry, lease_id, width,
                                   finished + self.settings.join_after)
        for note in event.notes:
            store.note(run_id, {"at": finished, **note})
        if kept is None:
            store.note(run_id, {"at": finished, "event": "ignored", "what": "StepDone",
                                "token": lease_id, "reason": "fork closed or branch recorded"},
                       lease_id)
            return "ignored"
        # A retried or re-sent branch was not in the chord that was sent: that chord's join
        # came and went, so the branch that completes the fork joins it.
        if kept == width and task.attempt > 1:
            self.join(wf.name, run_id, token)
        return "done"

    def join(self, workflow: str, run_id: str, token: int,
             run_here: Callable[[engine.Command], bool] | None = None) -> engine.Decision:
        wf = self.workflow(workflow)
        store = self.store_for(wf.persistence_options.key_prefix)
        results = store.branch_results(run_id, token)
        return self.apply(store, run_id, lambda r, now: engine.Join(token, now, results),
                          self._specs[wf.name], run_here=run_here)

    def _join_into(self, workflow: str, run_id: str, token: int, then_token: int) -> bool:
        """Join fork `token`; True if that dispatched task `then_token`, which the caller
        then runs instead of sending it. A join that finds the fork still open (a branch
        retried or fanned out again) or already closed changes nothing."""

        def is_then(cmd: engine.Command) -> bool:
            return isinstance(cmd, engine.SendTask) and cmd.task.token == then_token

        return any(is_then(c) for c in self.join(workflow, run_id, token, is_then).commands)

    # ---- timers and recovery -----------------------------------------------------------

    def sweep(self, store: RunStore, limit: int | None = None) -> int:
        """One pass over runs whose timer is due: fire timers, re-drive lost work.
        Returns how many runs changed."""
        s = self.settings
        changed = 0
        backlog: dict[str, int] = {}  # one look at each queue per pass

        def queue_length(queue: str) -> int:
            if queue not in backlog:
                backlog[queue] = self.dispatcher.queue_length(queue)
            return backlog[queue]

        for run_id in store.claim_due(limit or s.sweep_batch, s.redispatch_after):
            try:
                changed += self._tick(store, run_id, queue_length)
            except Exception:  # one broken run must not stop the sweep of the others
                log.exception("run %s: sweep failed", run_id)
        return changed

    def _tick(self, store: RunStore, run_id: str, queue_length: Callable[[str], int]) -> int:
        s = self.settings
        loaded = store.load(run_id)
        if loaded.record is None:
            store.set_due(run_id, None)
            return 0
        if loaded.record.workflow not in self.workflows:
            # Another runtime shares this key prefix and hosts it (an embedded runtime
            # beside a cluster): give the claim back rather than send what it cannot run.
            store.set_due(run_id, self._due(loaded.record))
            return 0

        def tick(rec: RunRecord, now: float) -> engine.Event:
            results = store.branch_results(run_id, rec.fork.token) if rec.fork else {}
            tasks = [t for t in engine.live_tasks(rec) if t.branch not in results]
            live = store.live_leases(run_id, [t.lease_id for t in tasks])
            idle = {t.queue for t in tasks if t.lease_id not in live}
            busy = frozenset(q for q in idle if queue_length(q))
            return engine.Tick(now, live, busy, s.redispatch_after, s.join_after,
                               float(s.visibility_timeout), results)

        d = self.apply(store, run_id, tick, loaded=loaded)
        if not d.changed:
            store.set_due(run_id, self._due(loaded.record))
        return int(d.changed)

    def sweep_all(self) -> int:
        return sum(self.sweep(store) for store in self.stores())

    def close(self) -> None:
        """Stop the dispatcher's background work (an embedded sweeper) and drop connections."""
        self.dispatcher.close()
        for store in self._stores.values():
            store.close()


def spec_of(wf: Workflow) -> FlowSpec:
    steps = {}
    for name in wf.step_names():
        o = wf.step_def(name).options
        route = getattr(wf.step_def(name).fn, "__orchestrator_route__", None)
        steps[name] = StepSpec(o.queue, o.retries, o.backoff, o.backoff_factor, o.max_backoff,
                               o.timeout, route)
    return FlowSpec(wf.name, wf.version, steps, reducers_of(wf.state_model))


def _check_run_id(run_id: str) -> None:
    if not run_id or len(run_id) > 200 or any(c in run_id for c in "{}: \n\t"):
        raise ValueError(f"run id {run_id!r} must be 1-200 characters without braces, ':' "
                         f"or whitespace")


def memory_runtime(dispatcher: Dispatcher, settings: Settings | None = None) -> Runtime:
    stores: dict[str, MemoryStore] = {}

    def factory(prefix: str) -> RunStore:
        return stores.setdefault(prefix, MemoryStore(prefix))

    return Runtime(dispatcher, settings, store_factory=factory)
