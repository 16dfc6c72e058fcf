"""The RunStore port: where run records, their history, leases and timers live.

Every write of a record is a compare-and-set on its version, so two processes deciding
about the same run at once cannot both win: the loser reloads and decides again.
"""

from __future__ import annotations

import abc
import contextlib
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
        """Keep a lease alive while the body runs (a heartbeat thread renews it)."""
        import threading

        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(ttl / 3):
                # A missed beat only risks a harmless redispatch.
                with contextlib.suppress(Exception):
                    self.renew_lease(run_id, task_id, ttl)

        thread = threading.Thread(target=beat, name=f"lease-{task_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()


def closed_fork(previous: RunRecord, record: RunRecord) -> int | None:
    """The token of a fork `previous` had open and `record` no longer has."""
    if previous.fork is None:
        return None
    if record.fork is not None and record.fork.token == previous.fork.token:
        return None
    return previous.fork.token


def gate_approvers(record: RunRecord | None) -> set[str]:
    return set(record.gate.approvers) if record is not None and record.gate is not None else set()
