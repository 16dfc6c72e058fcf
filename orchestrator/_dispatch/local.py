"""LocalDispatcher: the embedded mode. Steps run on a thread pool in this process, and a
sweeper thread fires timers (retry backoff, gate timeouts), as coordinators do on a cluster.

The dispatcher holds its runtime weakly: a runtime nobody references any more (its runner
and handles dropped) is collected, and its sweeper thread ends with it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from .._engine import Command, Revoke, SendFork, SendTask
from .._records import Task
from .base import Dispatcher

if TYPE_CHECKING:
    from .._runtime import Runtime

log = logging.getLogger("orchestrator.local")


class LocalDispatcher(Dispatcher):
    def __init__(self, max_workers: int = 8, sweep_interval: float = 0.05) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="step")
        self._runtime: weakref.ref[Runtime] | None = None
        self._sweep_interval = sweep_interval
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sweeper: threading.Thread | None = None
        self._waiting: set[str] = set()  # message ids submitted and not started yet

    def bind(self, runtime: Runtime) -> None:
        if self._runtime is not None:
            raise RuntimeError("LocalDispatcher is already bound to a runtime")
        self._runtime = weakref.ref(runtime)
        self._sweeper = threading.Thread(
            target=_sweep_loop, args=(self._runtime, self._stopping, self._sweep_interval),
            daemon=True, name="orchestrator-sweeper")
        self._sweeper.start()

    @property
    def runtime(self) -> Runtime:
        runtime = self._runtime() if self._runtime is not None else None
        if runtime is None:
            raise RuntimeError("LocalDispatcher is not bound to a live runtime")
        return runtime

    def send(self, commands: Sequence[Command]) -> None:
        if self._stopping.is_set():
            # Closed (or the interpreter is exiting): what is not sent stays in the store,
            # where a runtime over the same store would pick it up.
            log.info("embedded runtime closed: %d command(s) not sent", len(commands))
            return
        for cmd in commands:
            if isinstance(cmd, SendTask):
                self._submit(cmd.workflow, cmd.run_id, cmd.task)
            elif isinstance(cmd, SendFork):  # the branch that keeps the last result joins
                for t in cmd.tasks:
                    self._submit(cmd.workflow, cmd.run_id, t)
            elif isinstance(cmd, Revoke):
                # Threads cannot be killed; the run no longer expects them, so whatever they
                # return is ignored, and a branch not yet started skips itself.
                log.info("revoked %s", ", ".join(self.message_id(cmd.run_id, t)
                                                  for t in cmd.tasks))

    def message_ids(self, queue: str, taken_within: float = 0.0) -> frozenset[str] | None:
        """Tasks waiting for a thread of the pool: a backlog, not lost work."""
        with self._lock:
            return frozenset(self._waiting)

    def _submit(self, workflow: str, run_id: str, task: Task) -> Future[None]:
        message = self.message_id(run_id, task)
        with self._lock:
            self._waiting.add(message)
        try:
            return self._pool.submit(self._guarded, workflow, run_id, task.token, task.branch,
                                     task.attempt, message)
        except RuntimeError:  # the pool shut down under us (close, interpreter exit)
            done: Future[None] = Future()
            done.set_result(None)
            return done

    def _guarded(self, workflow: str, run_id: str, token: int, branch: str | None,
                 attempt: int, message: str) -> None:
        with self._lock:
            self._waiting.discard(message)
        try:
            self.runtime.execute(workflow, run_id, token, branch, attempt=attempt)
        except Exception:
            log.exception("run %s: task %s failed in the runtime", run_id, token)

    def close(self) -> None:
        """Stop: nothing more is sent, and the sweeper has finished its pass when this
        returns (a pass still going could claim timers of whatever uses the store next)."""
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        sweeper = self._sweeper
        if sweeper is not None and sweeper is not threading.current_thread():
            sweeper.join(10)


def _sweep_loop(ref: weakref.ref[Runtime], stopping: threading.Event, interval: float) -> None:
    saturated = False
    while not stopping.wait(0 if saturated else interval):
        runtime = ref()
        if runtime is None:
            return
        try:
            runtime.sweep_all()
        except Exception:
            log.exception("sweep failed")
        saturated = runtime.sweeper.saturated
        del runtime
