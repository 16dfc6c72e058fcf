"""LocalDispatcher: the embedded mode. Steps run on a thread pool in this process, and a
sweeper thread fires timers (retry backoff, gate timeouts), as coordinators do on a cluster.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from .._engine import Command, Revoke, SendFork, SendTask
from .base import Dispatcher

if TYPE_CHECKING:
    from .._runtime import Runtime

log = logging.getLogger("orchestrator.local")


class LocalDispatcher(Dispatcher):
    def __init__(self, max_workers: int = 8, sweep_interval: float = 0.05) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="step")
        self._runtime: Runtime | None = None
        self._sweep_interval = sweep_interval
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._lock = threading.Lock()

    def bind(self, runtime: Runtime) -> None:
        self._runtime = runtime
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True,
                                             name="orchestrator-sweeper")
            self._sweeper.start()

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("LocalDispatcher is not bound to a runtime")
        return self._runtime

    def send(self, commands: Sequence[Command]) -> None:
        for cmd in commands:
            if isinstance(cmd, SendTask):
                self._submit(cmd.workflow, cmd.run_id, cmd.task.token, cmd.task.branch)
            elif isinstance(cmd, SendFork):
                self._fork(cmd)
            elif isinstance(cmd, Revoke):
                # Threads cannot be killed; the run no longer expects them, so whatever they
                # return is ignored, and a branch not yet started skips itself.
                log.info("revoked %s", ", ".join(cmd.task_ids))

    def _submit(self, workflow: str, run_id: str, token: int, branch: str | None) -> Future[str]:
        return self._pool.submit(self._guarded, workflow, run_id, token, branch)

    def _guarded(self, workflow: str, run_id: str, token: int, branch: str | None) -> str:
        try:
            return self.runtime.execute(workflow, run_id, token, branch)
        except Exception:
            log.exception("run %s: task %s failed in the runtime", run_id, token)
            raise

    def _fork(self, cmd: SendFork) -> None:
        """A chord in-process: the join is submitted when the last branch returns."""
        remaining = [len(cmd.tasks)]

        def part_done(_: Future[str]) -> None:
            with self._lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last and not self._stopping.is_set():
                self._pool.submit(self._join, cmd.workflow, cmd.run_id, cmd.token)

        for t in cmd.tasks:
            self._submit(cmd.workflow, cmd.run_id, t.token, t.branch).add_done_callback(part_done)

    def _join(self, workflow: str, run_id: str, token: int) -> None:
        try:
            self.runtime.join(workflow, run_id, token)
        except Exception:
            log.exception("run %s: join failed", run_id)

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self._sweep_interval):
            try:
                self.runtime.sweep_all()
            except Exception:
                log.exception("sweep failed")

    def close(self) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
