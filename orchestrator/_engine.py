"""The engine: (run record, event) -> (new record, commands). Pure: no I/O, no clocks.

Every rule about what happens next lives here: a step's transition, retries, gates,
fan-out and join, pause, resume, stop and the recovery sweep's timers. Callers pass the
time in the event, gather facts (which leases are alive) before calling, and carry out
the commands after committing the new record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ._records import (
    Approval,
    BranchResult,
    BranchState,
    FlowSpec,
    Fork,
    Gate,
    RunError,
    RunRecord,
    RunStatus,
    StepPolicy,
    Task,
    Timer,
)

START = "__start__"
END = "__end__"


# Re-sends of lost work a step gets beyond its retries before the run fails with WorkerLost.
LOST_ALLOWANCE = 3


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
class FanOut:
    """Run `branches` in parallel, gathered at `then` (a branch's nested fan-out: None)."""

    branches: tuple[BranchSpec, ...]
    then: str | None = None


Outcome = GoTo | WaitFor | Doze | FanOut


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


@dataclass(frozen=True)
class Pause:
    now: float


@dataclass(frozen=True)
class Resume:
    now: float


@dataclass(frozen=True)
class Stop:
    now: float
    reason: str | None = None


@dataclass(frozen=True)
class Decide:
    now: float
    approve: bool
    by: str
    comment: str | None = None


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


Event = StepDone | StepFailed | Checkpoint | Pause | Resume | Stop | Decide | Join | Tick


# ---- commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class SendTask:
    run_id: str
    workflow: str
    task: Task


@dataclass(frozen=True)
class SendFork:
    """Send the branches as one chord whose body joins fork `token` and, if that join is
    the one that closes the fork, runs task `then` (the step after it) where it joined."""

    run_id: str
    workflow: str
    token: int
    tasks: tuple[Task, ...]
    then: Task


@dataclass(frozen=True)
class Revoke:
    """Withdraw tasks in flight (a stop, or the siblings of a branch that failed the run)."""

    run_id: str
    tasks: tuple[Task, ...]


Command = SendTask | SendFork | Revoke


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
    spec: FlowSpec, run_id: str, input: dict[str, Any], state: dict[str, Any], now: float
) -> Decision:
    """A new run, with its first step dispatched."""
    rec = RunRecord(
        run_id=run_id, workflow=spec.workflow, version=spec.version, status=RunStatus.RUNNING,
        input=input, state=state, created_at=now, updated_at=now,
    )
    d = Decision(rec)
    _log(d, now, "started", workflow=spec.workflow, version=spec.version)
    _goto(d, spec, START, now)
    return d


def apply(record: RunRecord, event: Event, spec: FlowSpec | None = None) -> Decision:
    """Decide what `event` does to `record`. The input record is never mutated."""
    rec = record.model_copy(deep=True)
    handler = _HANDLERS[type(event)]
    d: Decision = handler(rec, event, spec)
    if d.record is not None and isinstance(event, StepDone | StepFailed):
        d.history[:0] = [{"at": event.now, **n} for n in event.notes]
    if d.record is not None:
        d.record.updated_at = max(d.record.updated_at, getattr(event, "now", 0.0))
        _settle(d.record)
    return d


def next_due(rec: RunRecord, redispatch_after: float, join_after: float) -> float | None:
    """When the sweep must next look at this run if nothing else happens (None: never)."""
    if rec.status.is_terminal:
        return None
    times: list[float] = []
    if rec.gate is not None and rec.gate.timeout_at is not None:
        times.append(rec.gate.timeout_at)
    if rec.timer is not None:
        times.append(rec.timer.wake_at)
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
            if b.task.dispatched_at is not None:
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
        tasks += [b.task for b in rec.fork.leaves().values() if b.task.dispatched_at is not None]
    return tasks


def expects(rec: RunRecord, token: int, branch: str | None) -> bool:
    """Whether a worker holding (token, branch) should run: the run still waits for it."""
    if rec.status.is_terminal:
        return False
    if branch is None:
        return rec.task is not None and rec.task.token == token
    return (rec.fork is not None and rec.fork.token == token and branch in rec.fork.branches
            and rec.fork.branches[branch].is_leaf)


