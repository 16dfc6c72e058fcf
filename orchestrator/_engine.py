"""The engine: (run record, event) -> (new record, commands). Pure: no I/O, no clocks.

Every rule about what happens next lives here: a step's transition, retries, gates,
fan-out and join, pause, resume, stop and the recovery sweep's timers. Callers pass the
time in the event, gather facts (which leases are alive) before calling, and carry out
the commands after committing the new record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from ._records import (
    Approval,
    BranchResult,
    BranchState,
    ChildCall,
    ChildStop,
    EventWait,
    FlowSpec,
    Fork,
    Gate,
    Message,
    ParentLink,
    RunError,
    RunRecord,
    RunStatus,
    StepPolicy,
    Task,
    Timer,
    clone,
)

START = "__start__"
END = "__end__"


# Re-sends of lost work a step gets beyond its retries before the run fails with WorkerLost.
LOST_ALLOWANCE = 3
# Send keys a run remembers (the newest), so a webhook's retries are stored once.
EVENT_KEYS_KEPT = 1000
# Events a run keeps unread before a sender is refused.
MAILBOX_LIMIT = 1000


class ControlError(RuntimeError):
    """A control request that does not apply to the run as it is (finished, no gate...)."""


# ---- events -------------------------------------------------------------------------


@dataclass(frozen=True)
class GateSpec:
    approvers: tuple[str, ...]
    then: str
    min_approvals: int = 1
    timeout: float | None = None
    on_timeout: str | None = None
    on_reject: str | None = None
    prompt: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BranchSpec:
    name: str
    ref: str
    policy: StepPolicy = field(default_factory=StepPolicy)
    item: Any = None
    has_item: bool = False
    children: tuple[BranchSpec, ...] = ()  # a nested fan-out, flattened into the fork


# ---- what a step did, reduced to data by the executor ----------------------------------


@dataclass(frozen=True)
class GoTo:
    """Continue at `target` (END finishes the run); `output` is the step's result."""

    target: str
    output: Any = None
    has_output: bool = False


@dataclass(frozen=True)
class WaitFor:
    """Park the run at a gate."""

    gate: GateSpec


@dataclass(frozen=True)
class Doze:
    """Sleep on a durable timer, then continue at `then`: for `seconds` from when the
    engine applies it, or until the epoch time `until`."""

    then: str
    seconds: float | None = None
    until: float | None = None


@dataclass(frozen=True)
class Expect:
    """Wait for an event named `name`, then continue at `then`."""

    name: str
    then: str
    timeout: float | None = None
    on_timeout: str | None = None


Arm = WaitFor | Doze | Expect


@dataclass(frozen=True)
class FirstOf:
    """Wait for whichever of `arms` happens first (an AnyOf); each arm has its own `then`."""

    arms: dict[str, Arm]


@dataclass(frozen=True)
class Spawn:
    """Start child run `run_id` of `workflow` with (validated) `input`, continue at `then`
    when it ends; a failed or stopped child goes to `on_failure`, or fails the step."""

    workflow: str
    key_prefix: str
    input: dict[str, Any]
    then: str
    on_failure: str | None = None


@dataclass(frozen=True)
class FanOut:
    """Run `branches` in parallel, gathered at `then` (a branch's nested fan-out: None)."""

    branches: tuple[BranchSpec, ...]
    then: str | None = None


Outcome = GoTo | WaitFor | Doze | Expect | FirstOf | Spawn | FanOut


@dataclass(frozen=True)
class StepDone:
    token: int
    now: float
    state_patch: dict[str, Any]
    outcome: Outcome
    branch: str | None = None
    notes: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class StepFailed:
    token: int
    now: float
    error: RunError
    retryable: bool = True
    branch: str | None = None
    attempt: int = 0  # a failure of an older attempt than the current one is stale
    notes: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Checkpoint:
    token: int
    now: float
    state_patch: dict[str, Any]


# Controls and decisions carry who asked (`by`, when known) and where it came from
# (`source`: "console", "api", "cli", "client"); both go to the run's history.


@dataclass(frozen=True)
class Pause:
    now: float
    by: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Resume:
    now: float
    by: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Stop:
    now: float
    reason: str | None = None
    by: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Decide:
    """A decision by `by`, a member of `groups` (the caller looked them up: the engine is
    pure). A gate's approver `group:<g>` admits any member of g; quorum counts users."""

    now: float
    approve: bool
    by: str
    comment: str | None = None
    groups: frozenset[str] = frozenset()
    source: str | None = None


@dataclass(frozen=True)
class Deliver:
    """An event sent to the run (its payload already checked against the declared model)."""

    now: float
    name: str
    payload: Any = None
    key: str | None = None


@dataclass(frozen=True)
class ChildEnded:
    """Child run `run_id`, called by task `token`, ended."""

    now: float
    token: int
    run_id: str
    status: str
    state: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    error: RunError | None = None
    branch: str | None = None

    def result(self) -> dict[str, Any]:
        """What the calling step (or branch) gets: the child's end."""
        out: dict[str, Any] = {"run_id": self.run_id, "status": self.status,
                               "state": self.state, "output": self.output}
        if self.error is not None:
            out["error"] = self.error.model_dump(mode="json", exclude_none=True)
        return out


@dataclass(frozen=True)
class ParentNotified:
    now: float


@dataclass(frozen=True)
class Upgrade:
    """Move the run to the definition `spec` (another version of its workflow): the steps
    it may be at renamed by `steps` (old -> new), its state replaced by `state` (already
    converted and validated). `running`: lease ids of its tasks a worker holds now."""

    now: float
    spec: FlowSpec
    steps: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    running: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Join:
    token: int
    now: float
    results: dict[str, BranchResult] = field(default_factory=dict)


@dataclass(frozen=True)
class Tick:
    """The sweep looks at a run: fire due timers, re-drive lost work."""

    now: float
    live_tasks: frozenset[str] = frozenset()
    busy_queues: frozenset[str] = frozenset()  # queues with messages still waiting
    redispatch_after: float = 60.0
    join_after: float = 5.0
    force_after: float = 3600.0  # resend even behind a backlog after this long
    branch_results: dict[str, BranchResult] = field(default_factory=dict)
    queued: frozenset[str] = frozenset()  # leases whose message still waits in its queue
    children_seen: frozenset[str] = frozenset()  # child runs whose record exists
    children_ended: frozenset[str] = frozenset()  # of those it stops: ended, or gone


