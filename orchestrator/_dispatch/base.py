"""The Dispatcher port: carry out the engine's commands (send a task, a fork, a revoke)."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from .._engine import Command
from .._records import Task


class Dispatcher(abc.ABC):
    @abc.abstractmethod
    def send(self, commands: Sequence[Command]) -> None:
        """Send every command; called after the decision that produced them is committed."""

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


def step_task_name(workflow: str, step: str) -> str:
    """`<Workflow>.<Step>`, the name Flower shows; START shows as `<Workflow>.START`."""
    return f"{workflow}.{'START' if step == '__start__' else step}"


def branch_task_name(workflow: str) -> str:
    return f"{workflow}.branch"

