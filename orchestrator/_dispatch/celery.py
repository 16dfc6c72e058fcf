"""CeleryDispatcher: each step a task named `<Workflow>.<Step>` on its queue; a fork is a
chord of branch tasks whose body, on the coordinator queue, joins the run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery, chord

from .._config import COORDINATOR_QUEUE
from .._engine import Command, Revoke, SendFork, SendTask, celery_task_id
from .._records import Task
from .base import JOIN_TASK, Dispatcher, branch_task_name, step_task_name


class CeleryDispatcher(Dispatcher):
    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(self, commands: Sequence[Command]) -> None:
        if not commands:
            return
        with self.app.producer_or_acquire() as producer:
            for cmd in commands:
                if isinstance(cmd, SendTask):
                    self._signature(cmd.workflow, cmd.run_id, cmd.task).apply_async(
                        producer=producer)
                elif isinstance(cmd, SendFork):
                    header = [self._signature(cmd.workflow, cmd.run_id, t) for t in cmd.tasks]
                    body = self.app.signature(
                        JOIN_TASK, args=(cmd.workflow, cmd.run_id, cmd.token),
                        queue=COORDINATOR_QUEUE, immutable=True)
                    chord(header, body, app=self.app).apply_async(producer=producer)
                elif isinstance(cmd, Revoke):
                    self.app.control.revoke(list(cmd.task_ids), terminate=True,
                                            signal="SIGTERM")

    def queue_length(self, queue: str) -> int:
        try:
            with self.app.connection_or_acquire() as conn:
                declared = conn.default_channel.queue_declare(queue=queue, passive=True)
                return int(declared.message_count)
        except Exception:  # a queue never declared has no backlog
            return 0

    def _signature(self, workflow: str, run_id: str, task: Task) -> Any:
        args: tuple[str, int] | tuple[str, int, str]
        if task.branch is None:
            name, args = step_task_name(workflow, task.step), (run_id, task.token)
        else:
            name, args = branch_task_name(workflow), (run_id, task.token, task.branch)
        return self.app.signature(name, args=args, queue=task.queue,
                                  task_id=celery_task_id(run_id, task))