Event = (StepDone | StepFailed | Checkpoint | Pause | Resume | Stop | Decide | Join | Tick
         | Deliver | ChildEnded | ParentNotified | Upgrade)


# ---- commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class SendTask:
    run_id: str
    workflow: str
    task: Task
    version: str = ""  # the run's: only a worker hosting it may run the task


@dataclass(frozen=True)
class SendFork:
    """Send the branches of fork `token`, as one group: the fork is joined by whichever
    branch keeps the last result (KeepBranch), and the join sends the step after it."""

    run_id: str
    workflow: str
    token: int
    tasks: tuple[Task, ...]
    version: str = ""


@dataclass(frozen=True)
class Revoke:
    """Withdraw tasks in flight (a stop, or the siblings of a branch that failed the run)."""

    run_id: str
    tasks: tuple[Task, ...]


@dataclass(frozen=True)
class StartChild:
    """Create child run `run_id` (a run id that exists already is left as it is)."""

    parent_run_id: str
    step: str
    token: int
    run_id: str
    workflow: str
    key_prefix: str
    input: dict[str, Any]
    branch: str | None = None
    trace_context: dict[str, str] | None = None  # the parent's: the child joins its trace


@dataclass(frozen=True)
class StopChild:
    run_id: str
    key_prefix: str
    reason: str


@dataclass(frozen=True)
class NotifyParent:
    """Tell the parent that this run (`run_id`) ended."""

    run_id: str
    parent: ParentLink
    status: str
    state: dict[str, Any]
    output: Any
    error: RunError | None


Command = SendTask | SendFork | Revoke | StartChild | StopChild | NotifyParent
RUN_COMMANDS = (StartChild, StopChild, NotifyParent)  # carried out on runs, not queues


@dataclass
class Decision:
    record: RunRecord | None
    commands: list[Command] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    ignored: str | None = None

    @property
    def changed(self) -> bool:
        return self.record is not None


def _ignore(reason: str) -> Decision:
    return Decision(None, ignored=reason)


# ---- entry points ---------------------------------------------------------------------


def start(
    spec: FlowSpec, run_id: str, input: dict[str, Any], state: dict[str, Any], now: float,
    parent: ParentLink | None = None, by: str | None = None, source: str | None = None,
) -> Decision:
    """A new run, with its first step dispatched; `by` and `source` say who started it."""
    rec = RunRecord(
        run_id=run_id, workflow=spec.workflow, version=spec.version, status=RunStatus.RUNNING,
        input=input, state=state, created_at=now, updated_at=now, parent=parent,
    )
    d = Decision(rec)
    _log(d, now, "started", workflow=spec.workflow, version=spec.version,
         parent=parent.run_id if parent else None, by=by, source=source if by else None)
    _goto(d, spec, START, now)
    return d


def apply(record: RunRecord, event: Event, spec: FlowSpec | None = None) -> Decision:
    """Decide what `event` does to `record`. The input record is never mutated."""
    rec = clone(record)
    handler = _HANDLERS[type(event)]
    d: Decision = handler(rec, event, spec)
    if d.record is not None and isinstance(event, StepDone | StepFailed):
        d.history[:0] = [{"at": event.now, **n} for n in event.notes]
    if d.record is not None:
        d.record.updated_at = max(d.record.updated_at, getattr(event, "now", 0.0))
        _settle(d.record)
        if d.record.status.is_terminal and not record.status.is_terminal:
            _notify_parent(d)
    return d


def next_due(rec: RunRecord, redispatch_after: float, join_after: float) -> float | None:
    """When the sweep must next look at this run if nothing else happens (None: never)."""
    if rec.status.is_terminal:
        # Until the parent has heard that this child ended, the sweep tells it again; and
        # until the children it stopped have ended, the sweep stops them again.
        unheard = rec.parent is not None and not rec.parent.notified
        return rec.updated_at + join_after if unheard or rec.stopping else None
    times: list[float] = []
    if rec.gate is not None and rec.gate.timeout_at is not None:
        times.append(rec.gate.timeout_at)
    if rec.timer is not None:
        times.append(rec.timer.wake_at)
    times += [w.timeout_at for w in rec.events if w.timeout_at is not None]
    if rec.child is not None and not rec.child.started:
        times.append(rec.child.called_at + join_after)
    if rec.task is not None:
        if rec.task.dispatched_at is None:
            if not rec.paused:
                times.append(rec.task.due_at)
        else:
            times.append(rec.task.dispatched_at + redispatch_after)
    if rec.fork is not None:
        # Which branches finished is not in the record; the store brings the timer forward
        # to finished + join_after when the last branch records its result.
        for b in rec.fork.leaves().values():
            if b.child is not None:
                if not b.child.started:
                    times.append(b.child.called_at + join_after)
            elif b.task.dispatched_at is not None:
                times.append(b.task.dispatched_at + redispatch_after)
            elif not rec.paused:
                times.append(b.task.due_at)
    return min(times) if times else None


def live_tasks(rec: RunRecord) -> list[Task]:
    """Tasks dispatched and unfinished: what a stop revokes, what holds leases."""
    tasks = []
    if rec.task is not None and rec.task.dispatched_at is not None:
        tasks.append(rec.task)
    if rec.fork is not None:
        tasks += [b.task for b in rec.fork.leaves().values()
                  if b.task.dispatched_at is not None and b.child is None]
    return tasks


def pending_children(rec: RunRecord) -> list[ChildCall]:
    """Calls whose child the sweep has not yet seen started."""
    calls = [rec.child] if rec.child is not None else []
    if rec.fork is not None:
        calls += [b.child for b in rec.fork.leaves().values() if b.child is not None]
    return [c for c in calls if not c.started]


def expects(rec: RunRecord, token: int, branch: str | None) -> bool:
    """Whether a worker holding (token, branch) should run: the run still waits for it."""
    if rec.status.is_terminal:
        return False
    if branch is None:
        return rec.task is not None and rec.task.token == token
    return (rec.fork is not None and rec.fork.token == token and branch in rec.fork.branches
            and rec.fork.branches[branch].is_leaf and rec.fork.branches[branch].child is None)


@dataclass(frozen=True)
class KeepBranch:
    """A branch succeeded: keep its result beside the record (siblings finishing at once do
    not contend for the record). Once `width` results are kept, the fork is complete, and
    the branch that kept the last one joins it (a join that finds a leaf still running,
    after a sibling fanned out again, changes nothing)."""

    result: BranchResult
    entry: dict[str, Any]
    width: int


