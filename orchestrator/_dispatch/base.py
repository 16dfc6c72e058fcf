"""The Dispatcher port: carry out the engine's commands (send a task, a fork, a revoke)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence

from .._definition import Workflow
from .._engine import Command
from .._records import DEFAULT_QUEUE, Task
from .._stores.base import Outbox


class Dispatcher(abc.ABC):
    @abc.abstractmethod
    def send(self, commands: Sequence[Command]) -> None:
        """Send every command; called after the decision that produced them is committed."""

    def outbox(self, commands: Sequence[Command]) -> tuple[Outbox, list[Command]] | None:
        """The messages of `commands` as writes for a store on the broker's own Redis (see
        Outbox), and the commands still to `send` after the commit; None where this
        dispatcher cannot write its messages that way (everything is sent after it)."""
        return None

    def queue_of(self, workflow: str, version: str, task: Task) -> str:
        return queue_for(task.queue, workflow, version)

    def queue_length(self, queue: str) -> int:
        """Messages waiting in `queue`; 0 where the transport cannot tell."""
        return 0

    def message_ids(self, queue: str, taken_within: float = 0.0) -> frozenset[str] | None:
        """Ids of the messages waiting in `queue`, or taken by a worker less than
        `taken_within` seconds ago; None where the transport cannot list them."""
        return None

    @staticmethod
    def message_id(run_id: str, task: Task) -> str:
        """Deterministic message id: Flower shows the run, revoke finds the message."""
        return f"{run_id}:{task.task_id}"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work."""


def queue_for(queue: str, workflow: str, version: str) -> str:
    """The broker queue of a step's queue for one version of one workflow: a worker
    consumes only those of the versions it hosts, so it never takes a step it cannot run.
    The step's queue comes first, so ACL rules on its prefix (`~builds*`) still match."""
    return f"{queue}@{workflow}@{version}" if version else queue


def broker_queues(wf: Workflow, base: Iterable[str] | None = None) -> set[str]:
    """The broker queues a worker hosting `wf` consumes: one per step queue (`base`, or
    every queue its steps name, and the default one, where branches go) for its version."""
    names = set(base) if base is not None else {*wf.queues().values(), DEFAULT_QUEUE}
    return {queue_for(q, wf.name, wf.version_id) for q in names}


def step_task_name(workflow: str, step: str) -> str:
    """`<Workflow>.<Step>`, the name Flower shows; START shows as `<Workflow>.START`."""
    return f"{workflow}.{'START' if step == '__start__' else step}"


def branch_task_name(workflow: str) -> str:
    return f"{workflow}.branch"

