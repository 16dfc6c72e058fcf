"""The persisted shape of a run, and the small views of a definition the engine needs.

A `RunRecord` is everything needed to continue a run; it is stored as JSON. Its size is
bounded by the number of step names and the state, never by how long the run has been
going: history lives in an append-only list next to it.
"""

from __future__ import annotations

import copy
import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RunError", "RunRecord", "RunResult", "RunStatus", "StepPolicy"]

DEFAULT_QUEUE = "orchestrator.steps"


class RunStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def is_terminal(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.STOPPED)


class RunError(BaseModel):
    """What failed and where."""

    step: str | None = None
    type: str
    message: str
    traceback: str | None = None

    def __str__(self) -> str:
        where = f"step {self.step!r}: " if self.step else ""
        return f"{where}{self.type}: {self.message}"


class StepPolicy(BaseModel):
    """How one step (or branch) runs: where, for how long, and how it retries.

    One value, written once in the definition (`@step(...)`) and carried unchanged in
    every task the engine dispatches, so a branch and a step obey the same rules.
    `retry_on` stays in the definition: the worker, which has the code, decides whether
    an exception may be retried; the engine only sees the verdict.
    """

    model_config = ConfigDict(frozen=True)

    queue: str = DEFAULT_QUEUE
    """The Celery queue the step's task is sent to."""
    retries: int = Field(default=0, ge=0)
    """Extra attempts after the first fails with a retryable error."""
    backoff: float = Field(default=1.0, ge=0)
    """Seconds before the first retry."""
    backoff_factor: float = Field(default=2.0, ge=1)
    """Each later retry waits this many times longer..."""
    max_backoff: float = Field(default=300.0, ge=0)
    """...up to this many seconds."""
    jitter: float = Field(default=0.0, ge=0, le=1)
    """Spread each wait by up to this fraction, so retries of many runs do not align."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds the step may run; past it the step fails (and its work is interrupted)."""
    retry_on: Any = Field(default=None, exclude=True, repr=False)
    """Exception types (or a predicate on the exception) that may be retried; None: all
    but `NonRetryable`. Not serialized: workers read it from the definition."""

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> StepPolicy:
        return self  # frozen: a run record's deep copy (every engine step) can share it

    def delay_before(self, attempt: int, seed: str = "") -> float:
        """Seconds to wait before `attempt` (2 is the first retry). The jitter is derived
        from `seed` (run and token), so the engine stays deterministic."""
        growth = self.backoff_factor ** max(0, attempt - 2)
        delay = float(min(self.max_backoff, self.backoff * growth))
        if self.jitter and seed:
            spread = int.from_bytes(hashlib.sha256(f"{seed}:{attempt}".encode()).digest()[:4])
            delay *= 1 + self.jitter * (2 * spread / 0xFFFFFFFF - 1)
        return delay

    def retries_error(self, exc: BaseException) -> bool:
        """Whether this policy lets `exc` be retried (attempts left aside)."""
        if getattr(exc, "non_retryable", False):
            return False
        if self.retry_on is None:
            return True
        if isinstance(self.retry_on, type | tuple):
            return isinstance(exc, self.retry_on)
        return bool(self.retry_on(exc))


class Task(BaseModel):
    """One unit of work to run on a worker: a step, a branch, or the imperative body."""

    step: str
    token: int
    attempt: int = 1
    policy: StepPolicy = field(default_factory=StepPolicy)
    branch: str | None = None
    ref: str | None = None  # importable function of a branch
    item: Any = None
    has_item: bool = False
    due_at: float = 0.0  # not before (retry backoff)
    dispatched_at: float | None = None

    @property
    def queue(self) -> str:
        return self.policy.queue

    @property
    def lease_id(self) -> str:
        """Names the lease a worker holds while running this task, whatever the attempt."""
        return f"{self.token}" if self.branch is None else f"{self.token}:{self.branch}"

    @property
    def task_id(self) -> str:
        suffix = f":{self.branch}" if self.branch is not None else ""
        return f"{self.token}{suffix}:{self.attempt}"

    @property
    def where(self) -> str:
        """How errors and logs name it: `Step`, or `Step[branch]`."""
        return self.step if self.branch is None else f"{self.step}[{self.branch}]"