@dataclass(frozen=True)
class ApplyToRun:
    """A branch failed or fanned out again: that changes the fork, through `apply`."""

    event: StepDone | StepFailed | ChildEnded


@dataclass(frozen=True)
class IgnoreBranch:
    reason: str


BranchVerdict = KeepBranch | ApplyToRun | IgnoreBranch


def settle_branch(rec: RunRecord, ev: StepDone | StepFailed, succeeded: bool) -> BranchVerdict:
    """What a finished branch task does. `succeeded`: the branch has a result kept already
    (the caller looks only when `ev` is a failure)."""
    if ev.branch is None or rec.fork is None or not expects(rec, ev.token, ev.branch):
        return IgnoreBranch("fork closed or branch not expected")
    task = rec.fork.branches[ev.branch].task
    if isinstance(ev, StepFailed):
        if succeeded:
            return IgnoreBranch("branch already succeeded")
        return ApplyToRun(replace(ev, attempt=task.attempt))
    if isinstance(ev.outcome, FanOut | Spawn):
        return ApplyToRun(ev)
    assert isinstance(ev.outcome, GoTo)
    result = BranchResult(output=ev.outcome.output, state_patch=ev.state_patch,
                          finished_at=ev.now, attempt=task.attempt)
    entry = {"at": ev.now, "event": "branch_completed", "step": rec.fork.step,
             "branch": ev.branch}
    return KeepBranch(result, entry, len(rec.fork.leaves()))


def settle_child_branch(rec: RunRecord, ev: ChildEnded) -> BranchVerdict:
    """A branch's child ended: its result is the branch's output, kept like a branch's own;
    a child that failed or stopped fails the branch."""
    b = _branch_calling(rec, ev)
    if b is None:
        return IgnoreBranch(f"not waiting for child {ev.run_id}")
    assert rec.fork is not None
    fork = rec.fork
    if ev.status != RunStatus.COMPLETED.value:
        return ApplyToRun(ev)
    result = BranchResult(output=ev.result(), finished_at=ev.now, attempt=b.task.attempt)
    entry = {"at": ev.now, "event": "branch_completed", "step": fork.step,
             "branch": ev.branch, "child": ev.run_id}
    return KeepBranch(result, entry, len(fork.leaves()))


# ---- handlers -------------------------------------------------------------------------


def _on_step_done(rec: RunRecord, ev: StepDone, spec: FlowSpec | None) -> Decision:
    if not expects(rec, ev.token, ev.branch):
        return _ignore(f"stale completion for token {ev.token}")
    if ev.branch is not None:
        if isinstance(ev.outcome, Spawn):
            return _branch_call(Decision(rec), ev.branch, ev.outcome, ev.now)
        if not isinstance(ev.outcome, FanOut):
            raise ValueError("branch results are recorded beside the run, not applied to it")
        return _expand(Decision(rec), ev.branch, ev.outcome, ev)
    assert rec.task is not None
    spec = _need(spec)
    step = rec.task.step
    d = Decision(rec)
    rec.task = None
    rec.state = {**rec.state, **ev.state_patch}
    out = ev.outcome
    if isinstance(out, GoTo) and out.has_output:
        rec.step_results[step] = out.output
        rec.event_steps.pop(step, None)
    _log(d, ev.now, "step_completed", step=step, next=_label(out))
    if isinstance(out, GoTo):
        if out.target == END:
            rec.status, rec.output, rec.current_step = RunStatus.COMPLETED, out.output, None
            _log(d, ev.now, "completed")
            return d
        if out.target not in spec.steps or out.target == START:
            return _fail(d, ev.now, step, "UnknownStep",
                         f"step {step!r} returned {out.target!r}, which is not a step; "
                         f"valid: {_choices(spec)}")
        _goto(d, spec, out.target, ev.now)
    elif isinstance(out, WaitFor | Doze | Expect | FirstOf):
        arms: dict[str | None, Arm] = {None: out} if not isinstance(out, FirstOf) else {
            arm: a for arm, a in out.arms.items()}
        bad = [t for arm in arms.values() for t in _targets(arm) if t not in spec.steps]
        if bad:
            return _fail(d, ev.now, step, "UnknownStep",
                         f"step {step!r} waits to go to {bad[0]!r}, which is not a step; "
                         f"valid: {_choices(spec)}")
        _park(d, spec, step, arms, ev.now)
    elif isinstance(out, Spawn):
        bad = [t for t in (out.then, out.on_failure) if t is not None and t not in spec.steps]
        if bad:
            return _fail(d, ev.now, step, "UnknownStep",
                         f"step {step!r} calls a child, then goes to {bad[0]!r}, which is not "
                         f"a step; valid: {_choices(spec)}")
        _call(d, spec, step, out, ev.now)
    else:
        if out.then not in spec.steps:
            return _fail(d, ev.now, step, "UnknownStep",
                         f"step {step!r} gathers at {out.then!r}, which is not a step; "
                         f"valid: {_choices(spec)}")
        _fork(d, spec, step, out.then, out.branches, ev.now)
    return d


def _on_step_failed(rec: RunRecord, ev: StepFailed, spec: FlowSpec | None) -> Decision:
    if not expects(rec, ev.token, ev.branch):
        return _ignore(f"stale failure for token {ev.token}")
    d = Decision(rec)
    task = rec.task if ev.branch is None else rec.fork.branches[ev.branch].task  # type: ignore[union-attr]
    assert task is not None
    if ev.attempt and ev.attempt != task.attempt:
        return _ignore(f"failure of attempt {ev.attempt}, now at attempt {task.attempt}")
    where = task.where
    if ev.retryable and task.attempt <= task.policy.retries:
        delay = task.policy.delay_before(task.attempt + 1, f"{rec.run_id}:{task.lease_id}")
        retry = task.model_copy(update={
            "attempt": task.attempt + 1, "due_at": ev.now + delay, "dispatched_at": None,
        })
        if ev.branch is None:
            rec.task = retry
        else:
            rec.fork.branches[ev.branch].task = retry  # type: ignore[union-attr]
        _log(d, ev.now, "step_retrying", step=where, attempt=retry.attempt, delay=delay,
             error=str(ev.error))
        _dispatch_if_due(d, retry, ev.now)
        return d
    error = ev.error.model_copy(update={"step": where})
    return _fail_with(d, ev.now, error, finished=task)


