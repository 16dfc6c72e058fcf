"""Worker execution: run one dispatched task if its run still expects it, commit what
happened. A worker that finishes a step applies its completion itself (it has the
definition and the engine is pure), so a step hop costs one message, as in a raw chain.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from . import _engine as engine
from ._committer import Committer
from ._definition import Workflow
from ._executor import run_task
from ._leases import LeaseKeeper
from ._logging import run_context
from ._records import RunError, RunRecord, Task
from ._stores import RunStore

log = logging.getLogger("orchestrator")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of a task, for the transport: Celery shows a committed failure as a
    FAILURE (with `error`), everything else as a success."""

    status: str  # done | retrying | failed | ignored | skipped
    error: RunError | None = None


class WorkerExecution:
    def __init__(self, committer: Committer) -> None:
        self.committer = committer
        self.hooks = committer.hooks
        self._leases: dict[int, LeaseKeeper] = {}

    def execute(self, wf: Workflow, store: RunStore, run_id: str, token: int,
                branch: str | None = None, join: int | None = None,
                attempt: int = 1) -> Outcome:
        """Run task `token` (`attempt`, as the message says) of `run_id`.

        With `join`, this is the body of a chord sent before forks were joined by their
        last branch (a run forked by an older version): join fork `join` first, and run
        the step after it (task `token`) only if this join is the one that closed it."""
        if join is not None and not self._join_into(wf, store, run_id, join, token):
            return Outcome("skipped")
        lease_id = f"{token}" if branch is None else f"{token}:{branch}"
        began = store.begin_task(run_id, lease_id, self.committer.settings.lease_ttl, attempt)
        rec = began.record
        if rec is None or not engine.expects(rec, token, branch):
            log.info("run %s: token %s%s is no longer expected; skipped", run_id, token,
                     f" branch {branch}" if branch else "")
            return Outcome("skipped")
        task = rec.task if branch is None else rec.fork.branches[branch].task  # type: ignore[union-attr]
        assert task is not None
        if rec.version != wf.version_id:
            # Sent before the run was upgraded to another version: the upgrade sent the
            # task again, to that version's queue.
            log.warning("run %s: it is on version %s, this worker runs %s; skipped",
                        run_id, rec.version, wf.version_id)
            return Outcome("skipped")
        if attempt < task.attempt:
            # A message of an attempt the run has moved past (the sweep re-sent the task,
            # or the broker gave an old copy back): the current attempt's message runs it.
            log.info("run %s: attempt %s of token %s is superseded by attempt %s; skipped",
                     run_id, attempt, token, task.attempt)
            return Outcome("skipped")
        deaths = began.starts - 1  # deliveries of this attempt that never finished
        if deaths > task.policy.retries + 1:  # one crash is forgiven, as a redelivery
            return self._worker_lost(wf, store, rec, task, deaths, began.now, lease_id)
        seen = task.model_copy(update={"attempt": task.attempt + deaths})
        event, took = self._run(wf, store, rec, seen, lease_id)
        finished = began.now + took
        event = dataclasses.replace(event, now=finished)
        if branch is not None:
            return self._finish_branch(wf, store, rec, event, lease_id)
        if isinstance(event, engine.StepFailed):
            event = dataclasses.replace(event, attempt=task.attempt)
        # Checkpoints of an imperative body moved the version on: reload instead of reusing.
        first = None if wf.is_imperative else dataclasses.replace(began, now=finished)
        final = event
        d = self.committer.apply(
            store, run_id, lambda r, now: dataclasses.replace(final, now=max(now, finished)),
            self.committer.registry.spec(wf.name), release=lease_id, loaded=first)
        return _outcome_of(d, event)

    def _run(self, wf: Workflow, store: RunStore, rec: RunRecord, task: Task,
             lease_id: str) -> tuple[engine.StepDone | engine.StepFailed, float]:
        """Run the user's code under a lease: its event, and the seconds it took."""
        spec = self.committer.registry.spec(wf.name)
        token = task.token

        def checkpoint(patch: dict[str, Any]) -> None:
            self.committer.apply(store, rec.run_id,
                                 lambda r, now: engine.Checkpoint(token, now, patch), spec)

        if self.hooks:
            self.hooks.call("before_step", rec, task)
        started = time.monotonic()
        with (run_context(rec.run_id, task.where),
              self._keeper(store).hold(rec.run_id, lease_id, self.committer.settings.lease_ttl)):
            log.info("step started, attempt %s", task.attempt)
            event = run_task(wf, rec, task, max_payload=self.committer.settings.max_payload,
                             on_checkpoint=checkpoint, children=self._children)
            log.info("step %s", "finished" if isinstance(event, engine.StepDone) else
                     f"failed: {event.error.type}: {event.error.message}")
        took = time.monotonic() - started
        if self.hooks:
            if isinstance(event, engine.StepFailed):
                self.hooks.call("step_failed", rec, task, event.error)
            self.hooks.call("after_step", rec, task, isinstance(event, engine.StepFailed), took)
        return event, took

    def _worker_lost(self, wf: Workflow, store: RunStore, rec: RunRecord, task: Task,
                     deaths: int, now: float, lease_id: str) -> Outcome:
        """The process running this step died `deaths` times (SystemExit, os._exit, a
        segfault, the OOM killer): past the step's retry budget, fail it instead of
        running it again, or it would be redelivered forever."""
        error = RunError(step=task.where, type="WorkerLost",
                         message=f"the worker process died {deaths} times while running "
                                 f"step {task.where}")
        log.error("run %s: %s", rec.run_id, error.message)
        failed = engine.StepFailed(task.token, now, error, retryable=False, branch=task.branch,
                                   attempt=task.attempt)
        if task.branch is not None:
            return self._finish_branch(wf, store, rec, failed, lease_id)
        d = self.committer.apply(store, rec.run_id,
                                 lambda r, t: dataclasses.replace(failed, now=t),
                                 self.committer.registry.spec(wf.name), release=lease_id)
        return _outcome_of(d, failed)

    def _finish_branch(self, wf: Workflow, store: RunStore, rec: RunRecord,
                       event: engine.StepDone | engine.StepFailed, lease_id: str) -> Outcome:
        assert rec.fork is not None and event.branch is not None
        succeeded = (isinstance(event, engine.StepFailed)
                     and event.branch in store.branch_results(rec.run_id, event.token))
        verdict = engine.settle_branch(rec, event, succeeded)
        if isinstance(verdict, engine.IgnoreBranch):
            self.committer.note_ignored(store, rec.run_id, event.now, type(event).__name__,
                                        lease_id, verdict.reason)
            return Outcome("ignored")
        if isinstance(verdict, engine.ApplyToRun):
            changed = verdict.event
            assert not isinstance(changed, engine.ChildEnded)  # settle_branch never gives one
            d = self.committer.apply(store, rec.run_id,
                                     lambda r, now: dataclasses.replace(changed, now=now),
                                     self.committer.registry.spec(wf.name), release=lease_id)
            return _outcome_of(d, changed)
        assert isinstance(event, engine.StepDone)
        kept = self.committer.keep_branch(store, rec.run_id, event.token, event.branch,
                                          verdict, lease_id, event.now)
        for note in event.notes:
            store.note(rec.run_id, {"at": event.now, **note})
        if kept is None:
            self.committer.note_ignored(store, rec.run_id, event.now, "StepDone", lease_id,
                                        "fork closed or branch recorded")
            return Outcome("ignored")
        if kept >= verdict.width:  # the last result: this branch joins the fork
            self.join(wf, store, rec.run_id, event.token)
        return Outcome("done")

    def join(self, wf: Workflow, store: RunStore, run_id: str, token: int,
             run_here: Any = None) -> engine.Decision:
        return self.committer.join(store, run_id, token, self.committer.registry.spec(wf.name),
                                   run_here)

    def _join_into(self, wf: Workflow, store: RunStore, run_id: str, token: int,
                   then_token: int) -> bool:
        """Join fork `token`; True if that dispatched task `then_token`, which the caller
        then runs instead of sending it. A join that finds the fork still open (a branch
        retried or fanned out again) or already closed changes nothing."""

        def is_then(cmd: engine.Command) -> bool:
            return isinstance(cmd, engine.SendTask) and cmd.task.token == then_token

        return any(is_then(c) for c in self.join(wf, store, run_id, token, is_then).commands)

    def _children(self, workflow: Workflow | str, input: Any) -> tuple[str, str, dict[str, Any]]:
        if self.committer.children is None:
            raise LookupError("this runtime cannot start child workflows")
        return self.committer.children.resolve(workflow, input)

    def close(self) -> None:
        for keeper in self._leases.values():
            keeper.close()

    def _keeper(self, store: RunStore) -> LeaseKeeper:
        keeper = self._leases.get(id(store))
        if keeper is None:
            keeper = self._leases[id(store)] = LeaseKeeper(store)
        return keeper


def _outcome_of(d: engine.Decision, event: engine.StepDone | engine.StepFailed) -> Outcome:
    if d.ignored:
        return Outcome("ignored")
    if isinstance(event, engine.StepFailed):
        ended = d.record is not None and d.record.status.is_terminal
        return Outcome("failed" if ended else "retrying", event.error)
    return Outcome("done")
