"""The RunStore port: where run records, their history, leases and timers live.

Every write of a record is a compare-and-set on its version, so two processes deciding
about the same run at once cannot both win: the loser reloads and decides again.

History is capped, O(1) per append: a store keeps a run's first `history_limit` entries
and its last `history_limit`. Each stored entry carries its sequence number `n` (0-based,
given by the store as it appends), so a follower asks for `start = last n + 1` and never
misses or repeats an entry. Where entries were dropped between the kept head and tail,
`history()` returns one marker `{"event": "history_trimmed", "dropped": k}` (no `n`).

A finished run (completed, failed, stopped) is kept `retain_seconds`; then all its data
goes, and `purge_expired` (called by the sweep) removes what still lists it.

For metrics, a store also keeps per workflow what a scrape can read in a few cheap calls:
how many runs started and ended each way (counters that outlive the runs), and the runs
waiting at a gate or for an event, indexed by when their wait began.
"""

from __future__ import annotations

import abc
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .._records import BranchResult, RunRecord, RunStatus

TRIMMED = "history_trimmed"
WAIT_KINDS = ("gate", "event")  # the waits `RunStore.waiting` counts
TOTALS = ("started", "completed", "failed", "stopped")  # what `run_totals` counts


class StoreUnavailable(ConnectionError):
    """The store cannot be reached; nothing was written."""


class CorruptRecord(Exception):
    """A run's stored record cannot be read. Not a ValueError: the input was fine."""

    def __init__(self, run_id: str, raw: str, reason: str) -> None:
        super().__init__(f"run {run_id!r}: stored record is corrupt: {reason}")
        self.run_id = run_id
        self.raw = raw


@dataclass(frozen=True)
class Loaded:
    record: RunRecord | None
    version: int
    now: float
    starts: int = 1  # how often this (task, attempt) began, lease expiries included


@dataclass(frozen=True)
class Waits:
    """Runs waiting for one kind of thing, and when the longest of those waits began."""

    count: int = 0
    oldest: float | None = None  # the store's clock; None while nothing waits


@dataclass(frozen=True)
class EndWatch:
    """What `RunStore.watch_end` gives: `wait(seconds)` until told or the time is up."""

    wait: Callable[[float], Any]
    live: bool = True


@dataclass(frozen=True)
class Outbox:
    """Messages a store writes in the same atomic step as a create or a commit, when the
    broker is the store's own Redis (`RunStore.sends_for`): the transition and what it
    sends then stand or fall together, and sending costs no round trip of its own.

    Each write is (queue, "push", message): the message goes onto the queue (a Redis
    list). With `announce_end`, the commit also does what `announce_end` does, in the same
    step (the run ends with it, and nothing is carried out after it)."""

    writes: tuple[tuple[str, str, str], ...] = ()
    announce_end: bool = False


@dataclass(frozen=True)
class RunPage:
    records: list[RunRecord]
    next_cursor: str | None  # None: nothing listed after these