def _on_checkpoint(rec: RunRecord, ev: Checkpoint, spec: FlowSpec | None) -> Decision:
    if not expects(rec, ev.token, None):
        return _ignore(f"stale checkpoint for token {ev.token}")
    rec.state = {**rec.state, **ev.state_patch}
    d = Decision(rec)
    _log(d, ev.now, "state_checkpoint", keys=sorted(ev.state_patch))
    return d


def _on_pause(rec: RunRecord, ev: Pause, spec: FlowSpec | None) -> Decision:
    _require_active(rec, "pause")
    if rec.paused:
        return _ignore("already paused")
    rec.paused = True
    d = Decision(rec)
    _log(d, ev.now, "paused", by=ev.by, source=ev.source)
    return d


def _on_resume(rec: RunRecord, ev: Resume, spec: FlowSpec | None) -> Decision:
    _require_active(rec, "resume")
    if not rec.paused:
        return _ignore("not paused")
    rec.paused = False
    d = Decision(rec)
    _log(d, ev.now, "resumed", by=ev.by, source=ev.source)
    if rec.task is not None and rec.task.dispatched_at is None:
        _dispatch_if_due(d, rec.task, ev.now)
    if rec.fork is not None:
        _send_fork(d, ev.now)
    return d


def _on_stop(rec: RunRecord, ev: Stop, spec: FlowSpec | None) -> Decision:
    _require_active(rec, "stop")
    d = Decision(rec)
    live = live_tasks(rec)
    if live:
        d.commands.append(Revoke(rec.run_id, tuple(t.model_copy() for t in live)))
    _stop_children(d, f"its parent {rec.run_id} was stopped")
    rec.status, rec.task, rec.fork = RunStatus.STOPPED, None, None
    _withdraw(rec)
    rec.child = None
    _log(d, ev.now, "stopped", reason=ev.reason, by=ev.by, source=ev.source)
    return d


def _on_decide(rec: RunRecord, ev: Decide, spec: FlowSpec | None) -> Decision:
    _require_active(rec, "approve" if ev.approve else "reject")
    gate = rec.gate
    if gate is None:
        raise ControlError(f"run {rec.run_id} has no gate waiting for a decision")
    if not may_decide(gate.approvers, ev.by, ev.groups):
        raise PermissionError(
            f"{ev.by!r} may not decide the gate at {gate.step!r}; approvers: {gate.approvers}")
    d = Decision(rec)
    if not ev.approve:
        _withdraw(rec)
        _result(rec, gate.step, gate.arm, _decision_result(gate, "rejected", ev))
        _log(d, ev.now, "gate_rejected", step=gate.step, by=ev.by, reason=ev.comment,
             source=ev.source)
        if gate.on_reject is None:
            return _fail(d, ev.now, gate.step, "GateRejected",
                         f"rejected by {ev.by}: {ev.comment or 'no reason given'}")
        _schedule_step(d, gate.on_reject, gate.policies[gate.on_reject], ev.now)
        return d
    if any(a.by == ev.by for a in gate.approvals):
        return _ignore(f"{ev.by} already approved")
    gate.approvals.append(Approval(by=ev.by, at=ev.now, comment=ev.comment))
    _log(d, ev.now, "gate_approved", step=gate.step, by=ev.by, comment=ev.comment,
         approvals=len(gate.approvals), needed=gate.min_approvals, source=ev.source)
    if len(gate.approvals) >= gate.min_approvals:
        _withdraw(rec)
        _result(rec, gate.step, gate.arm, _decision_result(gate, "approved", ev))
        _schedule_step(d, gate.then, gate.policies[gate.then], ev.now)
    return d


def may_decide(approvers: list[str] | tuple[str, ...], by: str,
               groups: frozenset[str] | set[str] = frozenset()) -> bool:
    """`by` is a listed approver, or a member of a listed `group:<name>`."""
    return by in approvers or any(f"group:{g}" in approvers for g in groups)


def _on_deliver(rec: RunRecord, ev: Deliver, spec: FlowSpec | None) -> Decision:
    # A retried send is a duplicate even once the run has ended: the sender sees the same
    # answer however late its retry comes.
    if ev.key is not None and ev.key in rec.event_keys:
        return _ignore(f"an event with key {ev.key!r} was sent already")
    _require_active(rec, "send to")
    d = Decision(rec)
    message = Message(name=ev.name, payload=ev.payload, key=ev.key, at=ev.now)
    if ev.key is not None:
        rec.event_keys = [*rec.event_keys, ev.key][-EVENT_KEYS_KEPT:]
    wait = next((w for w in rec.events if w.name == ev.name), None)
    if wait is not None:
        _take(d, wait, message, ev.now)
        return d
    if len(rec.mailbox) >= MAILBOX_LIMIT:
        raise ControlError(f"run {rec.run_id} has {MAILBOX_LIMIT} events nobody took yet; "
                           f"refusing more")
    rec.mailbox.append(message)
    _log(d, ev.now, "event_queued", name=ev.name, key=ev.key)
    return d


def _branch_calling(rec: RunRecord, ev: ChildEnded) -> BranchState | None:
    """The branch of the open fork that waits for the child `ev` is about, if any."""
    fork = rec.fork
    b = fork.branches.get(ev.branch or "") if fork is not None else None
    if (rec.status.is_terminal or fork is None or fork.token != ev.token or b is None
            or b.child is None or b.child.run_id != ev.run_id):
        return None
    return b


def _on_child_ended(rec: RunRecord, ev: ChildEnded, spec: FlowSpec | None) -> Decision:
    if ev.branch is not None:  # a branch's child failed (a completed one is kept beside)
        b = _branch_calling(rec, ev)
        if b is None or b.child is None or ev.status == RunStatus.COMPLETED.value:
            return _ignore(f"not waiting for child {ev.run_id}")
        why = f": {ev.error}" if ev.error is not None else ""
        return _fail_with(Decision(rec), ev.now, RunError(
            step=b.task.where, type="ChildFailed",
            message=f"child run {ev.run_id} ({b.child.workflow}) {ev.status}{why}"),
            finished=b.task)
    child = rec.child
    if (rec.status.is_terminal or child is None or child.token != ev.token
            or child.run_id != ev.run_id or ev.branch is not None or child.then is None):
        return _ignore(f"not waiting for child {ev.run_id}")
    d = Decision(rec)
    rec.child = None
    _result(rec, child.step, None, ev.result())
    _log(d, ev.now, "child_ended", step=child.step, child=ev.run_id, status=ev.status)
    if ev.status == RunStatus.COMPLETED.value:
        _schedule_step(d, child.then, child.policies[child.then], ev.now)
    elif child.on_failure is not None:
        _schedule_step(d, child.on_failure, child.policies[child.on_failure], ev.now)
    else:
        why = f": {ev.error}" if ev.error is not None else ""
        return _fail(d, ev.now, child.step, "ChildFailed",
                     f"child run {ev.run_id} ({child.workflow}) {ev.status}{why}")
    return d