@dataclass(frozen=True)
class KeepBranch:
    """A branch succeeded: keep its result beside the record (siblings finishing at once do
    not contend for the record). Once `width` results are kept, the fork is complete; if
    `joins` is set this branch must then join it itself: a retried or re-sent branch was
    not in the chord that was sent, whose join has come and gone."""

    result: BranchResult
    entry: dict[str, Any]
    width: int
    joins: bool


@dataclass(frozen=True)
class ApplyToRun:
    """A branch failed or fanned out again: that changes the fork, through `apply`."""

    event: StepDone | StepFailed


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
    if isinstance(ev.outcome, FanOut):
        return ApplyToRun(ev)
    assert isinstance(ev.outcome, GoTo)
    result = BranchResult(output=ev.outcome.output, state_patch=ev.state_patch,
                          finished_at=ev.now, attempt=task.attempt)
    entry = {"at": ev.now, "event": "branch_completed", "step": rec.fork.step,
             "branch": ev.branch}
    return KeepBranch(result, entry, len(rec.fork.leaves()), joins=task.attempt > 1)


# ---- handlers -------------------------------------------------------------------------


def _on_step_done(rec: RunRecord, ev: StepDone, spec: FlowSpec | None) -> Decision:
    if not expects(rec, ev.token, ev.branch):
        return _ignore(f"stale completion for token {ev.token}")
    if ev.branch is not None:
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
    elif isinstance(out, WaitFor):
        bad = [t for t in (out.gate.then, out.gate.on_reject, out.gate.on_timeout)
               if t is not None and t not in spec.steps]
        if bad:
            return _fail(d, ev.now, step, "UnknownStep",
                         f"step {step!r} waits for {bad[0]!r}, which is not a step; "
                         f"valid: {_choices(spec)}")
        _open_gate(d, spec, step, out.gate, ev.now)
    elif isinstance(out, Doze):
        if out.then not in spec.steps:
            return _fail(d, ev.now, step, "UnknownStep",
                         f"step {step!r} sleeps until {out.then!r}, which is not a step; "
                         f"valid: {_choices(spec)}")
        _set_timer(d, spec, step, out, ev.now)
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
    _log(d, ev.now, "paused")
    return d


def _on_resume(rec: RunRecord, ev: Resume, spec: FlowSpec | None) -> Decision:
    _require_active(rec, "resume")
    if not rec.paused:
        return _ignore("not paused")
    rec.paused = False
    d = Decision(rec)
    _log(d, ev.now, "resumed")
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
    rec.status, rec.task, rec.fork, rec.gate = RunStatus.STOPPED, None, None, None
    rec.timer = None
    _log(d, ev.now, "stopped", reason=ev.reason)
    return d


def _on_decide(rec: RunRecord, ev: Decide, spec: FlowSpec | None) -> Decision:
    _require_active(rec, "approve" if ev.approve else "reject")
    gate = rec.gate
    if gate is None:
        raise ControlError(f"run {rec.run_id} has no gate waiting for a decision")
    if ev.by not in gate.approvers:
        raise PermissionError(
            f"{ev.by!r} may not decide the gate at {gate.step!r}; approvers: {gate.approvers}")
    d = Decision(rec)
    if not ev.approve:
        rec.gate = None
        rec.step_results[gate.step] = _decision_result(gate, "rejected", ev)
        _log(d, ev.now, "gate_rejected", step=gate.step, by=ev.by, reason=ev.comment)
        if gate.on_reject is None:
            return _fail(d, ev.now, gate.step, "GateRejected",
                         f"rejected by {ev.by}: {ev.comment or 'no reason given'}")
        _schedule_step(d, gate.on_reject, gate.policies[gate.on_reject], ev.now)
        return d
    if any(a.by == ev.by for a in gate.approvals):
        return _ignore(f"{ev.by} already approved")
    gate.approvals.append(Approval(by=ev.by, at=ev.now, comment=ev.comment))
    _log(d, ev.now, "gate_approved", step=gate.step, by=ev.by, comment=ev.comment,
         approvals=len(gate.approvals), needed=gate.min_approvals)
    if len(gate.approvals) >= gate.min_approvals:
        rec.gate = None
        rec.step_results[gate.step] = _decision_result(gate, "approved", ev)
        _schedule_step(d, gate.then, gate.policies[gate.then], ev.now)
    return d