class BranchState(BaseModel):
    """A branch of a fork. A branch that fanned out again keeps the names of its children
    (`path/child`) and the state it set before it did; only leaves run and have results."""

    task: Task
    children: list[str] | None = None
    state_patch: dict[str, Any] = Field(default_factory=dict)
    child: ChildCall | None = None  # the child run whose end is this branch's result

    @property
    def is_leaf(self) -> bool:
        return self.children is None


class BranchResult(BaseModel):
    """A finished branch. Kept beside the record (one hash per fork), never inside it, so
    branches finishing at once do not contend for the record."""

    output: Any = None
    state_patch: dict[str, Any] = Field(default_factory=dict)
    finished_at: float
    attempt: int = 1


class Fork(BaseModel):
    """Parallel branches in flight, gathered at `then`."""

    step: str
    token: int
    then: str
    then_policy: StepPolicy
    branches: dict[str, BranchState]
    base_state: dict[str, Any]
    then_token: int = 0  # reserved at the fork: the token of the step after the join

    def leaves(self) -> dict[str, BranchState]:
        """The branches that run (a nested fan-out's own entry runs no more)."""
        return {name: b for name, b in self.branches.items() if b.is_leaf}

    def roots(self) -> list[str]:
        """The branches the forking step named, in its order (nested ones hang below)."""
        return [name for name in self.branches if "/" not in name]

    def in_tree_order(self) -> list[str]:
        """Every branch name, each nested fan-out's children right after their branch."""
        names: list[str] = []

        def visit(level: list[str]) -> None:
            for name in level:
                names.append(name)
                visit(self.branches[name].children or [])

        visit(self.roots())
        return names

    def complete(self, results: dict[str, BranchResult]) -> bool:
        return all(name in results for name in self.leaves())

    def state_seen_by(self, branch: str) -> dict[str, Any]:
        """The state at the fork, plus what each enclosing branch set before fanning out."""
        state = dict(self.base_state)
        parts = branch.split("/")
        for depth in range(1, len(parts)):
            enclosing = self.branches.get("/".join(parts[:depth]))
            if enclosing is not None:
                state.update(enclosing.state_patch)
        return state


class Approval(BaseModel):
    by: str
    at: float
    comment: str | None = None


class Gate(BaseModel):
    step: str
    token: int
    approvers: list[str]
    min_approvals: int = 1
    then: str
    on_reject: str | None = None
    on_timeout: str | None = None
    policies: dict[str, StepPolicy] = Field(default_factory=dict)  # of then/on_* steps
    timeout_at: float | None = None
    prompt: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)
    opened_at: float
    approvals: list[Approval] = Field(default_factory=list)
    arm: str | None = None  # its name in an AnyOf


class Timer(BaseModel):
    """A durable timer the run sleeps on: the sweep wakes it at `wake_at` (the store's
    clock) and continues at `then`."""

    step: str
    token: int
    then: str
    then_policy: StepPolicy
    wake_at: float
    set_at: float
    arm: str | None = None


class EventWait(BaseModel):
    """The run waits for event `name` (alone, or as arm `arm` of an AnyOf)."""

    step: str
    token: int
    name: str
    then: str
    policies: dict[str, StepPolicy] = Field(default_factory=dict)  # of then/on_timeout
    timeout_at: float | None = None
    on_timeout: str | None = None
    since: float
    arm: str | None = None


class Message(BaseModel):
    """An event sent to a run that no wait has taken yet."""

    name: str
    payload: Any = None
    key: str | None = None
    at: float


class ChildCall(BaseModel):
    """The run (or one branch of its fork) waits for child run `run_id` to end."""

    step: str
    token: int
    run_id: str
    workflow: str
    key_prefix: str
    input: dict[str, Any]  # kept until the child is seen, so the sweep can start it
    then: str | None = None  # None in a branch: the child's result is the branch's output
    branch: str | None = None
    on_failure: str | None = None
    policies: dict[str, StepPolicy] = Field(default_factory=dict)  # of then/on_failure
    called_at: float
    started: bool = False  # the sweep saw the child's record: no need to start it again


class ParentLink(BaseModel):
    """This run is the child of `run_id`, called at its step `step` (token, branch)."""

    run_id: str
    key_prefix: str
    step: str
    token: int
    branch: str | None = None
    notified: bool = False  # the parent has been told this run ended


