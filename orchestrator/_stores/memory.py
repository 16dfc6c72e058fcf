"""MemoryStore: the embedded mode's store. One process, a lock, JSON copies in and out.

It keeps the same contract as RedisStore (capped history, retention, corrupt records) with
plain dicts; listings sort the runs' small index entries rather than keep sorted indexes,
which is fine for what one process holds.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .._records import BranchResult, RunRecord, RunStatus
from .base import (
    TOTALS,
    TRIMMED,
    WAIT_KINDS,
    CorruptRecord,
    EndWatch,
    Loaded,
    Outbox,
    RunPage,
    RunStore,
    Waits,
    check_limit,
    closed_fork,
    decode_cursor,
    encode_cursor,
    ended_as,
    entry_json,
    parse_record,
    record_json,
    wait_since,
)


@dataclass
class _History:
    """The first `limit` entries and the last `limit`, each numbered as it was appended."""

    limit: int
    head: list[str] = field(default_factory=list)
    tail: deque[str] = field(default_factory=deque)
    count: int = 0

    def append(self, entry: dict[str, Any]) -> None:
        body = entry_json(entry)
        stamped = f'{{"n":{self.count}' + ("}" if body == "{}" else f",{body[1:]}")
        if self.count < self.limit:
            self.head.append(stamped)
        else:
            self.tail.append(stamped)
            if len(self.tail) > self.limit:
                self.tail.popleft()
        self.count += 1

    def window(self, start: int, end: int) -> list[dict[str, Any]]:
        total, limit = self.count, self.limit
        start = max(0, start + total) if start < 0 else start
        end = end + total if end < 0 else min(end, total - 1)
        first_tail = max(limit, total - limit)  # the n of the tail's first entry
        out = [json.loads(e) for e in self.head[start:end + 1]]
        dropped = min(end, first_tail - 1) - max(start, limit) + 1
        if dropped > 0:
            out.append({"event": TRIMMED, "dropped": dropped})
        low, high = max(start, first_tail) - first_tail, end - first_tail
        if low <= high:
            out += [json.loads(e) for e in list(self.tail)[low:high + 1]]
        return out


@dataclass
class _Run:
    """Everything one run holds, so it all goes at once."""

    version: int
    doc: str
    created_at: float
    workflow: str
    status: RunStatus
    history: _History
    indexed: bool = True  # listed (False once quarantined)
    expires_at: float | None = None  # finished: when it is forgotten
    leases: dict[str, float] = field(default_factory=dict)  # task -> lease ends
    starts: dict[tuple[str, int], int] = field(default_factory=dict)
    forks: dict[int, dict[str, str]] = field(default_factory=dict)


class MemoryStore(RunStore):
    def __init__(self, key_prefix: str = "orchestrator:", retain_seconds: int = 7 * 24 * 3600,
                 history_limit: int = 1000) -> None:
        self.key_prefix = key_prefix
        self.retain_seconds = retain_seconds
        self.history_limit = history_limit
        self._lock = threading.Lock()
        self._ended = threading.Condition()
        self._ends: dict[str, int] = {}  # run id -> times its end was announced
        self._runs: dict[str, _Run] = {}
        self._due: dict[str, float] = {}
        self._gates: set[str] = set()
        self._corrupt: set[str] = set()
        self._totals: dict[str, dict[str, int]] = {}  # workflow -> TOTALS -> count
        # kind -> run id -> (workflow, when its wait began)
        self._waits: dict[str, dict[str, tuple[str, float]]] = {k: {} for k in WAIT_KINDS}

    def now(self) -> float:
        return time.time()

    def _run(self, run_id: str) -> _Run | None:
        """The run, unless its retention ended (it is then gone, as its keys in Redis)."""
        run = self._runs.get(run_id)
        if run is None or (run.expires_at is not None and run.expires_at <= self.now()):
            return None
        return run

    def create(self, record: RunRecord, history: list[dict[str, Any]], due: float | None,
               outbox: Outbox | None = None) -> bool:
        _no_outbox(outbox)
        with self._lock:
            if self._run(record.run_id) is not None:
                return False
            self._forget(record.run_id)  # a run of this id that expired
            run = _Run(1, record_json(record), record.created_at, record.workflow,
                       record.status, _History(self.history_limit))
            for h in history:
                run.history.append(h)
            self._runs[record.run_id] = run
            self._set_due(record.run_id, due)
            self._count(record.workflow, "started")
            return True

    def _count(self, workflow: str, total: str) -> None:
        counts = self._totals.setdefault(workflow, dict.fromkeys(TOTALS, 0))
        counts[total] += 1

    def load(self, run_id: str) -> Loaded:
        with self._lock:
            return self._load(run_id)

    def _load(self, run_id: str, starts: int = 1) -> Loaded:
        run = self._run(run_id)
        if run is None:
            return Loaded(None, 0, self.now(), starts)
        return Loaded(parse_record(run_id, run.doc), run.version, self.now(), starts)

    def begin_task(self, run_id: str, task_id: str, lease_ttl: float,
                   attempt: int = 1) -> Loaded:
        with self._lock:
            run = self._run(run_id)
            if run is None:
                return self._load(run_id)
            run.leases[task_id] = self.now() + lease_ttl
            began = run.starts[(task_id, attempt)] = run.starts.get((task_id, attempt), 0) + 1
            return self._load(run_id, began)

    def renew_lease(self, run_id: str, task_id: str, lease_ttl: float) -> None:
        with self._lock:
            run = self._run(run_id)
            leases = run.leases if run is not None else None
            if leases is not None and leases.get(task_id, 0.0) > self.now():
                leases[task_id] = self.now() + lease_ttl

    def live_leases(self, run_id: str, task_ids: list[str]) -> frozenset[str]:
        now = self.now()
        with self._lock:
            run = self._run(run_id)
            held = run.leases if run is not None else {}
            return frozenset(t for t in task_ids if held.get(t, 0.0) > now)

    def commit(
        self,
        previous: RunRecord,
        version: int,
        record: RunRecord,
        history: list[dict[str, Any]],
        due: float | None,
        release: str | None = None,
        outbox: Outbox | None = None,
    ) -> bool:
        _no_outbox(outbox)
        with self._lock:
            run = self._run(record.run_id)
            if run is None or run.version != version:
                return False
            run.version, run.doc = version + 1, record_json(record)
            run.status = record.status
            for h in history:
                run.history.append(h)
            closed = closed_fork(previous, record)
            if closed is not None:
                run.forks.pop(closed, None)
            if release is not None:
                run.leases.pop(release, None)
            self._set_due(record.run_id, due)
            if record.gate is None:
                self._gates.discard(record.run_id)
            else:
                self._gates.add(record.run_id)
            if (ended := ended_as(previous, record)) is not None:
                self._count(record.workflow, ended)
            for kind, waits in self._waits.items():
                since = wait_since(record, kind)
                if since is None:
                    waits.pop(record.run_id, None)
                else:
                    waits[record.run_id] = (record.workflow, since)
            if record.status.is_terminal:
                run.expires_at = self.now() + self.retain_seconds
            return True

    def _set_due(self, run_id: str, due: float | None) -> None:
        if due is None:
            self._due.pop(run_id, None)
        else:
            self._due[run_id] = due

    def note(self, run_id: str, entry: dict[str, Any], release: str | None = None) -> None:
        with self._lock:
            run = self._run(run_id)
            if run is None:
                return
            run.history.append(entry)
            if release is not None:
                run.leases.pop(release, None)

    def record_branch(self, run_id: str, token: int, branch: str, result: BranchResult,
                      entry: dict[str, Any], release: str, width: int,
                      join_at: float) -> int | None:
        with self._lock:
            run = self._run(run_id)
            rec = self._load(run_id).record
            if run is None or rec is None or rec.fork is None or rec.fork.token != token:
                return None
            results = run.forks.setdefault(token, {})
            if branch in results:
                return None
            results[branch] = result.model_dump_json()
            run.history.append(entry)
            run.leases.pop(release, None)
            if len(results) >= width:
                self._due[run_id] = min(self._due.get(run_id, join_at), join_at)
            return len(results)

    def branch_results(self, run_id: str, token: int) -> dict[str, BranchResult]:
        with self._lock:
            run = self._run(run_id)
            raw = dict(run.forks.get(token, {})) if run is not None else {}
        return {k: BranchResult.model_validate_json(v) for k, v in raw.items()}

    def set_due(self, run_id: str, due: float | None, version: int | None = None) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            if version is not None and (run is None or run.version != version):
                return
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
            run = self._run(run_id)
            return run.history.window(start, end) if run is not None else []

    def page_runs(self, status: RunStatus | None = None, workflow: str | None = None,
                  limit: int = 50, cursor: str | None = None) -> RunPage:
        check_limit(limit)
        after = None if cursor is None else decode_cursor(cursor)
        with self._lock:
            # Newest first, ties by descending id: the order of a Redis sorted set.
            listed = sorted(((run.created_at, run_id) for run_id, run in self._listed()
                             if (status is None or run.status == status)
                             and (workflow is None or run.workflow == workflow)
                             and (after is None or (run.created_at, run_id) < after)),
                            reverse=True)
            docs = {run_id: self._runs[run_id].doc for _, run_id in listed}
        records: list[RunRecord] = []
        for _, run_id in listed:
            if len(records) == limit:
                return RunPage(records, encode_cursor(records[-1]))
            try:
                records.append(parse_record(run_id, docs[run_id]))
            except CorruptRecord:
                continue  # the sweep quarantines it: one bad record must not break listing
        return RunPage(records, None)

    def _listed(self) -> list[tuple[str, _Run]]:
        now = self.now()
        return [(run_id, run) for run_id, run in self._runs.items() if run.indexed
                and (run.expires_at is None or run.expires_at > now)]

    def count_runs(self, workflow: str | None = None) -> dict[RunStatus, int]:
        counts = dict.fromkeys(RunStatus, 0)
        with self._lock:
            for _, run in self._listed():
                if workflow is None or run.workflow == workflow:
                    counts[run.status] += 1
        return counts

    def run_totals(self, workflow: str) -> dict[str, int]:
        with self._lock:
            return dict(self._totals.get(workflow, dict.fromkeys(TOTALS, 0)))

    def waiting(self, workflow: str) -> dict[str, Waits]:
        with self._lock:
            found = {kind: [since for wf, since in waits.values() if wf == workflow]
                     for kind, waits in self._waits.items()}
        return {kind: Waits(len(since), min(since, default=None))
                for kind, since in found.items()}

    def count_overdue(self, before: float) -> int:
        with self._lock:
            return sum(1 for due in self._due.values() if due < before)

    def find_run_ids(self, prefix: str, limit: int = 10) -> list[str]:
        with self._lock:
            ids = [r for r in self._runs if r.startswith(prefix) and self._run(r) is not None]
        return sorted(ids)[:limit]

    def pending_gates(self, approver: str | None = None) -> list[RunRecord]:
        with self._lock:
            docs = [(r, run.doc) for r, run in self._listed() if r in self._gates]
        out = []
        for run_id, doc in sorted(docs):
            try:
                rec = parse_record(run_id, doc)
            except CorruptRecord:
                continue
            if rec.gate is not None and (approver is None or approver in rec.gate.approvers):
                out.append(rec)
        return out

    def purge_expired(self, limit: int = 500) -> int:
        now = self.now()
        with self._lock:
            ended = [r for r, run in self._runs.items()
                     if run.expires_at is not None and run.expires_at <= now][:limit]
            for run_id in ended:
                self._forget(run_id)
            return len(ended)

    def _forget(self, run_id: str) -> None:
        self._runs.pop(run_id, None)
        self._due.pop(run_id, None)
        self._gates.discard(run_id)
        self._corrupt.discard(run_id)
        for waits in self._waits.values():
            waits.pop(run_id, None)

    def quarantine(self, run_id: str) -> None:
        with self._lock:
            run = self._run(run_id)
            if run is None:
                return
            run.indexed = False
            self._due.pop(run_id, None)
            self._gates.discard(run_id)
            self._corrupt.add(run_id)
            for waits in self._waits.values():
                waits.pop(run_id, None)

    def corrupt_runs(self) -> list[str]:
        with self._lock:
            return sorted(self._corrupt)

    def announce_end(self, run_id: str) -> None:
        with self._ended:
            self._ends[run_id] = self._ends.get(run_id, 0) + 1
            self._ended.notify_all()

    @contextlib.contextmanager
    def watch_end(self, run_id: str) -> Iterator[EndWatch]:
        with self._ended:
            seen = self._ends.get(run_id, 0)

        def wait(seconds: float) -> None:
            nonlocal seen
            with self._ended:
                self._ended.wait_for(lambda: self._ends.get(run_id, 0) != seen, seconds)
                seen = self._ends.get(run_id, 0)

        yield EndWatch(wait)

    def raw(self, run_id: str) -> dict[str, str] | None:
        with self._lock:
            run = self._run(run_id)
            return None if run is None else {"v": str(run.version), "doc": run.doc,
                                             "wf": run.workflow}


def _no_outbox(outbox: Outbox | None) -> None:
    if outbox is not None:  # sends_for is False: a caller that sent one skipped asking
        raise ValueError("a MemoryStore cannot send messages; send them after the commit")