class RunStore(abc.ABC):
    """Storage for runs. Implementations must make `create` and `commit` atomic."""

    key_prefix: str

    @abc.abstractmethod
    def now(self) -> float:
        """The store's clock (seconds). Leases and timers use it, never a local clock."""

    @abc.abstractmethod
    def create(self, record: RunRecord, history: list[dict[str, Any]], due: float | None,
               outbox: Outbox | None = None) -> bool:
        """Write a new run (and send `outbox`); False (and no write) if the run id exists
        already."""

    def sends_for(self, broker_url: str) -> bool:
        """Whether create and commit can take an Outbox for the broker at `broker_url`."""
        return False

    @abc.abstractmethod
    def load(self, run_id: str) -> Loaded:
        """The run as stored; CorruptRecord if its record cannot be read."""

    @abc.abstractmethod
    def begin_task(self, run_id: str, task_id: str, lease_ttl: float,
                   attempt: int = 1) -> Loaded:
        """Load the run and take a lease that says `task_id` is alive on a worker.
        `starts` counts the times (task_id, attempt) began, whether or not earlier leases
        lapsed, so a step that kills its worker can be capped. CorruptRecord as `load`."""

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
        outbox: Outbox | None = None,
    ) -> bool:
        """Replace the record if it is still at `version`; append history, set the timer,
        send `outbox`. Nothing is written if the version moved on."""

    @abc.abstractmethod
    def note(self, run_id: str, entry: dict[str, Any], release: str | None = None) -> None:
        """Append a history entry without touching the record (e.g. an ignored completion)."""

    @abc.abstractmethod
    def record_branch(self, run_id: str, token: int, branch: str, result: BranchResult,
                      entry: dict[str, Any], release: str, width: int,
                      join_at: float) -> int | None:
        """Keep a branch's result if fork `token` is still open and the branch has none yet:
        how many branches have results now, or None if this one was not kept. When the
        last arrives, the run's timer moves to `join_at`, so that a join lost with the
        worker that was to make it is re-driven."""

    @abc.abstractmethod
    def branch_results(self, run_id: str, token: int) -> dict[str, BranchResult]: ...

    def load_joining(self, run_id: str, token: int) -> tuple[Loaded, dict[str, BranchResult]]:
        """What a join of fork `token` reads: the branches' results, then the run."""
        results = self.branch_results(run_id, token)
        return self.load(run_id), results

    @abc.abstractmethod
    def claim_due(self, limit: int, hold_for: float) -> list[str]:
        """Run ids whose timer is due; each is pushed `hold_for` seconds ahead so
        concurrent sweepers do not take the same run."""

    @abc.abstractmethod
    def set_due(self, run_id: str, due: float | None, version: int | None = None) -> None:
        """Reset a run's timer without touching its record (after a sweep found nothing);
        with `version`, only if the record is still at it (a commit since then set the
        timer that counts)."""

    @abc.abstractmethod
    def history(self, run_id: str, start: int = 0, end: int = -1) -> list[dict[str, Any]]:
        """Entries numbered `start` to `end` (inclusive; negative counts from the end, -1
        the last), a `history_trimmed` marker where dropped ones would be."""

    def list_runs(
        self, status: RunStatus | None = None, workflow: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """The first page of `page_runs`."""
        return self.page_runs(status, workflow, limit).records

    @abc.abstractmethod
    def page_runs(self, status: RunStatus | None = None, workflow: str | None = None,
                  limit: int = 50, cursor: str | None = None) -> RunPage:
        """Runs newest first, optionally of one status and/or workflow, `limit` at a time:
        pass the page's `next_cursor` for the next. Corrupt records are skipped."""

    def active_runs(self, workflow: str | None = None) -> Iterator[RunRecord]:
        """Every run not finished yet (pending, running, waiting, paused), page by page."""
        for status in RunStatus:
            if status.is_terminal:
                continue
            cursor = None
            while True:
                page = self.page_runs(status, workflow, 500, cursor)
                yield from page.records
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor

    @abc.abstractmethod
    def count_runs(self, workflow: str | None = None) -> dict[RunStatus, int]:
        """How many runs (of `workflow`) are in each status."""

    @abc.abstractmethod
    def run_totals(self, workflow: str) -> dict[str, int]:
        """How many runs of `workflow` this store ever created (`started`) and how many
        ended each way (`completed`, `failed`, `stopped`). Counters: they only grow, and
        the purge of finished runs leaves them."""

    @abc.abstractmethod
    def waiting(self, workflow: str) -> dict[str, Waits]:
        """Runs of `workflow` waiting at a gate (`gate`) and for an event (`event`), each
        with when its longest wait began; a run waiting on an AnyOf of both counts in both."""

    @abc.abstractmethod
    def count_overdue(self, before: float) -> int:
        """Runs whose timer fell due before `before` and that no sweep has claimed since."""

    @abc.abstractmethod
    def find_run_ids(self, prefix: str, limit: int = 10) -> list[str]:
        """Run ids starting with `prefix`, in order (quarantined runs included)."""

    @abc.abstractmethod
    def pending_gates(self, approver: str | None = None) -> list[RunRecord]:
        """Runs waiting at a gate (for `approver`); corrupt records are skipped."""

    @abc.abstractmethod
    def purge_expired(self, limit: int = 500) -> int:
        """Forget up to `limit` runs whose retention ended (their index entries, and in
        stores without TTLs their data): how many were purged."""

    @abc.abstractmethod
    def quarantine(self, run_id: str) -> None:
        """Take a run with a corrupt record out of the timers and listings, into
        `corrupt_runs`. Its data stays for inspection (`raw`)."""

    @abc.abstractmethod
    def corrupt_runs(self) -> list[str]: ...

    @abc.abstractmethod
    def raw(self, run_id: str) -> dict[str, str] | None:
        """The run's stored fields as text, readable when its record is not."""

    def announce_end(self, run_id: str) -> None:  # noqa: B027 - optional hook
        """Tell `watch_end` watchers that the run has just ended (after its commit)."""

    @contextlib.contextmanager
    def watch_end(self, run_id: str) -> Iterator[EndWatch]:
        """Watch for the run's end: `wait(seconds)` returns early when `announce_end` is
        called for it after the watch began (so a check of the record made inside the
        watch cannot miss it). Without a way to be told, `live` is False and `wait` sleeps."""
        yield EndWatch(time.sleep, live=False)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def record_json(record: RunRecord) -> str:
    """A record as stored: fields at their defaults are left out (a default policy on every
    task would otherwise be written, and parsed, once per task on every step)."""
    return record.model_dump_json(exclude_defaults=True)


def parse_record(run_id: str, doc: str | bytes) -> RunRecord:
    try:
        return RunRecord.model_validate_json(doc)
    except ValidationError as exc:
        text = doc.decode(errors="replace") if isinstance(doc, bytes) else doc
        reason = exc.errors()[0]["msg"] if exc.errors() else str(exc)
        raise CorruptRecord(run_id, text, reason) from None


def entry_json(entry: dict[str, Any]) -> str:
    """An entry as stored, before the store numbers it: its `n` is the store's to give."""
    return json.dumps({k: v for k, v in entry.items() if k != "n"})


def encode_cursor(last: RunRecord) -> str:
    """The cursor of the page after `last`, which listings order by (created_at, run_id)."""
    return f"{last.created_at!r}:{last.run_id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        at, run_id = cursor.split(":", 1)
        return float(at), run_id
    except ValueError:
        raise ValueError(f"not a cursor of page_runs: {cursor!r}") from None


def check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")


def closed_fork(previous: RunRecord, record: RunRecord) -> int | None:
    """The token of a fork `previous` had open and `record` no longer has."""
    if previous.fork is None:
        return None
    if record.fork is not None and record.fork.token == previous.fork.token:
        return None
    return previous.fork.token


def wait_since(record: RunRecord | None, kind: str) -> float | None:
    """When `record` began waiting for `kind` (one of WAIT_KINDS); None if it does not."""
    if record is None:
        return None
    if kind == "gate":
        return None if record.gate is None else record.gate.opened_at
    return min((w.since for w in record.events), default=None)


def ended_as(previous: RunRecord, record: RunRecord) -> str | None:
    """The status `record` ends the run in, if this commit is the one that ends it."""
    if record.status.is_terminal and record.status != previous.status:
        return record.status.value
    return None


def gate_approvers(record: RunRecord | None) -> set[str]:
    return set(record.gate.approvers) if record is not None and record.gate is not None else set()
