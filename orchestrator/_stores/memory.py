"""MemoryStore: the embedded mode's store. One process, a lock, JSON copies in and out."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from .._records import BranchResult, RunRecord, RunStatus
from .base import Loaded, RunStore, closed_fork


class MemoryStore(RunStore):
    def __init__(self, key_prefix: str = "orchestrator:") -> None:
        self.key_prefix = key_prefix
        self._lock = threading.Lock()
        self._docs: dict[str, tuple[int, str]] = {}
        self._history: dict[str, list[str]] = {}
        self._leases: dict[tuple[str, str], tuple[float, int]] = {}
        self._due: dict[str, float] = {}
        self._forks: dict[tuple[str, int], dict[str, str]] = {}

    def now(self) -> float:
        return time.time()

    def create(self, record: RunRecord, history: list[dict[str, Any]], due: float | None) -> bool:
        with self._lock:
            if record.run_id in self._docs:
                return False
            self._docs[record.run_id] = (1, record.model_dump_json())
            self._history[record.run_id] = [json.dumps(h) for h in history]
            self._set_due(record.run_id, due)
            return True

    def load(self, run_id: str) -> Loaded:
        with self._lock:
            return self._load(run_id)

    def _load(self, run_id: str) -> Loaded:
        found = self._docs.get(run_id)
        if found is None:
            return Loaded(None, 0, self.now())
        return Loaded(RunRecord.model_validate_json(found[1]), found[0], self.now())

    def begin_task(self, run_id: str, task_id: str, lease_ttl: float) -> Loaded:
        with self._lock:
            now = self.now()
            expires, starts = self._leases.get((run_id, task_id), (0.0, 0))
            starts = starts + 1 if expires > now else 1
            self._leases[(run_id, task_id)] = (now + lease_ttl, starts)
            loaded = self._load(run_id)
            return Loaded(loaded.record, loaded.version, loaded.now, starts)

    def renew_lease(self, run_id: str, task_id: str, lease_ttl: float) -> None:
        with self._lock:
            if (run_id, task_id) in self._leases:
                starts = self._leases[(run_id, task_id)][1]
                self._leases[(run_id, task_id)] = (self.now() + lease_ttl, starts)

    def live_leases(self, run_id: str, task_ids: list[str]) -> frozenset[str]:
        now = self.now()
        with self._lock:
            return frozenset(
                t for t in task_ids if self._leases.get((run_id, t), (0.0, 0))[0] > now)

    def commit(
        self,
        previous: RunRecord,
        version: int,
        record: RunRecord,
        history: list[dict[str, Any]],
        due: float | None,
        release: str | None = None,
    ) -> bool:
        with self._lock:
            current = self._docs.get(record.run_id)
            if current is None or current[0] != version:
                return False
            self._docs[record.run_id] = (version + 1, record.model_dump_json())
            self._history[record.run_id].extend(json.dumps(h) for h in history)
            closed = closed_fork(previous, record)
            if closed is not None:
                self._forks.pop((record.run_id, closed), None)
            if release is not None:
                self._leases.pop((record.run_id, release), None)
            self._set_due(record.run_id, due)
            return True

    def _set_due(self, run_id: str, due: float | None) -> None:
        if due is None:
            self._due.pop(run_id, None)
        else:
            self._due[run_id] = due

    def note(self, run_id: str, entry: dict[str, Any], release: str | None = None) -> None:
        with self._lock:
            if run_id in self._history:
                self._history[run_id].append(json.dumps(entry))
            if release is not None:
                self._leases.pop((run_id, release), None)

    def record_branch(self, run_id: str, token: int, branch: str, result: BranchResult,
                      entry: dict[str, Any], release: str, width: int,
                      join_at: float) -> int | None:
        with self._lock:
            rec = self._load(run_id).record
            if rec is None or rec.fork is None or rec.fork.token != token:
                return None
            results = self._forks.setdefault((run_id, token), {})
            if branch in results:
                return None
            results[branch] = result.model_dump_json()
            self._history[run_id].append(json.dumps(entry))
            self._leases.pop((run_id, release), None)
            if len(results) >= width:
                self._due[run_id] = min(self._due.get(run_id, join_at), join_at)
            return len(results)

    def branch_results(self, run_id: str, token: int) -> dict[str, BranchResult]:
        with self._lock:
            raw = dict(self._forks.get((run_id, token), {}))
        return {k: BranchResult.model_validate_json(v) for k, v in raw.items()}

    def set_due(self, run_id: str, due: float | None) -> None:
        with self._lock:
            self._set_due(run_id, due)

    def claim_due(self, limit: int, hold_for: float) -> list[str]:
        now = self.now()
        with self._lock:
            ready = sorted((t, r) for r, t in self._due.items() if t <= now)[:limit]
            for _, run_id in ready:
                self._due[run_id] = now + hold_for
            return [r for _, r in ready]

    def history(self, run_id: str, start: int = 0, end: int = -1) -> list[dict[str, Any]]:
        with self._lock:
            items = self._history.get(run_id, [])
            stop = None if end == -1 else end + 1
            return [json.loads(h) for h in items[start:stop]]

    def list_runs(
        self, status: RunStatus | None = None, workflow: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        with self._lock:
            records = [RunRecord.model_validate_json(doc) for _, doc in self._docs.values()]
        records = [r for r in records if (status is None or r.status == status)
                   and (workflow is None or r.workflow == workflow)]
        return sorted(records, key=lambda r: r.created_at, reverse=True)[:limit]

    def pending_gates(self, approver: str | None = None) -> list[RunRecord]:
        return [r for r in self.list_runs(limit=10**9) if r.gate is not None
                and (approver is None or approver in r.gate.approvers)]
