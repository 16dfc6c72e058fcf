"""Child runs: start them, stop them with their parent, tell the parent when they end.

These are the engine's commands that act on other runs rather than on queues. Each is
carried out after the commit that decided it, and each is safe to repeat: a child's run
id comes from its parent's (a second start finds it exists), a stop of a finished run is
a no-op, and a parent ignores news of a child it no longer waits for. What a crash
interrupts the sweep repeats: the parent's timer re-sends a start until it sees the
child, the child's timer re-tells a parent until the parent has heard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from . import _engine as engine
from . import _tracing
from ._committer import Committer, RunNotFound
from ._definition import Workflow
from ._records import FlowSpec, ParentLink
from ._registry import UnknownWorkflow, spec_of
from ._stores import RunStore

log = logging.getLogger("orchestrator")


class ChildTarget:
    """A workflow a child run can be started of: hosted here, or published in the catalog."""

    def __init__(self, spec: FlowSpec, key_prefix: str, initial_state: dict[str, Any],
                 check_input: Callable[[Any], dict[str, Any]]) -> None:
        self.spec = spec
        self.key_prefix = key_prefix
        self.initial_state = initial_state
        self.check_input = check_input


# A catalog lookup by workflow name (None: not published), for workflows not hosted here.
Published = Callable[[str], ChildTarget | None]


class ChildRuns:
    def __init__(self, committer: Committer, store_for: Callable[[str], RunStore],
                 register: Callable[[Workflow], None], published: Published | None = None):
        self.committer = committer
        self.store_for = store_for
        self.register = register
        self.published = published

    def resolve(self, workflow: Workflow | str, input: Any) -> tuple[str, str, dict[str, Any]]:
        """The child's name, key prefix and validated input, for a step that calls it. A
        Workflow object is hosted here from now on, so this process can run it too."""
        if isinstance(workflow, Workflow):
            self.register(workflow)
            workflow = workflow.name
        target = self.target(workflow)
        return workflow, target.key_prefix, target.check_input(input)

    def target(self, name: str) -> ChildTarget:
        wf = self.committer.registry.workflows.get(name)
        if wf is not None:
            return ChildTarget(
                spec_of(wf), wf.persistence_options.key_prefix,
                wf.state_model().model_dump(mode="json"),
                lambda data: wf.input_model.model_validate(data).model_dump(mode="json"))
        found = self.published(name) if self.published is not None else None
        if found is None:
            raise UnknownWorkflow(f"no workflow {name!r} is hosted here or published")
        return found

    def exists(self, key_prefix: str, run_id: str) -> bool:
        return self.store_for(key_prefix).load(run_id).record is not None

    def ended(self, key_prefix: str, run_id: str) -> bool:
        """The run has ended, or is gone (never started, or its retention ended)."""
        record = self.store_for(key_prefix).load(run_id).record
        return record is None or record.status.is_terminal

    def carry_out(self, store: RunStore, command: engine.Command) -> None:
        try:
            if isinstance(command, engine.StartChild):
                self._start(store, command)
            elif isinstance(command, engine.StopChild):
                self._stop(command)
            elif isinstance(command, engine.NotifyParent):
                self._notify(store, command)
        except Exception as exc:  # the sweep repeats it; the commit that decided it stands
            log.warning("%s for run %s failed (%s: %s); the recovery sweep will repeat it",
                        type(command).__name__, getattr(command, "run_id", "?"),
                        type(exc).__name__, exc)

    def _start(self, store: RunStore, c: engine.StartChild) -> None:
        target = self.target(c.workflow)
        link = ParentLink(run_id=c.parent_run_id, key_prefix=store.key_prefix, step=c.step,
                          token=c.token, branch=c.branch)
        with _tracing.within(c.trace_context):
            self.committer.start(self.store_for(c.key_prefix), target.spec, c.input,
                                 dict(target.initial_state), c.run_id, parent=link)

    def _stop(self, c: engine.StopChild) -> None:
        # It may have ended already, or never started (its parent no longer asks for it).
        with contextlib.suppress(engine.ControlError, RunNotFound):
            self.committer.apply(self.store_for(c.key_prefix), c.run_id,
                                 lambda r, now: engine.Stop(now, c.reason))

    def _notify(self, store: RunStore, c: engine.NotifyParent) -> None:
        link = c.parent
        parents = self.store_for(link.key_prefix)
        with contextlib.suppress(RunNotFound):  # its retention ended: nobody left to tell
            if link.branch is None:
                self.committer.apply(
                    parents, link.run_id,
                    lambda r, now: engine.ChildEnded(now, link.token, c.run_id, c.status,
                                                     c.state, c.output, c.error))
            else:
                self._branch_ended(parents, link.run_id, engine.ChildEnded(
                    parents.now(), link.token, c.run_id, c.status, c.state, c.output, c.error,
                    link.branch))
        self.committer.apply(store, c.run_id, lambda r, now: engine.ParentNotified(now))

    def _branch_ended(self, store: RunStore, run_id: str, ended: engine.ChildEnded) -> None:
        """A branch's child ended: keep its result as the branch's (and join the fork if it
        was the last, where the parent's workflow is hosted; else the sweep joins it)."""
        assert ended.branch is not None
        parent = store.load(run_id).record
        if parent is None:
            return
        verdict = engine.settle_child_branch(parent, ended)
        lease = f"{ended.token}:{ended.branch}"
        if isinstance(verdict, engine.IgnoreBranch):
            self.committer.note_ignored(store, run_id, ended.now, "ChildEnded", lease,
                                        verdict.reason)
        elif isinstance(verdict, engine.ApplyToRun):
            failed = verdict.event
            self.committer.apply(store, run_id,
                                 lambda r, now: dataclasses.replace(failed, now=now))
        else:
            kept = self.committer.keep_branch(store, run_id, ended.token, ended.branch,
                                              verdict, lease, ended.now)
            spec = self.committer.registry.spec(parent.workflow)
            if kept is not None and kept >= verdict.width and spec is not None:
                self.committer.join(store, run_id, ended.token, spec)