def _on_parent_notified(rec: RunRecord, ev: ParentNotified, spec: FlowSpec | None) -> Decision:
    if rec.parent is None or rec.parent.notified:
        return _ignore("parent told already")
    rec.parent.notified = True
    return Decision(rec)


def positions(rec: RunRecord) -> list[str]:
    """Every step an active run may run next: where it is, or where its waits lead."""
    steps: list[str | None] = [rec.task.step if rec.task is not None else None]
    if rec.gate is not None:
        steps += [rec.gate.then, rec.gate.on_reject, rec.gate.on_timeout]
    if rec.timer is not None:
        steps.append(rec.timer.then)
    for w in rec.events:
        steps += [w.then, w.on_timeout]
    if rec.child is not None:
        steps += [rec.child.then, rec.child.on_failure]
    return list(dict.fromkeys(s for s in steps if s is not None))


def _on_upgrade(rec: RunRecord, ev: Upgrade, spec: FlowSpec | None) -> Decision:
    _require_active(rec, "upgrade")
    if rec.version == ev.spec.version:
        return _ignore(f"already on version {rec.version}")
    if rec.fork is not None:
        raise ControlError(f"run {rec.run_id} is in the fork at {rec.fork.step!r}; upgrade "
                           f"it once the branches have joined")
    task = rec.task
    if task is not None and task.dispatched_at is not None and task.lease_id in ev.running:
        raise ControlError(f"run {rec.run_id} is running step {task.step!r}; upgrade it once "
                           f"the step has finished")
    new = {old: ev.steps.get(old, old) for old in positions(rec)}
    missing = sorted(f"{old}->{n}" if n != old else old for old, n in new.items()
                     if n not in ev.spec.steps or n == START)
    if missing:
        raise ControlError(f"run {rec.run_id} may go on at {missing}, which version "
                           f"{ev.spec.version} has no step for; map them (--map OLD=NEW)")

    def moved(step: str) -> str:
        return ev.steps.get(step, step)

    def policies(names: list[str | None]) -> dict[str, StepPolicy]:
        return {moved(n): ev.spec.steps[moved(n)].policy for n in names if n is not None}

    d = Decision(rec)
    was = rec.version
    if task is not None:
        task.step = moved(task.step)
        task.policy = ev.spec.steps[task.step].policy
        if task.dispatched_at is not None:  # queued for the old version: send it anew
            task.attempt += 1
            task.dispatched_at = None
    if rec.gate is not None:
        g = rec.gate
        g.then, g.policies = moved(g.then), policies([g.then, g.on_reject, g.on_timeout])
        g.on_reject = moved(g.on_reject) if g.on_reject else None
        g.on_timeout = moved(g.on_timeout) if g.on_timeout else None
    if rec.timer is not None:
        rec.timer.then = moved(rec.timer.then)
        rec.timer.then_policy = ev.spec.steps[rec.timer.then].policy
    for w in rec.events:
        w.policies = policies([w.then, w.on_timeout])
        w.then = moved(w.then)
        w.on_timeout = moved(w.on_timeout) if w.on_timeout else None
    if rec.child is not None:
        c = rec.child
        c.policies = policies([c.then, c.on_failure])
        c.then = moved(c.then) if c.then else None
        c.on_failure = moved(c.on_failure) if c.on_failure else None
    rec.step_results = {moved(k): v for k, v in rec.step_results.items()}
    rec.event_steps = {moved(k): v for k, v in rec.event_steps.items()}
    rec.current_step = moved(rec.current_step) if rec.current_step else None
    rec.state, rec.version = dict(ev.state), ev.spec.version
    _log(d, ev.now, "upgraded", **{"from": was, "to": ev.spec.version},
         steps={k: v for k, v in ev.steps.items() if k in new} or None)
    if task is not None and task.dispatched_at is None:
        _dispatch_if_due(d, task, ev.now)
    return d


def _on_join(rec: RunRecord, ev: Join, spec: FlowSpec | None) -> Decision:
    if rec.status.is_terminal or rec.fork is None or rec.fork.token != ev.token:
        return _ignore(f"no fork waiting at token {ev.token}")
    if not rec.fork.complete(ev.results):
        return _ignore("join before every branch finished")
    return _join(Decision(rec), _need(spec), ev.now, ev.results)


def _on_tick(rec: RunRecord, ev: Tick, spec: FlowSpec | None) -> Decision:
    if rec.status.is_terminal:
        d = Decision(rec)
        _notify_parent(d)
        ended = [c for c in rec.stopping if c.run_id in ev.children_ended]
        rec.stopping = [c for c in rec.stopping if c.run_id not in ev.children_ended]
        for c in rec.stopping:
            _log(d, ev.now, "child_stop_redriven", child=c.run_id)
            d.commands.append(StopChild(c.run_id, c.key_prefix, c.reason))
        return d if (d.commands or ended) else _ignore("finished")
    d = Decision(rec)
    if _wake_due(d, ev.now) is not None:
        return d
    for child in pending_children(rec):
        if child.run_id in ev.children_seen:
            child.started = True
        else:
            _log(d, ev.now, "child_start_redriven", step=child.step, branch=child.branch,
                 child=child.run_id)
            d.commands.append(_start_child(rec, child))
    if rec.task is not None:
        _revive(d, rec.task, ev)
    if rec.fork is not None:
        fork, results = rec.fork, ev.branch_results
        if fork.complete(results):
            last = max(r.finished_at for r in results.values())
            if ev.now - last >= ev.join_after:
                _log(d, ev.now, "join_redriven", step=fork.step)
                return _join(d, _need(spec), ev.now, results)
        elif all(b.task.dispatched_at is None for b in fork.leaves().values()):
            _send_fork(d, ev.now)
        else:
            for name, b in fork.leaves().items():
                if name not in results and b.child is None and not rec.status.is_terminal:
                    _revive(d, b.task, ev)
    return d if (d.commands or d.history or ev.children_seen) else _ignore("nothing due")


_HANDLERS: dict[type, Any] = {
    StepDone: _on_step_done, StepFailed: _on_step_failed, Checkpoint: _on_checkpoint,
    Pause: _on_pause, Resume: _on_resume, Stop: _on_stop, Decide: _on_decide, Join: _on_join,
    Tick: _on_tick, Deliver: _on_deliver, ChildEnded: _on_child_ended,
    ParentNotified: _on_parent_notified, Upgrade: _on_upgrade,
}


