"""CeleryDispatcher: each step a task named `<Workflow>.<Step>` on its queue; a fork's
branches go out as one Celery group.

A fork is a chord whose counter is our store, not Celery's result backend: each branch
keeps its result with `record_branch` (one script, which counts them), and the branch that
keeps the last one joins the fork, whose commit sends the step after it. Celery's chord
join would cost every branch another round trip (its counter script and the result it
stores) and every fork a body message, and its failure modes (a lost counter, a hanging
chord: celery #3363, #2725, #9674) are the ones the sweep's re-driven join covers here.

Where the broker is the store's own Redis, the messages are not published after a commit
but written by it (`outbox`): Celery builds each message (`amqp.create_task_message`, as
`send_task` does), and the commit script LPUSHes it onto its queue as kombu's Redis
transport would. A step hop then costs one round trip less, and a commit can no longer
stand without its messages.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, cast

from celery import Celery
from kombu import Producer
from kombu.utils.json import dumps as kombu_dumps

from .._engine import Command, Revoke, SendFork, SendTask
from .._kombu_fixes import reuse_client
from .._records import Task
from .._stores.base import Outbox
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
                for task, group in _grouped(cmd):
                    self._publish(cmd.workflow, cmd.version, cmd.run_id, task, producer,
                                  **group)
            elif isinstance(cmd, Revoke):
                ids = [self.message_id(cmd.run_id, t) for t in cmd.tasks]
                self.app.control.revoke(ids, terminate=True, signal="SIGTERM")

    def outbox(self, commands: Sequence[Command]) -> tuple[Outbox, list[Command]] | None:
        if not self._writes_queues or not any(isinstance(c, SendTask | SendFork)
                                              for c in commands):
            return None
        writes: list[tuple[str, str, str]] = []
        rest: list[Command] = []
        for cmd in commands:
            if isinstance(cmd, SendTask):
                writes.append(self._push(cmd.workflow, cmd.version, cmd.run_id, cmd.task))
            elif isinstance(cmd, SendFork):
                writes += [self._push(cmd.workflow, cmd.version, cmd.run_id, task, **group)
                           for task, group in _grouped(cmd)]
            else:
                rest.append(cmd)
        return Outbox(tuple(writes)), rest

    @functools.cached_property
    def _writes_queues(self) -> bool:
        """Whether a message can be written straight onto its queue: kombu's Redis
        transport with no key prefix, sent events or routes to honour (a publish would
        apply them)."""
        conf = self.app.conf
        with self.app.connection_for_write() as conn:
            driver = conn.transport.driver_type
        return (driver == "redis"
                and not (conf.broker_transport_options or {}).get("global_keyprefix")
                and not conf.task_send_sent_event and not conf.task_routes
                and conf.task_default_priority is None and int(conf.task_protocol) == 2)

    def _push(self, workflow: str, version: str, run_id: str, task: Task,
              **group: Any) -> tuple[str, str, str]:
        """The LPUSH that sends one task: its message as kombu's Redis transport writes
        it (an anonymous-exchange publish, priority 0, so the key is the queue's name)."""
        name, options = self._message(workflow, version, run_id, task)
        args, kwargs = options["args"], options.get("kwargs", {})
        root_id = parent_id = None
        parent = self.app.current_worker_task  # as send_task links a step to its sender
        if parent is not None:
            root_id = parent.request.root_id or parent.request.id
            parent_id = parent.request.id
        headers, properties, body, _ = self.app.amqp.create_task_message(
            options["task_id"], name, args, kwargs, group_id=group.get("group_id"),
            group_index=group.get("group_index"), reply_to=self.app.thread_oid,
            time_limit=options.get("time_limit"),
            soft_time_limit=options.get("soft_time_limit"), root_id=root_id,
            parent_id=parent_id, ignore_result=True, argsrepr=repr(args),
            kwargsrepr=repr(kwargs))
        queue = options["queue"]
        message = {
            "body": base64.b64encode(kombu_dumps(body).encode()).decode(),
            "content-encoding": "utf-8", "content-type": "application/json",
            "headers": headers,
            "properties": {**properties, "delivery_mode": 2,
                           "delivery_info": {"exchange": "", "routing_key": queue},
                           "priority": 0, "body_encoding": "base64",
                           "delivery_tag": str(uuid.uuid4())}}
        return queue, "push", kombu_dumps(message)

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
        # per send and a SETEX + PUBLISH per task.
        options.update(queue=self.queue_of(workflow, version, task),
                       task_id=self.message_id(run_id, task), ignore_result=True)
        return name, options

    def _publish(self, workflow: str, version: str, run_id: str, task: Task,
                 producer: Producer, **extra: Any) -> None:
        """Send one task's message: `send_task` as `signature(...).apply_async` calls it,
        without building the signature, and with the args' repr given (Celery's
        `saferepr` of them costs more than the rest of the headers)."""
        name, options = self._message(workflow, version, run_id, task)
        self.app.send_task(name, producer=producer, add_to_parent=False,
                           argsrepr=repr(options["args"]),
                           kwargsrepr=repr(options.get("kwargs", {})), **options, **extra)


def _grouped(cmd: SendFork) -> Iterator[tuple[Task, dict[str, Any]]]:
    """A fork's branch tasks, each with its place in the fork's Celery group (one group id
    per send: a fork may send more than one)."""
    group_id = uuid.uuid4().hex
    for index, task in enumerate(cmd.tasks):
        yield task, {"group_id": group_id, "group_index": index}


@contextlib.contextmanager
def _batch(producer: Producer) -> Iterator[None]:
    """Publish what is sent inside in one round trip where the transport can (kombu's
    Redis transport pipelines the LPUSHes); elsewhere each message goes out at once."""
    batch = getattr(producer, "batch", None)
    with batch() if batch is not None else contextlib.nullcontext():
        yield