def _on_join(rec: RunRecord, ev: Join, spec: FlowSpec | None) -> Decision:
    if rec.status.is_terminal or rec.fork is None or rec.fork.token != ev.token:
        return _ignore(f"no fork waiting at token {ev.token}")
    if not rec.fork.complete(ev.results):
        return _ignore("join before every branch finished")
    return _join(Decision(rec), _need(spec), ev.now, ev.results)


def _on_tick(rec: RunRecord, ev: Tick, spec: FlowSpec | None) -> Decision:
    if rec.status.is_terminal:
        return _ignore("finished")
    d = Decision(rec)
    gate = rec.gate
    if gate is not None and gate.timeout_at is not None and gate.timeout_at <= ev.now:
        rec.gate = None
        rec.step_results[gate.step] = {"decision": "timed_out", "at": ev.now}
        _log(d, ev.now, "gate_timed_out", step=gate.step)
        if gate.on_timeout is None:
            return _fail(d, ev.now, gate.step, "GateTimeout",
                         f"no decision at {gate.step!r} before its timeout")
        _schedule_step(d, gate.on_timeout, gate.policies[gate.on_timeout], ev.now)
    timer = rec.timer
    if timer is not None and timer.wake_at <= ev.now:
        rec.timer = None
        rec.step_results[timer.step] = {"slept_until": timer.wake_at, "woke_at": ev.now}
        _log(d, ev.now, "timer_fired", step=timer.step, late=round(ev.now - timer.wake_at, 3))
        _schedule_step(d, timer.then, timer.then_policy, ev.now)
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
                if name not in results and not rec.status.is_terminal:
                    _revive(d, b.task, ev)
    return d if (d.commands or d.history) else _ignore("nothing due")


_HANDLERS: dict[type, Any] = {
    StepDone: _on_step_done, StepFailed: _on_step_failed, Checkpoint: _on_checkpoint,
    Pause: _on_pause, Resume: _on_resume, Stop: _on_stop, Decide: _on_decide, Join: _on_join,
    Tick: _on_tick,
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
    d.commands.append(SendTask(rec.run_id, rec.workflow, task.model_copy()))


def _open_gate(d: Decision, spec: FlowSpec, step: str, g: GateSpec, now: float) -> None:
    rec = _rec(d)
    rec.current_step = step
    rec.gate = Gate(
        step=step, token=_next_token(rec), approvers=list(g.approvers),
        min_approvals=g.min_approvals, then=g.then, on_reject=g.on_reject,
        on_timeout=g.on_timeout,
        policies={t: spec.steps[t].policy for t in (g.then, g.on_reject, g.on_timeout) if t},
        timeout_at=now + g.timeout if g.timeout else None,
        prompt=g.prompt, payload=dict(g.payload), opened_at=now,
    )
    _log(d, now, "gate_opened", step=step, approvers=list(g.approvers))


def _set_timer(d: Decision, spec: FlowSpec, step: str, out: Doze, now: float) -> None:
    rec = _rec(d)
    rec.current_step = step
    wake_at = out.until if out.until is not None else now + (out.seconds or 0.0)
    rec.timer = Timer(step=step, token=_next_token(rec), then=out.then,
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
    chord; the branch's output is gathered from theirs at the fork's join."""
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
    then = Task(step=fork.then, token=fork.then_token, policy=fork.then_policy, due_at=now,
                dispatched_at=now)
    d.commands.append(SendFork(rec.run_id, rec.workflow, fork.token,
                               tuple(t.model_copy() for t in pending), then))


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
    rec.status, rec.error, rec.task, rec.fork, rec.gate = RunStatus.FAILED, error, None, None, None
    _log(d, now, "failed", step=error.step, error=str(error))
    return d


def _settle(rec: RunRecord) -> None:
    """Derive the visible status from what the run holds."""
    if rec.status.is_terminal:
        rec.paused = False
        return
    if rec.paused:
        rec.status = RunStatus.PAUSED
    elif rec.gate is not None or rec.timer is not None:
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
    return f"parallel->{out.then}"


def _log(d: Decision, now: float, event: str, **detail: Any) -> None:
    entry = {"at": now, "event": event}
    entry.update({k: v for k, v in detail.items() if v is not None})
    d.history.append(entry)