# ---- helpers ---------------------------------------------------------------------------


def _revive(d: Decision, task: Task, ev: Tick) -> None:
    """Send a due timer, or resend work whose worker vanished without finishing."""
    if task.dispatched_at is None:
        _dispatch_if_due(d, task, ev.now)
        return
    age = ev.now - task.dispatched_at
    if task.lease_id in ev.live_tasks or age < ev.redispatch_after:
        return
    if task.lease_id in ev.queued:  # waiting behind others, not lost
        return
    # Behind a backlog the message is most likely still queued: resending it would only
    # add duplicates. A lost one shows once its queue drains (or after force_after).
    if task.queue in ev.busy_queues and age < ev.force_after:
        return
    if task.attempt >= task.policy.retries + 1 + LOST_ALLOWANCE:
        # Lost again and again (its worker killed each time, a hard time limit, a message
        # that keeps vanishing): fail it rather than re-send it forever.
        _fail_with(d, ev.now, RunError(
            step=task.where, type="WorkerLost",
            message=f"step {task.where} was lost {task.attempt} times (its worker died or "
                    f"its message vanished); not sending it again"), finished=task)
        return
    lost = task.task_id
    task.attempt += 1
    task.dispatched_at = None
    _log(d, ev.now, "step_redispatched", step=task.step, branch=task.branch, lost=lost,
         attempt=task.attempt)
    _dispatch_if_due(d, task, ev.now)


def _goto(d: Decision, spec: FlowSpec, step: str, now: float) -> None:
    # A step that is only a name (`START: "Clone"`) is followed here instead of spending
    # a task on it; the definition refuses cycles of such routes.
    route = spec.steps[step].route
    while route is not None and route != END and route in spec.steps:
        _log(d, now, "routed", step=step, next=route)
        step, route = route, spec.steps[route].route
    _schedule_step(d, step, spec.steps[step].policy, now)


def _schedule_step(
    d: Decision, step: str, policy: StepPolicy, now: float, token: int | None = None
) -> None:
    rec = _rec(d)
    rec.current_step = step
    rec.task = Task(step=step, token=token or _next_token(rec), policy=policy, due_at=now)
    _dispatch_if_due(d, rec.task, now)


def _dispatch_if_due(d: Decision, task: Task, now: float) -> None:
    rec = _rec(d)
    if rec.paused or task.due_at > now:
        return
    task.dispatched_at = now
    d.commands.append(SendTask(rec.run_id, rec.workflow, task.model_copy(), rec.version))


def _park(d: Decision, spec: FlowSpec, step: str, arms: dict[str | None, Arm],
          now: float) -> None:
    """Wait at `step` for the first of `arms` (one arm named None: a plain Wait). An event
    the mailbox holds already is taken at once."""
    rec = _rec(d)
    rec.current_step = step
    token = _next_token(rec)
    for arm, out in arms.items():
        if isinstance(out, WaitFor):
            _open_gate(d, spec, step, out.gate, now, token, arm)
        elif isinstance(out, Doze):
            _set_timer(d, spec, step, out, now, token, arm)
        else:
            rec.events.append(EventWait(
                step=step, token=token, name=out.name, then=out.then, arm=arm, since=now,
                policies={t: spec.steps[t].policy for t in (out.then, out.on_timeout) if t},
                timeout_at=now + out.timeout if out.timeout else None,
                on_timeout=out.on_timeout))
            _log(d, now, "event_awaited", step=step, name=out.name, arm=arm)
    waited = {w.name: w for w in rec.events}
    queued = next((m for m in rec.mailbox if m.name in waited), None)
    if queued is not None:
        rec.mailbox.remove(queued)
        _take(d, waited[queued.name], queued, now)


def _take(d: Decision, wait: EventWait, message: Message, now: float) -> None:
    """The run takes `message` at `wait`: the wait (and any other arm) ends, the payload is
    the waiting step's result."""
    rec = _rec(d)
    _withdraw(rec)
    if wait.arm is None:
        rec.step_results[wait.step] = message.payload
        rec.event_steps[wait.step] = wait.name
    else:
        _result(rec, wait.step, wait.arm, {"event": message.name, "payload": message.payload,
                                          "key": message.key})
    _log(d, now, "event_received", step=wait.step, name=message.name, key=message.key,
         arm=wait.arm, sent_at=message.at if message.at < now else None)
    _schedule_step(d, wait.then, wait.policies[wait.then], now)


def _wake_due(d: Decision, now: float) -> str | None:
    """Fire the earliest due of the run's gate timeout, timer and event timeouts; the others
    are withdrawn. Returns what fired, None if nothing was due. The run may fail here."""
    rec = _rec(d)
    due: list[tuple[float, int, Any]] = []
    if rec.gate is not None and rec.gate.timeout_at is not None:
        due.append((rec.gate.timeout_at, 0, rec.gate))
    if rec.timer is not None:
        due.append((rec.timer.wake_at, 1, rec.timer))
    due += [(w.timeout_at, 2, w) for w in rec.events if w.timeout_at is not None]
    due = [x for x in due if x[0] <= now]
    if not due:
        return None
    _, _, what = min(due, key=lambda x: (x[0], x[1]))
    _withdraw(rec)
    if isinstance(what, Gate):
        _result(rec, what.step, what.arm, {"decision": "timed_out", "at": now})
        _log(d, now, "gate_timed_out", step=what.step)
        if what.on_timeout is None:
            _fail(d, now, what.step, "GateTimeout",
                  f"no decision at {what.step!r} before its timeout")
        else:
            _schedule_step(d, what.on_timeout, what.policies[what.on_timeout], now)
        return "gate"
    if isinstance(what, Timer):
        _result(rec, what.step, what.arm, {"slept_until": what.wake_at, "woke_at": now})
        _log(d, now, "timer_fired", step=what.step, late=round(now - what.wake_at, 3))
        _schedule_step(d, what.then, what.then_policy, now)
        return "timer"
    _result(rec, what.step, what.arm, {"event": what.name, "timed_out": True, "at": now})
    _log(d, now, "event_timed_out", step=what.step, name=what.name)
    if what.on_timeout is None:
        _fail(d, now, what.step, "EventTimeout",
              f"no event {what.name!r} at {what.step!r} before its timeout")
    else:
        _schedule_step(d, what.on_timeout, what.policies[what.on_timeout], now)
    return "event"


