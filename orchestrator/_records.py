"""The persisted shape of a run, and the small views of a definition the engine needs.

A `RunRecord` is everything needed to continue a run; it is stored as JSON. Its size is
bounded by the number of step names and the state, never by how long the run has been
going: history lives in an append-only list next to it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

__all__ = ["RunError", "RunRecord", "RunResult", "RunStatus"]


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


class Task(BaseModel):
    """One unit of work to run on a worker: a step, a branch, or the imperative body."""

    step: str
    token: int
    attempt: int = 1
    queue: str
    branch: str | None = None
    ref: str | None = None  # importable function of a branch
    item: Any = None
    has_item: bool = False
    timeout: float | None = None
    retries: int = 0  # branch retry policy travels with the task; steps read the spec
    backoff: float = 1.0
    due_at: float = 0.0  # not before (retry backoff)
    dispatched_at: float | None = None

    @property
    def lease_id(self) -> str:
        """Names the lease a worker holds while running this task, whatever the attempt."""
        return f"{self.token}" if self.branch is None else f"{self.token}:{self.branch}"

    @property
    def task_id(self) -> str:
        suffix = f":{self.branch}" if self.branch is not None else ""
        return f"{self.token}{suffix}:{self.attempt}"


class BranchState(BaseModel):
    """A branch of a fork. A branch that fanned out again keeps the names of its children
    (`path/child`) and the state it set before it did; only leaves run and have results."""

    task: Task
    children: list[str] | None = None
    state_patch: dict[str, Any] = Field(default_factory=dict)

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
    then_queue: str
    branches: dict[str, BranchState]
    base_state: dict[str, Any]
    then_token: int = 0  # reserved at the fork, so the chord's body can name its task

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
    then_queue: str
    on_reject: str | None = None
    on_reject_queue: str | None = None
    on_timeout: str | None = None
    on_timeout_queue: str | None = None
    timeout_at: float | None = None
    prompt: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)
    opened_at: float
    approvals: list[Approval] = Field(default_factory=list)


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
    output: Any = None
    error: RunError | None = None
    created_at: float
    updated_at: float


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
    queue: str
    retries: int = 0
    backoff: float = 1.0
    backoff_factor: float = 2.0
    max_backoff: float = 300.0
    timeout: float | None = None
    route: str | None = None  # a step given as a name (`START: "Clone"`) runs no code

    def delay_before(self, attempt: int) -> float:
        growth = self.backoff_factor ** max(0, attempt - 2)
        return float(min(self.max_backoff, self.backoff * growth))


@dataclass(frozen=True)
class FlowSpec:
    """The parts of a definition the engine reads: step names and their routing/retries."""

    workflow: str
    version: str
    steps: dict[str, StepSpec] = field(default_factory=dict)
    reducers: dict[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
