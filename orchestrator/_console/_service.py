"""What the console and the JSON API may read and do, for whom: one layer both use, so a
page and an endpoint can never disagree on who may approve or stop a run.

Every write takes an `Identity` the web layer checked (a session, an API token, a trusted
proxy's header); the name recorded in the run's history comes from it, never from a form
or a request body.
"""

from __future__ import annotations

import contextlib
import heapq
import json
from dataclasses import dataclass
from typing import Any

from .._client import AmbiguousRunId, Client, InvalidInput, NoLiveWorker
from .._engine import ControlError
from .._identity import User, Users
from .._records import RunRecord, RunStatus
from .._runner import RunHandle
from .._runtime import RunNotFound, UnknownWorkflow
from .._steward import CatalogEntry
from .._stores import RedisStore
from .._stores.base import (
    CorruptRecord,
    RunPage,
    check_limit,
    decode_cursor,
    encode_cursor,
    parse_record,
)

SOURCES = ("console", "api")
CONTROLS = ("pause", "resume", "stop")

__all__ = ["CONTROLS", "Conflict", "Forbidden", "Identity", "Inbox", "Invalid", "NotFound",
           "Operations", "RunView"]


class Forbidden(PermissionError):
    """The identity may not do this (HTTP 403)."""


class NotFound(LookupError):
    """No such run or workflow (HTTP 404)."""


class Conflict(Exception):
    """The run is not in a state that allows this, e.g. no gate waits (HTTP 409)."""