class ChildStop(BaseModel):
    """A child this run asked to stop, until the sweep sees it ended: the stop is sent
    after the commit that decided it, and a process that dies in between must not leave
    the child running."""

    run_id: str
    key_prefix: str
    reason: str


class RunRecord(BaseModel):
    run_id: str
    workflow: str
    version: str
    status: RunStatus
    paused: bool = False
    input: dict[str, Any]
    state: dict[str, Any]
    step_results: dict[str, Any] = Field(default_factory=dict)
    current_step: str | None = None
    seq: int = 0
    task: Task | None = None
    fork: Fork | None = None
    gate: Gate | None = None
    timer: Timer | None = None
    events: list[EventWait] = Field(default_factory=list)
    mailbox: list[Message] = Field(default_factory=list)
    event_keys: list[str] = Field(default_factory=list)  # recent send keys, for dedupe
    event_steps: dict[str, str] = Field(default_factory=dict)  # step -> event it took
    child: ChildCall | None = None
    parent: ParentLink | None = None
    stopping: list[ChildStop] = Field(default_factory=list)
    # The trace the run's step spans join (W3C traceparent, as the OTel propagator wrote
    # it where the run started); None without tracing, and then left out of the JSON.
    trace_context: dict[str, str] | None = None
    output: Any = None
    error: RunError | None = None
    created_at: float
    updated_at: float

    def waiting_for(self) -> list[str]:
        """What a waiting run waits for, said for people (status lines, listings)."""
        waits = []
        if self.gate is not None:
            waits.append(f"approval by {', '.join(self.gate.approvers)}")
        waits += [f"event {w.name!r}" for w in self.events]
        if self.timer is not None:
            at = datetime.fromtimestamp(self.timer.wake_at, UTC).isoformat(timespec="seconds")
            waits.append(f"timer until {at}")
        if self.child is not None:
            waits.append(f"child run {self.child.run_id} ({self.child.workflow})")
        return waits


class RunResult(BaseModel):
    """What `handle.result()` returns once a run has finished."""

    run_id: str
    status: RunStatus
    state: dict[str, Any]
    step_results: dict[str, Any]
    output: Any = None
    error: RunError | None = None


@dataclass(frozen=True)
class StepSpec:
    policy: StepPolicy = field(default_factory=StepPolicy)
    route: str | None = None  # a step given as a name (`START: "Clone"`) runs no code


@dataclass(frozen=True)
class FlowSpec:
    """The parts of a definition the engine reads: step names and their routing/retries."""

    workflow: str
    version: str
    steps: dict[str, StepSpec] = field(default_factory=dict)
    reducers: dict[str, Callable[[Any, Any], Any]] = field(default_factory=dict)


BranchState.model_rebuild()  # it names ChildCall, defined after it

_ATOMS = (str, int, float, bool, type(None))


def clone(value: Any) -> Any:
    """A deep copy of a record (or any part of one) that shares nothing mutable with it.

    `model_copy(deep=True)` goes through `copy.deepcopy` (its memo, `__reduce_ex__` and
    `__deepcopy__` lookups for every value), which cost a tenth of a millisecond per step
    for a small record: the engine copies the record on every event. A record holds
    models, dicts and lists of JSON values, and frozen policies it may share, so this
    copies those directly and leaves anything else to `copy.deepcopy`."""
    kind = type(value)
    if kind in _ATOMS or isinstance(value, enum.Enum):
        return value
    if kind is dict:
        return {k: clone(v) for k, v in value.items()}
    if kind is list:
        return [clone(v) for v in value]
    if isinstance(value, BaseModel):
        if value.model_config.get("frozen"):
            return value
        copied = object.__new__(kind)
        setattr_ = object.__setattr__
        setattr_(copied, "__dict__", {k: clone(v) for k, v in value.__dict__.items()})
        setattr_(copied, "__pydantic_fields_set__", set(value.__pydantic_fields_set__))
        setattr_(copied, "__pydantic_extra__", clone(value.__pydantic_extra__))
        setattr_(copied, "__pydantic_private__", copy.deepcopy(value.__pydantic_private__))
        return copied
    return copy.deepcopy(value)