def _withdraw(rec: RunRecord) -> None:
    """End every wait the run holds (all arms of an AnyOf go in the same commit)."""
    rec.gate, rec.timer, rec.events = None, None, []


def _result(rec: RunRecord, step: str, arm: str | None, result: dict[str, Any]) -> None:
    rec.step_results[step] = result if arm is None else {"fired": arm, **result}
    rec.event_steps.pop(step, None)


def _targets(arm: Arm) -> list[str]:
    if isinstance(arm, WaitFor):
        names = [arm.gate.then, arm.gate.on_reject, arm.gate.on_timeout]
    elif isinstance(arm, Doze):
        names = [arm.then]
    else:
        names = [arm.then, arm.on_timeout]
    return [n for n in names if n is not None]


def _call(d: Decision, spec: FlowSpec, step: str, out: Spawn, now: float) -> None:
    rec = _rec(d)
    rec.current_step = step
    token = _next_token(rec)
    rec.child = ChildCall(
        step=step, token=token, run_id=child_run_id(rec.run_id, token),
        workflow=out.workflow, key_prefix=out.key_prefix, input=out.input, then=out.then,
        on_failure=out.on_failure, called_at=now,
        policies={t: spec.steps[t].policy for t in (out.then, out.on_failure) if t})
    _log(d, now, "child_called", step=step, child=rec.child.run_id, workflow=out.workflow)
    d.commands.append(_start_child(rec, rec.child))


def _branch_call(d: Decision, branch: str, out: Spawn, now: float) -> Decision:
    rec = _rec(d)
    fork = rec.fork
    assert fork is not None
    b = fork.branches[branch]
    b.child = ChildCall(
        step=fork.step, token=fork.token, branch=branch, called_at=now,
        run_id=child_run_id(rec.run_id, fork.token, branch), workflow=out.workflow,
        key_prefix=out.key_prefix, input=out.input)
    _log(d, now, "child_called", step=fork.step, branch=branch, child=b.child.run_id,
         workflow=out.workflow)
    d.commands.append(_start_child(rec, b.child))
    return d


def _start_child(rec: RunRecord, child: ChildCall) -> StartChild:
    return StartChild(rec.run_id, child.step, child.token, child.run_id, child.workflow,
                      child.key_prefix, child.input, child.branch, rec.trace_context)


def child_run_id(parent: str, token: int, branch: str | None = None) -> str:
    """The child's run id, from the parent's, the calling task's token and its branch: a
    retried step (same token) names the same child, which exists already and is not
    started again. Branch names may hold any character, so they go in as a digest."""
    run_id = f"{parent}.{token}"
    if branch is not None:
        run_id += "." + hashlib.sha256(branch.encode()).hexdigest()[:10]
    if len(run_id) > 200:  # run ids are at most 200 characters; keep it unique instead
        run_id = hashlib.sha256(run_id.encode()).hexdigest()[:40] + f".{token}"
    return run_id


def _stop_children(d: Decision, reason: str) -> None:
    rec = _rec(d)
    calls = [rec.child] if rec.child is not None else []
    if rec.fork is not None:
        calls += [b.child for b in rec.fork.leaves().values() if b.child is not None]
    d.commands += [StopChild(c.run_id, c.key_prefix, reason) for c in calls]
    rec.stopping = [ChildStop(run_id=c.run_id, key_prefix=c.key_prefix, reason=reason)
                    for c in calls]


def _notify_parent(d: Decision) -> None:
    rec = _rec(d)
    if rec.parent is not None and not rec.parent.notified:
        d.commands.append(NotifyParent(rec.run_id, rec.parent, rec.status.value, rec.state,
                                       rec.output, rec.error))


def _open_gate(d: Decision, spec: FlowSpec, step: str, g: GateSpec, now: float, token: int,
               arm: str | None = None) -> None:
    rec = _rec(d)
    rec.gate = Gate(
        step=step, token=token, approvers=list(g.approvers), arm=arm,
        min_approvals=g.min_approvals, then=g.then, on_reject=g.on_reject,
        on_timeout=g.on_timeout,
        policies={t: spec.steps[t].policy for t in (g.then, g.on_reject, g.on_timeout) if t},
        timeout_at=now + g.timeout if g.timeout else None,
        prompt=g.prompt, payload=dict(g.payload), opened_at=now,
    )
    _log(d, now, "gate_opened", step=step, approvers=list(g.approvers))


def _set_timer(d: Decision, spec: FlowSpec, step: str, out: Doze, now: float, token: int,
               arm: str | None = None) -> None:
    rec = _rec(d)
    wake_at = out.until if out.until is not None else now + (out.seconds or 0.0)
    rec.timer = Timer(step=step, token=token, then=out.then, arm=arm,
                      then_policy=spec.steps[out.then].policy, wake_at=wake_at, set_at=now)
    _log(d, now, "timer_set", step=step, wake_at=wake_at, then=out.then)
    # The sweep wakes it: a timer already due (a zero sleep, a past `until`) fires on the
    # next pass, like any other.


def _fork(d: Decision, spec: FlowSpec, step: str, then: str, branches: tuple[BranchSpec, ...],
          now: float) -> None:
    rec = _rec(d)
    token = _next_token(rec)
    rec.current_step = step
    rec.fork = Fork(
        step=step, token=token, then=then, then_policy=spec.steps[then].policy,
        then_token=_next_token(rec), base_state=dict(rec.state), branches={},
    )
    _add_branches(rec.fork, branches, "", now)
    _log(d, now, "forked", step=step, branches=[b.name for b in branches])
    _send_fork(d, now)


def _add_branches(fork: Fork, specs: tuple[BranchSpec, ...], parent: str, now: float) -> list[str]:
    """Put `specs` into the fork under `parent/`; a nested fan-out's children go in too,
    so only leaves run. Returns the names added at this level."""
    names = []
    for b in specs:
        name = f"{parent}/{b.name}" if parent else b.name
        fork.branches[name] = BranchState(task=Task(
            step=fork.step, token=fork.token, policy=b.policy, branch=name, ref=b.ref,
            item=b.item, has_item=b.has_item, due_at=now))
        if b.children:
            fork.branches[name].children = _add_branches(fork, b.children, name, now)
        names.append(name)
    return names