class Invalid(ValueError):
    """Bad input; `errors` lists (field, message), field '' for the whole (HTTP 422)."""

    def __init__(self, message: str, errors: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [("", message)]


@dataclass(frozen=True)
class Identity:
    """A user the web layer checked, and how: `console` (a session or a trusted proxy's
    header) or `api` (a bearer token)."""

    user: User
    source: str

    @property
    def name(self) -> str:
        return self.user.name


@dataclass(frozen=True)
class Inbox:
    records: list[RunRecord]
    total: int  # gates the caller may decide, shown or not


@dataclass(frozen=True)
class RunView:
    record: RunRecord
    history: list[dict[str, Any]]
    audit: dict[str, Any] | None  # the audit chain's verdict (None: no key here)
    unhosted: str | None  # "no worker hosts W@V" while no live worker runs its version


@dataclass(frozen=True)
class Counts:
    by_status: dict[RunStatus, int]

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


class Operations:
    def __init__(self, client: Client, users: Users) -> None:
        self.client = client
        self.users = users

    # ---- who may do what ----------------------------------------------------------------

    def anyone_registered(self) -> bool:
        """False while no user exists: the console is then read-only for everyone."""
        return bool(self.users.redis.hlen(self.users.users_key))

    @staticmethod
    def may_operate(who: Identity | None) -> bool:
        """Start runs, pause, resume and stop them: operators and admins."""
        return who is not None and who.user.may("operator")

    @staticmethod
    def may_decide(who: Identity | None, record: RunRecord | None) -> bool:
        """Approve or reject the gate `record` waits at: a listed approver, by name or by
        one of their groups (`group:<g>`), who is not a mere viewer."""
        if who is None or record is None or record.gate is None or not who.user.may("operator"):
            return False
        return bool(_listed_as(who.user) & set(record.gate.approvers))

    # ---- reads ----------------------------------------------------------------------------

    def workflows(self) -> list[CatalogEntry]:
        return self.client.workflows()

    def workflow(self, name: str) -> CatalogEntry:
        try:
            return self.client.workflow(name)
        except UnknownWorkflow as exc:
            raise NotFound(str(exc)) from None

    def counts(self, workflow: str | None = None) -> Counts:
        totals = dict.fromkeys(RunStatus, 0)
        for store in self._stores(workflow):
            for status, n in store.count_runs(workflow).items():
                totals[status] += n
        return Counts(totals)

    def runs(self, status: RunStatus | None = None, workflow: str | None = None,
             limit: int = 50, cursor: str | None = None) -> RunPage:
        """Runs newest first across every store, `limit` a page. The cursor is the last
        run's (created, id), which orders runs in every store alike, so one page can merge
        the next page of each store."""
        check_limit(limit)
        if cursor is not None:
            try:
                decode_cursor(cursor)
            except ValueError as exc:
                raise Invalid(f"bad cursor: {exc}", [("cursor", str(exc))]) from None
        pages = [s.page_runs(status, workflow, limit, cursor) for s in self._stores(workflow)]
        if len(pages) == 1:
            return pages[0]
        merged = list(heapq.merge(*(p.records for p in pages),
                                  key=lambda r: (-r.created_at, _desc(r.run_id))))
        records = merged[:limit]
        more = len(merged) > limit or any(p.next_cursor for p in pages)
        return RunPage(records, encode_cursor(records[-1]) if more and records else None)

    def unhosted(self, records: list[RunRecord]) -> dict[str, str]:
        """Run id -> "no worker hosts W@V", for the active ones among `records` whose
        version no live worker executes: they wait, visibly, until one appears."""
        return self.client.unhosted(records) if records else {}

    def in_flight(self, workflow: str) -> dict[str, int]:
        """Runs of `workflow` not finished yet, per version (reads each active record)."""
        return self.client.in_flight(workflow)

    def find(self, prefix: str, limit: int = 20) -> list[str]:
        """Run ids starting with `prefix`, for the search box."""
        found: set[str] = set()
        for store in self._stores():
            found.update(store.find_run_ids(prefix, limit))
        return sorted(found)[:limit]

    def handle(self, run_id: str) -> RunHandle:
        try:
            return self.client.attach(run_id)
        except RunNotFound as exc:
            raise NotFound(str(exc)) from None
        except AmbiguousRunId as exc:
            raise NotFound(str(exc)) from None

    def exact(self, run_id: str) -> RunHandle:
        """The run with exactly this id, for a change: a unique start of an id is fine to
        read, but a decision must name the run it decides."""
        handle = self.handle(run_id)
        if handle.run_id != run_id:
            raise NotFound(f"no run {run_id!r} (give the whole id to change a run; "
                           f"{handle.run_id!r} starts with it)")
        return handle

    def run(self, run_id: str) -> RunRecord:
        return self.handle(run_id).record()

    def history(self, run_id: str, start: int = 0) -> list[dict[str, Any]]:
        return self.handle(run_id).history(start)

    def look(self, run_id: str) -> RunView:
        """What a run's page shows, the run found once (not once per part)."""
        handle = self.handle(run_id)
        record = handle.record()
        return RunView(record, handle.history(), self._audit(handle),
                       self.unhosted([record]).get(record.run_id))

    def audit(self, run_id: str) -> dict[str, Any] | None:
        """The audit chain's verdict on the run's history; None when this console has no
        key (ORCHESTRATOR_AUDIT_KEY) or the run is not kept in Redis."""
        return self._audit(self.handle(run_id))

    def _audit(self, handle: RunHandle) -> dict[str, Any] | None:
        key = self.client.settings.audit_key
        store = handle._store
        if not key or not isinstance(store, RedisStore):
            return None
        verdict = store.audit(handle.run_id, key)
        return None if verdict is None else verdict.as_dict()

    def inbox(self, who: Identity | None, limit: int | None = None) -> list[RunRecord]:
        """Gates `who` may decide, the longest waiting first (the first `limit`)."""
        return self.inbox_page(who, limit).records

    def inbox_count(self, who: Identity | None) -> int:
        """How many gates `who` may decide: the union of their gate sets, nothing parsed
        (every page's header shows it, and every live update)."""
        if who is None or not who.user.may("operator"):
            return 0
        names = sorted(_listed_as(who.user))
        total = 0
        for store in self._stores():
            if isinstance(store, RedisStore):
                total += len(_gate_members(store, names))
            else:
                total += len({r.run_id for name in names for r in store.pending_gates(name)})
        return total

    def inbox_page(self, who: Identity | None, limit: int | None = None) -> Inbox:
        """Gates `who` may decide, the longest waiting first: the first `limit` (all for
        None) and how many there are. In Redis the order comes from the gate-wait indexes
        (run id -> gate.opened_at) and only the records shown are read and parsed:
        parsing every waiting record took 390 ms a request at 5,000 gates."""
        if who is None or not who.user.may("operator"):
            return Inbox([], 0)
        names = sorted(_listed_as(who.user))
        workflows: dict[str, set[str]] = {}
        for entry in self.client.workflows():
            workflows.setdefault(entry.key_prefix, set()).add(entry.name)
        waiting: dict[str, tuple[float, str, Any]] = {}  # run id -> (opened, id, store|record)
        for store in self._stores():
            if isinstance(store, RedisStore):
                for opened, run_id in _gate_order(store, names,
                                                  workflows.get(store.key_prefix, set())):
                    waiting.setdefault(run_id, (opened, run_id, store))
            else:
                for name in names:
                    for record in store.pending_gates(name):
                        opened = record.gate.opened_at if record.gate else 0.0
                        waiting.setdefault(record.run_id, (opened, record.run_id, record))
        ordered = sorted(waiting.values(), key=lambda w: (w[0], w[1]))
        shown: list[RunRecord] = []
        at, chunk = 0, max(limit or len(ordered), 1)
        while at < len(ordered) and (limit is None or len(shown) < limit):
            batch = ordered[at:at + chunk]
            at += chunk
            for record in _records([(run_id, found) for _, run_id, found in batch]):
                if record is not None and record.gate is not None:
                    shown.append(record)
        return Inbox(shown[:limit] if limit is not None else shown, len(ordered))

    # ---- writes -----------------------------------------------------------------------------

    def start(self, who: Identity | None, workflow: str, input: dict[str, Any] | None,
              run_id: str | None = None) -> RunHandle:
        if not self.may_operate(who):
            raise Forbidden("starting a run needs the operator or admin role")
        assert who is not None
        if input is not None and not isinstance(input, dict):
            raise Invalid("input must be a JSON object", [("input", "must be an object")])
        try:
            return self.client.start(workflow, input or {}, run_id=run_id, by=who.name,
                                     source=who.source)
        except NoLiveWorker as exc:
            raise Conflict(str(exc)) from None
        except UnknownWorkflow as exc:
            raise NotFound(str(exc)) from None
        except InvalidInput as exc:
            raise Invalid(str(exc), exc.errors) from None
        except ValueError as exc:  # a bad run id, input over the size limit
            raise Invalid(str(exc)) from None

    def decide(self, who: Identity | None, run_id: str, approve: bool,
               comment: str | None = None) -> RunRecord:
        handle = self.exact(run_id)
        record = handle.record()
        if record.gate is None:
            raise Conflict(f"run {record.run_id} is {record.status.value}: no gate waits "
                           f"for a decision")
        if not self.may_decide(who, record):
            raise Forbidden(f"{who.name if who else 'an anonymous visitor'} is not an approver "
                            f"of this gate (approvers: {', '.join(record.gate.approvers)})")
        assert who is not None
        decide = handle.approve if approve else handle.reject
        try:
            decide(who.name, comment or None, groups=who.user.groups, source=who.source)
        except PermissionError as exc:
            raise Forbidden(str(exc)) from None
        except ControlError as exc:  # decided by someone else meanwhile, or timed out
            raise Conflict(str(exc)) from None
        return handle.record()

    def control(self, who: Identity | None, run_id: str, action: str,
                reason: str | None = None) -> RunRecord:
        if action not in CONTROLS:
            raise Invalid(f"unknown action {action!r}", [("action", f"one of {CONTROLS}")])
        if not self.may_operate(who):
            raise Forbidden(f"{action} needs the operator or admin role")
        assert who is not None
        handle = self.exact(run_id)
        try:
            if action == "stop":
                handle.stop(reason or None, by=who.name, source=who.source)
            elif action == "pause":
                handle.pause(by=who.name, source=who.source)
            else:
                handle.resume(by=who.name, source=who.source)
        except ControlError as exc:
            raise Conflict(str(exc)) from None
        return handle.record()

    def _stores(self, workflow: str | None = None) -> list[Any]:
        try:
            prefixes = self.client._prefixes(workflow)
        except UnknownWorkflow as exc:
            raise NotFound(str(exc)) from None
        if not prefixes:
            prefixes = [self.client.settings.key_prefix]
        return [self.client.runtime.store_for(p) for p in prefixes]


def _listed_as(user: User) -> set[str]:
    return {user.name, *(f"group:{g}" for g in user.groups)}


def _gate_members(store: RedisStore, names: list[str]) -> set[str]:
    """Run ids waiting at a gate that lists any of `names`: the union of their gate sets,
    in one round trip."""
    pipe = store.redis.pipeline(transaction=False)
    for name in names:
        pipe.smembers(store._idx(f"gates:{name}"))
    return {_str(i) for members in pipe.execute() for i in members}


def _gate_order(store: RedisStore, names: list[str],
                workflows: set[str]) -> list[tuple[float, str]]:
    """(when its gate opened, run id) of the runs in `store` waiting for any of `names`:
    the members of the approvers' gate sets, scored from the gate-wait index of each
    workflow kept there (a run no such index holds: from its record)."""
    ids = sorted(_gate_members(store, names))
    if not ids:
        return []
    wfs = sorted(workflows)
    pipe = store.redis.pipeline(transaction=False)
    for wf in wfs:
        pipe.zmscore(store._waits(wf, "gate"), ids)
    scores = pipe.execute() if wfs else []
    order, unscored = [], []
    for i, run_id in enumerate(ids):
        found = [float(s[i]) for s in scores if s[i] is not None]
        if found:
            order.append((min(found), run_id))
        else:
            unscored.append(run_id)
    if unscored:
        pipe = store.redis.pipeline(transaction=False)
        for run_id in unscored:
            pipe.hget(store._rec(run_id), "doc")
        for run_id, doc in zip(unscored, pipe.execute(), strict=True):
            try:
                order.append((float(json.loads(doc)["gate"]["opened_at"]), run_id))
            except (ValueError, KeyError, TypeError):
                continue  # gone or closed meanwhile, or unreadable (the sweep quarantines)
    return order


def _records(found: list[tuple[str, Any]]) -> list[RunRecord | None]:
    """The records of (run id, its RedisStore or its record already read), those in Redis
    read in one round trip per store; None for one gone or unreadable."""
    out: list[RunRecord | None] = [f if isinstance(f, RunRecord) else None for _, f in found]
    by_store: dict[int, list[int]] = {}
    for i, (_, f) in enumerate(found):
        if isinstance(f, RedisStore):
            by_store.setdefault(id(f), []).append(i)
    for indexes in by_store.values():
        store = found[indexes[0]][1]
        pipe = store.redis.pipeline(transaction=False)
        for i in indexes:
            pipe.hget(store._rec(found[i][0]), "doc")
        for i, doc in zip(indexes, pipe.execute(), strict=True):
            if doc is not None:
                with contextlib.suppress(CorruptRecord):
                    out[i] = parse_record(found[i][0], doc)
    return out


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _desc(str):  # a sort key: run ids in descending order, as Redis orders ties
    __slots__ = ()

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)
