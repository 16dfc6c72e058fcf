"""The RunStore port: where run records, their history, leases and timers live.

Every write of a record is a compare-and-set on its version, so two processes deciding
about the same run at once cannot both win: the loser reloads and decides again.
"""

from __future__ import annotations

import abc
import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .._records import BranchResult, RunRecord, RunStatus


class StoreUnavailable(ConnectionError):
    """The store cannot be reached; nothing was written."""


@dataclass(frozen=True)
class Loaded:
    record: RunRecord | None
    version: int
    now: float
    starts: int = 1  # how often this task started while its lease lived


class RunStore(abc.ABC):
    """Storage for runs. Implementations must make `create` and `commit` atomic."""

    key_prefix: str

    @abc.abstractmethod
    def now(self) -> float:
        """The store's clock (seconds). Leases and timers use it, never a local clock."""

    @abc.abstractmethod
    def create(self, record: RunRecord, history: list[dict[str, Any]], due: float | None) -> bool:
        """Write a new run; False (and no write) if the run id exists already."""

    @abc.abstractmethod
    def load(self, run_id: str) -> Loaded: ...

    @abc.abstractmethod
    def begin_task(self, run_id: str, task_id: str, lease_ttl: float) -> Loaded:
        """Load the run and take a lease that says `task_id` is alive on a worker."""

    @abc.abstractmethod
    def renew_lease(self, run_id: str, task_id: str, lease_ttl: float) -> None: ...

    @abc.abstractmethod
    def live_leases(self, run_id: str, task_ids: list[str]) -> frozenset[str]: ...

    @abc.abstractmethod
    def commit(
        self,
        previous: RunRecord,
        version: int,
        record: RunRecord,
        history: list[dict[str, Any]],
        due: float | None,
        release: str | None = None,
    ) -> bool:
        """Replace the record if it is still at `version`; append history, set the timer."""

    @abc.abstractmethod
    def note(self, run_id: str, entry: dict[str, Any], release: str | None = None) -> None:
        """Append a history entry without touching the record (e.g. an ignored completion)."""

    @abc.abstractmethod
    def record_branch(self, run_id: str, token: int, branch: str, result: BranchResult,
                      entry: dict[str, Any], release: str, width: int,
                      join_at: float) -> int | None:
        """Keep a branch's result if fork `token` is still open and the branch has none yet:
        how many branches have results now, or None if this one was not kept. When the
        last arrives, the run's timer moves to `join_at` (a lost chord join is re-driven)."""

    @abc.abstractmethod
    def branch_results(self, run_id: str, token: int) -> dict[str, BranchResult]: ...

    @abc.abstractmethod
    def claim_due(self, limit: int, hold_for: float) -> list[str]:
        """Run ids whose timer is due; each is pushed `hold_for` seconds ahead so
        concurrent sweepers do not take the same run."""

    @abc.abstractmethod
    def set_due(self, run_id: str, due: float | None) -> None:
        """Reset a run's timer without touching its record (after a sweep found nothing)."""

    @abc.abstractmethod
    def history(self, run_id: str, start: int = 0, end: int = -1) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def list_runs(
        self, status: RunStatus | None = None, workflow: str | None = None, limit: int = 100
    ) -> list[RunRecord]: ...

    @abc.abstractmethod
    def pending_gates(self, approver: str | None = None) -> list[RunRecord]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @contextmanager
    def lease(self, run_id: str, task_id: str, ttl: float) -> Iterator[None]:
        """Keep a lease alive while the body runs. One heartbeat thread per store renews
        every held lease: a thread per step would cost more than a short step."""
        if not hasattr(self, "_heartbeat"):
            self._heartbeat = _Heartbeat(self)
        key = self._heartbeat.hold(run_id, task_id, ttl)
        try:
            yield
        finally:
            self._heartbeat.release(key)


class _Heartbeat:
    """Renews each held lease every third of its TTL, from one thread."""

    def __init__(self, store: RunStore) -> None:
        self._store = store
        self._held: dict[int, tuple[str, str, float, float]] = {}  # key -> ..., renew at
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._next = 0
        self._thread: threading.Thread | None = None

    def hold(self, run_id: str, task_id: str, ttl: float) -> int:
        with self._lock:
            self._next += 1
            self._held[self._next] = (run_id, task_id, ttl, time.monotonic() + ttl / 3)
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._thread = threading.Thread(target=self._beat, daemon=True,
                                                name="orchestrator-leases")
                self._thread.start()
        self._wake.set()  # it may be sleeping past this lease's first renewal
        return self._next

    def release(self, key: int) -> None:
        with self._lock:
            self._held.pop(key, None)

    def _beat(self) -> None:
        while True:
            with self._lock:
                soonest = min((at for *_, at in self._held.values()), default=None)
            self._wake.wait(None if soonest is None else max(0.0, soonest - time.monotonic()))
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                due = [(k, h) for k, h in self._held.items() if h[3] <= now]
                for k, (run_id, task_id, ttl, _) in due:
                    self._held[k] = (run_id, task_id, ttl, now + ttl / 3)
            for _, (run_id, task_id, ttl, _) in due:
                # A missed beat only risks a harmless redispatch.
                with contextlib.suppress(Exception):
                    self._store.renew_lease(run_id, task_id, ttl)


def closed_fork(previous: RunRecord, record: RunRecord) -> int | None:
    """The token of a fork `previous` had open and `record` no longer has."""
    if previous.fork is None:
        return None
    if record.fork is not None and record.fork.token == previous.fork.token:
        return None
    return previous.fork.token


def gate_approvers(record: RunRecord | None) -> set[str]:
    return set(record.gate.approvers) if record is not None and record.gate is not None else set()
