"""CeleryDispatcher: each step a task named `<Workflow>.<Step>` on its queue; a fork is a
chord of branch tasks whose body is the step after the fork, which joins the run first."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, cast

from celery import Celery, chord
from celery.backends.redis import RedisBackend
from kombu import Producer

from .._engine import Command, Revoke, SendFork, SendTask
from .._kombu_fixes import reuse_client
from .._records import Task
from .base import Dispatcher, branch_task_name, step_task_name

log = logging.getLogger("orchestrator.dispatch")

# Past this many waiting messages the sweep does not list a queue (it falls back to the
# backlog rule): listing is for telling lost work from work that waits its turn.
MAX_LISTED = 10_000
# A hard time limit this much past a step's timeout kills a pool child whose code
# swallowed the soft limit's exception.
HARD_LIMIT_GRACE = 10.0


class CeleryDispatcher(Dispatcher):
    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(self, commands: Sequence[Command]) -> None:
        if not commands:
            return
        # A batch pipelines the LPUSHes of several messages; for a lone message (a step
        # hop) it only adds a client, a pipeline and an exit stack to the one LPUSH.
        lone = len(commands) == 1 and isinstance(commands[0], SendTask)
        with self.app.producer_or_acquire() as producer:
            reuse_client(producer.channel)
            with contextlib.nullcontext() if lone else _batch(producer):
                self._send(commands, producer)

    def _send(self, commands: Sequence[Command], producer: Producer) -> None:
        for cmd in commands:
            if isinstance(cmd, SendTask):
                self._publish(cmd.workflow, cmd.version, cmd.run_id, cmd.task, producer)
            elif isinstance(cmd, SendFork):
                self._send_chord(cmd, producer)
            elif isinstance(cmd, Revoke):
                ids = [self.message_id(cmd.run_id, t) for t in cmd.tasks]
                self.app.control.revoke(ids, terminate=True, signal="SIGTERM")

    def _send_chord(self, cmd: SendFork, producer: Producer) -> None:
        """A Celery chord whose body is the step after the fork, told to join first.

        On the Redis result backend the header goes out as `group.apply_async` sends it (the
        chord's size in the backend, then each task carrying the body), without building
        the canvas, which costs more than the messages themselves."""
        body = self._signature(cmd.workflow, cmd.version, cmd.run_id, cmd.then).set(
            immutable=True)
        body.kwargs["join"] = cmd.token
        if not isinstance(self.app.backend, RedisBackend):
            header = [self._signature(cmd.workflow, cmd.version, cmd.run_id, t)
                      for t in cmd.tasks]
            chord(header, body, app=self.app).apply_async(producer=producer)
            return
        group_id = uuid.uuid4().hex  # one per chord sent: a fork may send more than one
        self.app.backend.set_chord_size(group_id, len(cmd.tasks))
        for index, task in enumerate(cmd.tasks):
            self._publish(cmd.workflow, cmd.version, cmd.run_id, task, producer, chord=body,
                          group_id=group_id, group_index=index)

    def queue_length(self, queue: str) -> int:
        try:
            with self.app.connection_or_acquire() as conn:
                declared = conn.default_channel.queue_declare(queue=queue, passive=True)
                return int(declared.message_count)
        except Exception:  # a queue never declared has no backlog
            return 0

    def message_ids(self, queue: str, taken_within: float = 0.0) -> frozenset[str] | None:
        """On kombu's Redis transport a queue is a list of JSON messages, and a message a
        worker took sits in the `unacked` hash, indexed by when it was taken: both can be
        read. A message taken less than `taken_within` seconds ago counts as waiting (its
        worker is about to start it); one held longer by a worker with prefetch 1 and no
        lease was taken by a worker that died, and kombu would give it back only after the
        visibility timeout. Elsewhere: None."""
        try:
            with self.app.connection_for_read() as conn:
                if conn.transport.driver_type != "redis":
                    return None
                channel = cast(Any, conn.default_channel)
                client = channel.client
                if client.llen(queue) > MAX_LISTED:
                    return None
                waiting = [json.loads(m) for m in client.lrange(queue, 0, -1)]
                tags = client.zrangebyscore(channel.unacked_index_key,
                                            time.time() - taken_within, "+inf")
                held = client.hmget(channel.unacked_key, tags) if tags else []
        except Exception as exc:  # the sweep then falls back to the backlog rule
            log.debug("cannot list queue %s: %s", queue, exc)
            return None
        waiting += [json.loads(h)[0] for h in held if h is not None]
        ids = (m.get("headers", {}).get("id") for m in waiting if isinstance(m, dict))
        return frozenset(i for i in ids if i)

    def _message(self, workflow: str, version: str, run_id: str,
                 task: Task) -> tuple[str, dict[str, Any]]:
        """A task's name, and the options it is sent with."""
        args: tuple[str, int] | tuple[str, int, str]
        if task.branch is None:
            name, args = step_task_name(workflow, task.step), (run_id, task.token)
        else:
            name, args = branch_task_name(workflow), (run_id, task.token, task.branch)
        options: dict[str, Any] = {"args": args}
        if task.attempt > 1:
            options["kwargs"] = {"attempt": task.attempt}
        if task.policy.timeout is not None:  # a prefork child is interrupted at its timeout
            options["soft_time_limit"] = task.policy.timeout
            options["time_limit"] = task.policy.timeout + HARD_LIMIT_GRACE
        # Our store keeps every result. Ignoring Celery's saves a SUBSCRIBE/UNSUBSCRIBE
        # per send and a SETEX + PUBLISH per task; a chord still counts its header,
        # since Celery's backend runs on_chord_part_return whether or not it stores.
        options.update(queue=self.queue_of(workflow, version, task),
                       task_id=self.message_id(run_id, task), ignore_result=True)
        return name, options

    def _signature(self, workflow: str, version: str, run_id: str, task: Task) -> Any:
        name, options = self._message(workflow, version, run_id, task)
        return self.app.signature(name, **options)

    def _publish(self, workflow: str, version: str, run_id: str, task: Task,
                 producer: Producer, **extra: Any) -> None:
        """Send one task's message: `send_task` as `signature(...).apply_async` calls it,
        without building the signature, and with the args' repr given (Celery's
        `saferepr` of them costs more than the rest of the headers)."""
        name, options = self._message(workflow, version, run_id, task)
        self.app.send_task(name, producer=producer, add_to_parent=False,
                           argsrepr=repr(options["args"]),
                           kwargsrepr=repr(options.get("kwargs", {})), **options, **extra)


@contextlib.contextmanager
def _batch(producer: Producer) -> Iterator[None]:
    """Publish what is sent inside in one round trip where the transport can (kombu's
    Redis transport pipelines the LPUSHes); elsewhere each message goes out at once."""
    batch = getattr(producer, "batch", None)
    with batch() if batch is not None else contextlib.nullcontext():
        yield