def _expand(d: Decision, branch: str, out: FanOut, ev: StepDone) -> Decision:
    """A branch fanned out again: its children join the same fork, sent as their own
    group; the branch's output is gathered from theirs at the fork's join."""
    rec = _rec(d)
    fork = rec.fork
    assert fork is not None
    parent = fork.branches[branch]
    parent.children = _add_branches(fork, out.branches, branch, ev.now)
    parent.state_patch = dict(ev.state_patch)
    _log(d, ev.now, "branch_forked", step=fork.step, branch=branch, branches=parent.children)
    _send_fork(d, ev.now)
    return d


def _send_fork(d: Decision, now: float) -> None:
    rec = _rec(d)
    fork = rec.fork
    if rec.paused or fork is None:
        return
    pending = [b.task for b in fork.leaves().values()
               if b.task.dispatched_at is None and b.task.due_at <= now]  # not a backoff
    if not pending:
        return
    for t in pending:
        t.dispatched_at = now
    d.commands.append(SendFork(rec.run_id, rec.workflow, fork.token,
                               tuple(t.model_copy() for t in pending), rec.version))


def _join(
    d: Decision, spec: FlowSpec, now: float, results: dict[str, BranchResult]
) -> Decision:
    rec = _rec(d)
    fork = rec.fork
    assert fork is not None
    merged = dict(fork.base_state)
    # Reducers combine in the order the branches are written, nested ones in place.
    patches = {name: results[name].state_patch if fork.branches[name].is_leaf
               else fork.branches[name].state_patch for name in fork.in_tree_order()}
    writers: dict[str, list[str]] = {}
    for name, patch in patches.items():
        for key in patch:
            writers.setdefault(key, []).append(name)
    for key, names in writers.items():
        reducer = spec.reducers.get(key)
        if len(names) > 1 and reducer is None:
            rec.fork = None
            return _fail(d, now, fork.step, "StateConflict",
                         f"branches {names} all wrote state key {key!r}; declare a reducer "
                         f"for it in the state model to combine them")
        if reducer is None:
            merged[key] = patches[names[0]][key]
        else:
            updates = [patches[n][key] for n in names]
            value = merged[key] if key in merged else updates.pop(0)
            try:
                for update in updates:
                    value = reducer(value, update)
            except Exception as exc:  # user code: fail the run, never the join task
                rec.fork = None
                return _fail(d, now, fork.step, "ReducerError",
                             f"reducer for {key!r} failed: {type(exc).__name__}: {exc}")
            merged[key] = value
    rec.state = merged
    rec.step_results.update(_gathered(fork, fork.roots(), results))
    rec.fork = None
    _log(d, now, "joined", step=fork.step, next=fork.then)
    _schedule_step(d, fork.then, fork.then_policy, now, token=fork.then_token or None)
    return d


def _gathered(fork: Fork, names: list[str], results: dict[str, BranchResult]) -> dict[str, Any]:
    """Outputs of `names` as step_results holds them: each under its own name, a map's in
    input order under its function's name; a nested fan-out's as a dict of the same shape."""
    out: dict[str, Any] = {}
    mapped: dict[str, list[Any]] = {}
    for name in names:
        b = fork.branches[name]
        value = (results[name].output if b.children is None
                 else _gathered(fork, b.children, results))
        short = name.rsplit("/", 1)[-1]
        if b.task.has_item:
            mapped.setdefault(short.rsplit("[", 1)[0], []).append(value)
        else:
            out[short] = value
    return {**out, **mapped}


def _fail(d: Decision, now: float, step: str | None, kind: str, message: str) -> Decision:
    return _fail_with(d, now, RunError(step=step, type=kind, message=message))


def _fail_with(
    d: Decision, now: float, error: RunError, finished: Task | None = None
) -> Decision:
    """Fail the run; revoke what still runs, apart from the task that just finished."""
    rec = _rec(d)
    live = [t for t in live_tasks(rec) if t is not rec.task and t is not finished]
    if live:  # siblings of a failed branch must not keep running
        d.commands.append(Revoke(rec.run_id, tuple(t.model_copy() for t in live)))
    _stop_children(d, f"its parent {rec.run_id} failed")
    rec.status, rec.error, rec.task, rec.fork = RunStatus.FAILED, error, None, None
    _withdraw(rec)
    rec.child = None
    _log(d, now, "failed", step=error.step, error=str(error))
    return d


def _settle(rec: RunRecord) -> None:
    """Derive the visible status from what the run holds."""
    if rec.status.is_terminal:
        rec.paused = False
        return
    if rec.paused:
        rec.status = RunStatus.PAUSED
    elif (rec.gate is not None or rec.timer is not None or rec.events
          or rec.child is not None):
        rec.status = RunStatus.WAITING
    else:
        rec.status = RunStatus.RUNNING


def _require_active(rec: RunRecord, action: str) -> None:
    if rec.status.is_terminal:
        raise ControlError(f"cannot {action} run {rec.run_id}: it is {rec.status.value}")


def _decision_result(gate: Gate, decision: str, ev: Decide) -> dict[str, Any]:
    approvals = [a.model_dump() for a in gate.approvals]
    if decision == "rejected":
        return {"decision": decision, "by": ev.by, "at": ev.now, "reason": ev.comment,
                "approvals": approvals}
    return {"decision": decision, "by": ev.by, "at": ev.now, "comment": ev.comment,
            "approvals": approvals}


def _next_token(rec: RunRecord) -> int:
    rec.seq += 1
    return rec.seq


def _need(spec: FlowSpec | None) -> FlowSpec:
    if spec is None:
        raise ControlError("this transition needs the workflow definition")
    return spec


def _rec(d: Decision) -> RunRecord:
    assert d.record is not None
    return d.record


def _choices(spec: FlowSpec) -> list[str]:
    return [s for s in spec.steps if s != START] + ["END"]


def _label(out: Outcome) -> str:
    if isinstance(out, GoTo):
        return "END" if out.target == END else out.target
    if isinstance(out, WaitFor):
        return f"wait->{out.gate.then}"
    if isinstance(out, Doze):
        return f"sleep->{out.then}"
    if isinstance(out, Expect):
        return f"event {out.name}->{out.then}"
    if isinstance(out, FirstOf):
        return "any->" + ",".join(sorted({t for a in out.arms.values() for t in _targets(a)}))
    if isinstance(out, Spawn):
        return f"call {out.workflow}->{out.then}"
    return f"parallel->{out.then}"


def _log(d: Decision, now: float, event: str, **detail: Any) -> None:
    entry = {"at": now, "event": event}
    entry.update({k: v for k, v in detail.items() if v is not None})
    d.history.append(entry)
