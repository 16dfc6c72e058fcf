"""RedisStore: runs in Redis, written by Lua scripts so each commit is one atomic step.

Key schema (P is the workflow's key prefix; {id} is a hash tag, so one run's keys share a
slot):
    P run:{id}                  hash  v (version), doc (RunRecord JSON), fork (open fork's
                                      token), wf (workflow), hn (history entries appended),
                                      hl (history_limit when the run began), hm (the
                                      newest entry's audit mac, with an audit key)
    P run:{id}:history          list  the first hl history entries, each numbered ("n")
    P run:{id}:history:tail     list  the last hl entries after those
    P run:{id}:lease:<task>     str   present while a worker runs <task> (TTL, heartbeat)
    P run:{id}:starts:<task>:<attempt>
                                str   times (task, attempt) began (TTL retain_seconds)
    P run:{id}:fork:<token>     hash  branch -> result, for the open fork (dropped at its join)
    P due                       zset  run id -> when the sweep must look at it
    P runs                      zset  run id -> created_at (every listed run)
    P runs:status:<status>      zset  run id -> created_at, one per status
    P runs:wf:<workflow>        zset  run id -> created_at, one per workflow
    P runs:wf:<workflow>:status:<status>
                                zset  run id -> created_at, both
    P ids                       zset  run id -> 0: by id, for prefix search (ZRANGEBYLEX)
    P gates, P gates:<who>      set   runs waiting at a gate, all and by approver
    P waits:wf:<workflow>:gate, P waits:wf:<workflow>:event
                                zset  run id -> when its wait began (metrics: count, oldest)
    P totals:wf:<workflow>      hash  started, completed, failed, stopped -> runs ever
    P expiry                    zset  run id -> when its keys expire (finished runs)
    P expiry:workflow           hash  run id -> workflow, so the purge finds its entries
    P corrupt                   set   quarantined runs (record unreadable)
A finished run's own keys expire after retain_seconds (the starts counters sooner: they
live retain_seconds from their last start); `purge_expired` then removes its index
entries. Listings page by (created_at, run id), newest first, so a page never reads more
than it returns (plus entries of runs that expired or are corrupt, skipped).

The index keys are shared by all runs, so the scripts are single-instance Redis only, and
some build index key names from the prefix; Redis Cluster would need the index writes split
from the per-run commit. A primary with replicas (and Sentinel, through `connect`) is fine:
with `min_replicas_ack` every write a send may follow (create, commit, record_branch) waits
for that many replicas (`WAIT`) before it returns, and a wait that falls short is
StoreUnavailable, like an unreachable Redis (docs/design.md, "Replicas and failover").

With an audit key (`ORCHESTRATOR_AUDIT_KEY`) every entry appended is sealed here, in Python
(orchestrator/_audit.py), for the position the history is at: one HMGET of (hn, hl, hm)
before the script, which appends only if those are still current, else writes nothing and
answers "chain moved", and the entries are sealed again for the new positions. Commits are
already serialized by their version check; notes and branch results are not, so any append
can be the one that has to retry.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .. import _audit, _redis_url
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
    StoreUnavailable,
    Waits,
    check_limit,
    closed_fork,
    decode_cursor,
    encode_cursor,
    ended_as,
    entry_json,
    gate_approvers,
    parse_record,
    record_json,
    wait_since,
)

if TYPE_CHECKING:
    from .._config import Settings

T = TypeVar("T")
log = logging.getLogger("orchestrator.store")
_BATCH = 200  # records read per round trip while filling a page
_CHAIN_RETRIES = 1000  # appends racing one run's audit chain: each retry means one won
_PARSED_KEPT = 64  # forked runs whose parsed record begin_task keeps for their branches


def _script(name: str, shared: bool = True) -> str:
    """A script's text; `shared` puts lib.lua's functions (and the statuses) before it."""
    lua = resources.files(__package__).joinpath("lua")
    text = lua.joinpath(name).read_text()
    if not shared:
        return text
    statuses = ", ".join(f"'{s.value}'" for s in RunStatus)
    return f"local STATUSES = {{{statuses}}}\n{lua.joinpath('lib.lua').read_text()}\n{text}"


def connect(url: str) -> redis.Redis:
    """A client that fails fast when Redis is down and retries a dropped link; for a
    `redis+sentinel://` URL, one that asks the sentinels where the primary is whenever it
    connects, so it follows a failover (orchestrator/_redis_url.py)."""
    return _redis_url.client(
        url,
        socket_connect_timeout=3,
        socket_timeout=30,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def unavailable_as_store_error(fn: Callable[..., T]) -> Callable[..., T]:
    """A method of an object with a `safe_url` whose Redis being down is StoreUnavailable,
    whichever way into Redis it takes (a store, a Client)."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        try:
            return fn(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"Redis at {self.safe_url} is unreachable: {exc}") from exc

    return wrapper



class RedisStore(RunStore):
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        key_prefix: str = "orchestrator:",
        retain_seconds: int = 7 * 24 * 3600,
        client: redis.Redis | None = None,
        history_limit: int = 1000,
        audit_key: str | bytes | None = None,
        min_replicas_ack: int = 0,
        replicas_ack_timeout: float = 1.0,
    ) -> None:
        self.key_prefix = key_prefix
        self.audit_key = audit_key.encode() if isinstance(audit_key, str) else audit_key
        self.retain_seconds = retain_seconds
        self.history_limit = history_limit
        self.min_replicas_ack = min_replicas_ack
        # WAIT's timeout is in milliseconds, and 0 would mean forever.
        self._wait_ms = max(1, round(replicas_ack_timeout * 1000))
        self.safe_url = redact(url)
        self._url = url if client is None else None  # a given client may be elsewhere
        self.redis = client or connect(url)
        self._create = self.redis.register_script(_script("create.lua"))
        self._commit = self.redis.register_script(_script("commit.lua"))
        self._claim = self.redis.register_script(_script("claim_due.lua", shared=False))
        self._record_branch = self.redis.register_script(_script("record_branch.lua"))
        self._note = self.redis.register_script(_script("note.lua"))
        self._history = self.redis.register_script(_script("history.lua"))
        self._purge = self.redis.register_script(_script("purge.lua"))
        self._quarantine = self.redis.register_script(_script("quarantine.lua"))
        self._set_due_if = self.redis.register_script(_script("set_due.lua", shared=False))
        self._begin = self.redis.register_script(_script("begin_task.lua", shared=False))
        self._parsed: dict[str, tuple[bytes, RunRecord]] = {}  # run id -> doc, its record

    @classmethod
    def from_settings(cls, settings: Settings, key_prefix: str) -> RedisStore:
        s = settings
        return cls(s.redis_url, key_prefix, s.retain_seconds, history_limit=s.history_limit,
                   audit_key=s.audit_key, min_replicas_ack=s.min_replicas_ack,
                   replicas_ack_timeout=s.replicas_ack_timeout)

    def _acked(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a script whose write a send may follow; with `min_replicas_ack`, on the same
        connection (one round trip) WAIT until that many replicas have it, and raise
        StoreUnavailable if fewer did in time: the write may stand on the primary, but it
        is not known to survive a failover, so nothing may be sent on its strength."""
        if not self.min_replicas_ack:
            return script(keys=keys, args=args)
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.wait(self.min_replicas_ack, self._wait_ms)
            result, acked = pipe.execute(raise_on_error=False)
            if isinstance(result, redis.exceptions.NoScriptError):
                # A primary that never saw the script (a promoted replica): load it there.
                script.sha = self.redis.script_load(script.script)
                continue
            for answer in (result, acked):
                if isinstance(answer, Exception):
                    raise answer
            if int(acked) < self.min_replicas_ack:
                raise StoreUnavailable(
                    f"Redis at {self.safe_url}: {acked} of {self.min_replicas_ack} replica(s) "
                    f"acknowledged the write within {self._wait_ms} ms "
                    f"(ORCHESTRATOR_MIN_REPLICAS_ACK)")
            return result
        raise StoreUnavailable(f"Redis at {self.safe_url} keeps losing its scripts")

    # ---- keys ----------------------------------------------------------------------

    def _rec(self, run_id: str) -> str:
        return f"{self.key_prefix}run:{{{run_id}}}"

    def _hist(self, run_id: str) -> list[str]:
        head = f"{self._rec(run_id)}:history"
        return [head, f"{head}:tail"]

    def _lease(self, run_id: str, task_id: str) -> str:
        return f"{self._rec(run_id)}:lease:{task_id}"

    def _starts(self, run_id: str, task_id: str, attempt: int) -> str:
        return f"{self._rec(run_id)}:starts:{task_id}:{attempt}"

    def _fork(self, run_id: str, token: int) -> str:
        return f"{self._rec(run_id)}:fork:{token}"

    def _idx(self, name: str) -> str:
        return f"{self.key_prefix}{name}"

    def _totals(self, workflow: str) -> str:
        return self._idx(f"totals:wf:{workflow}")

    def _waits(self, workflow: str, kind: str) -> str:
        return self._idx(f"waits:wf:{workflow}:{kind}")

    def _listing(self, status: RunStatus | None, workflow: str | None) -> str:
        """The index listing the runs of `status` and `workflow` (None: any)."""
        parts = ["runs"]
        if workflow is not None:
            parts.append(f"wf:{workflow}")
        if status is not None:
            parts.append(f"status:{status.value}")
        return self._idx(":".join(parts))

    # ---- the audit chain -------------------------------------------------------------------

    def _sealed(self, run_id: str, history: list[dict[str, Any]],
                new: bool = False) -> list[str]:
        """The chain arguments of a script (first position, previous mac, last mac) and
        the entries as they are to be stored: sealed for the positions the run's history
        is at now when there is an audit key, as they are otherwise."""
        if self.audit_key is None or not history:
            return ["", "", "", *(entry_json(h) for h in history)]
        if new:
            n, limit, prev = 0, self.history_limit, ""
        else:
            hn, hl, hm = self.redis.hmget(self._rec(run_id), "hn", "hl", "hm")
            if hl is None:  # no such run, or one from before capped histories: unsealed
                return ["", "", "", *(entry_json(h) for h in history)]
            n, limit, prev = int(hn or 0), int(hl), _text(hm or b"")
        first, start, entries = n, prev, []
        for h in history:
            sealed = _audit.seal(self.audit_key, run_id, n, prev, limit, h)
            entries.append(entry_json(sealed))
            prev, n = sealed["mac"], n + 1
        return [str(first), start, prev, *entries]

    def _sealed_one(self, run_id: str, entry: dict[str, Any]) -> tuple[list[str], str]:
        first, prev, last, body = self._sealed(run_id, [entry])
        return [first, prev, last], body

    @unavailable_as_store_error
    def audit(self, run_id: str, key: str | bytes) -> _audit.Verdict | None:
        """Check a run's history against its audit chain (None: no such run)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hmget(self._rec(run_id), "hn", "hl")
        head, tail = self._hist(run_id)
        pipe.lrange(head, 0, -1)
        pipe.lrange(tail, 0, -1)
        (hn, hl), head_entries, tail_entries = pipe.execute()
        if hl is None:
            return None
        raw_key = key.encode() if isinstance(key, str) else key
        return _audit.verify(raw_key, run_id, [_text(e) for e in head_entries],
                             [_text(e) for e in tail_entries], int(hn or 0), int(hl))

    # ---- RunStore ----------------------------------------------------------------------

    @unavailable_as_store_error
    def now(self) -> float:
        sec, usec = self.redis.time()
        return sec + usec / 1e6

    @unavailable_as_store_error
    def sends_for(self, broker_url: str) -> bool:
        # Not with min_replicas_ack: a message must not be taken before the replicas have
        # the commit it follows, and a script's writes are visible before its WAIT.
        return self._url is not None and broker_url == self._url and not self.min_replicas_ack

    def create(self, record: RunRecord, history: list[dict[str, Any]], due: float | None,
               outbox: Outbox | None = None) -> bool:
        run_id, wf, status = record.run_id, record.workflow, record.status
        keys = [self._rec(run_id), *self._hist(run_id), self._listing(None, None),
                self._listing(status, None), self._listing(None, wf), self._listing(status, wf),
                self._idx("ids"), self._idx("due"), self._idx("expiry"), self._totals(wf)]
        args: list[str | int] = [run_id, record_json(record), wf, repr(record.created_at),
                "" if due is None else repr(due), self.history_limit, self.key_prefix,
                *self._sealed(run_id, history, new=True)]
        return bool(self._acked(self._create, keys,
                                [*args, *_outbox_tail(outbox, self._ended(run_id))]))

    @unavailable_as_store_error
    def load(self, run_id: str) -> Loaded:
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.hmget(self._rec(run_id), "v", "doc")
        (sec, usec), (v, doc) = pipe.execute()
        return _loaded(run_id, v, doc, sec + usec / 1e6)

    @unavailable_as_store_error
    def begin_task(self, run_id: str, task_id: str, lease_ttl: float,
                   attempt: int = 1) -> Loaded:
        # One script, not a pipeline of five commands: the same round trip, but one
        # command to pack, parse and dispatch on both ends.
        sec, usec, v, doc, began = self._begin(
            keys=[self._rec(run_id), self._lease(run_id, task_id),
                  self._starts(run_id, task_id, attempt)],
            args=[int(lease_ttl * 1000), self.retain_seconds])
        now = int(sec) + int(usec) / 1e6
        if doc is None:
            return Loaded(None, 0, now, int(began))
        # The branches of one fork all load the same record (branch results are kept
        # beside it): parse it once per process, not once per branch (125 us at width 50).
        # Only a byte-for-byte equal document is reused, and records are never changed in
        # place (the engine decides on a copy).
        seen = self._parsed.get(run_id)
        if seen is not None and seen[0] == doc:
            record = seen[1]
        else:
            record = parse_record(run_id, doc)
            if record.fork is not None:
                if len(self._parsed) >= _PARSED_KEPT:
                    # Threads may share the store (an embedded runner): a race here only
                    # costs a parse later.
                    with contextlib.suppress(RuntimeError, KeyError, StopIteration):
                        self._parsed.pop(next(iter(self._parsed)))
                self._parsed[run_id] = (doc, record)
            else:
                self._parsed.pop(run_id, None)
        return Loaded(record, int(v or 0), now, int(began))

    @unavailable_as_store_error
    def renew_lease(self, run_id: str, task_id: str, lease_ttl: float) -> None:
        self.redis.pexpire(self._lease(run_id, task_id), int(lease_ttl * 1000))

    @unavailable_as_store_error
    def live_leases(self, run_id: str, task_ids: list[str]) -> frozenset[str]:
        if not task_ids:
            return frozenset()
        pipe = self.redis.pipeline(transaction=False)
        for t in task_ids:
            pipe.exists(self._lease(run_id, t))
        return frozenset(t for t, alive in zip(task_ids, pipe.execute(), strict=True) if alive)

    @unavailable_as_store_error
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
        run_id, wf = record.run_id, record.workflow
        before, after = gate_approvers(previous), gate_approvers(record)
        gate_op, who = "", set[str]()
        if after and not before:
            gate_op, who = "open", after
        elif before and not after:
            gate_op, who = "close", before
        closed = closed_fork(previous, record)
        keys = [self._rec(run_id), *self._hist(run_id),
                self._lease(run_id, release) if release else self._rec(run_id),
                self._fork(run_id, closed) if closed is not None else self._rec(run_id),
                self._idx("due"), self._idx("gates"),
                # The version check makes `previous` the stored record: its status is the
                # one the indexes hold.
                self._listing(previous.status, None), self._listing(record.status, None),
                self._listing(previous.status, wf), self._listing(record.status, wf),
                self._idx("expiry"), self._idx("expiry:workflow"), self._totals(wf),
                *(self._waits(wf, kind) for kind in WAIT_KINDS),
                *(self._idx(f"gates:{w}") for w in sorted(who))]
        retain = self.retain_seconds if record.status.is_terminal else 0
        args: list[str | int] = [version, record_json(record), run_id,
                                 repr(record.created_at),
                "" if due is None else repr(due), retain, gate_op,
                "" if record.fork is None else str(record.fork.token), wf,
                ended_as(previous, record) or "",
                *(_wait_op(previous, record, kind) for kind in WAIT_KINDS)]
        out = _outbox_tail(outbox, self._ended(run_id))
        for _ in range(_CHAIN_RETRIES):
            done = int(self._acked(self._commit, keys,
                                   [*args, *self._sealed(run_id, history), *out]))
            if done >= 0:
                return bool(done)
        raise _chain_contended(run_id)

    @unavailable_as_store_error
    def record_branch(self, run_id: str, token: int, branch: str, result: BranchResult,
                      entry: dict[str, Any], release: str, width: int,
                      join_at: float) -> int | None:
        keys = [self._rec(run_id), self._fork(run_id, token), *self._hist(run_id),
                self._lease(run_id, release), self._idx("due")]
        for _ in range(_CHAIN_RETRIES):
            chain, body = self._sealed_one(run_id, entry)
            n = int(self._acked(self._record_branch, keys, [
                token, branch, result.model_dump_json(), body, width, run_id, repr(join_at),
                *chain]))
            if n != -3:
                return n if n >= 0 else None
        raise _chain_contended(run_id)

    @unavailable_as_store_error
    def branch_results(self, run_id: str, token: int) -> dict[str, BranchResult]:
        return _results(self.redis.hgetall(self._fork(run_id, token)))

    @unavailable_as_store_error
    def load_joining(self, run_id: str, token: int) -> tuple[Loaded, dict[str, BranchResult]]:
        pipe = self.redis.pipeline(transaction=False)  # one round trip, in this order
        pipe.hgetall(self._fork(run_id, token))
        pipe.time()
        pipe.hmget(self._rec(run_id), "v", "doc")
        raw, (sec, usec), (v, doc) = pipe.execute()
        return _loaded(run_id, v, doc, sec + usec / 1e6), _results(raw)

    @unavailable_as_store_error
    def claim_due(self, limit: int, hold_for: float) -> list[str]:
        ids = self._claim(keys=[self._idx("due")], args=[limit, hold_for])
        return [_text(i) for i in ids]

    @unavailable_as_store_error
    def note(self, run_id: str, entry: dict[str, Any], release: str | None = None) -> None:
        rec = self._rec(run_id)
        keys = [rec, *self._hist(run_id),
                self._lease(run_id, release) if release is not None else rec]
        for _ in range(_CHAIN_RETRIES):
            chain, body = self._sealed_one(run_id, entry)
            if int(self._note(keys=keys, args=[*chain, body])) >= 0:
                return
        raise _chain_contended(run_id)

    @unavailable_as_store_error
    def set_due(self, run_id: str, due: float | None, version: int | None = None) -> None:
        if version is not None:
            self._set_due_if(keys=[self._rec(run_id), self._idx("due")],
                             args=[version, "" if due is None else repr(due), run_id])
            return
        if due is None:
            self.redis.zrem(self._idx("due"), run_id)
        else:
            self.redis.zadd(self._idx("due"), {run_id: due})

    @unavailable_as_store_error
    def history(self, run_id: str, start: int = 0, end: int = -1) -> list[dict[str, Any]]:
        head, dropped, tail = self._history(keys=[self._rec(run_id), *self._hist(run_id)],
                                            args=[start, end])
        marker = [{"event": TRIMMED, "dropped": int(dropped)}] if dropped else []
        return [json.loads(h) for h in head] + marker + [json.loads(h) for h in tail]

    @unavailable_as_store_error
    def page_runs(self, status: RunStatus | None = None, workflow: str | None = None,
                  limit: int = 50, cursor: str | None = None) -> RunPage:
        check_limit(limit)
        key = self._listing(status, workflow)
        after = None if cursor is None else decode_cursor(cursor)
        records: list[RunRecord] = []
        while True:
            # One more than the page needs: if it is there, there is a next page.
            count = min(limit - len(records), _BATCH) + 1
            rows = self._after(key, after, count)
            pipe = self.redis.pipeline(transaction=False)
            for run_id, _ in rows:
                pipe.hget(self._rec(run_id), "doc")
            for (run_id, created), doc in zip(rows, pipe.execute(), strict=True):
                if len(records) == limit:
                    return RunPage(records, encode_cursor(records[-1]))
                after = (created, run_id)
                rec = _listed(run_id, doc)
                if rec is not None:
                    records.append(rec)
            if len(rows) < count:
                return RunPage(records, None)

    def _after(self, key: str, after: tuple[float, str] | None,
               count: int) -> list[tuple[str, float]]:
        """Up to `count` (run id, created_at) of the index, newest first, after `after`.
        Runs created at the same instant come in descending id order, as Redis ranks them."""
        if after is None:
            return _scored(self.redis.zrevrange(key, 0, count - 1, withscores=True))
        created, last = after
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrevrangebyscore(key, created, created, withscores=True)
        pipe.zrevrangebyscore(key, f"({created!r}", "-inf", start=0, num=count,
                              withscores=True)
        ties, older = pipe.execute()
        rows = [(m, s) for m, s in _scored(ties) if m < last]  # str order is UTF-8 byte order
        return (rows + _scored(older))[:count]

    @unavailable_as_store_error
    def count_runs(self, workflow: str | None = None) -> dict[RunStatus, int]:
        pipe = self.redis.pipeline(transaction=False)
        for status in RunStatus:
            pipe.zcard(self._listing(status, workflow))
        return dict(zip(RunStatus, pipe.execute(), strict=True))

    @unavailable_as_store_error
    def run_totals(self, workflow: str) -> dict[str, int]:
        counted = {_text(k): int(v) for k, v in self.redis.hgetall(self._totals(workflow)).items()}
        return {name: counted.get(name, 0) for name in TOTALS}

    @unavailable_as_store_error
    def waiting(self, workflow: str) -> dict[str, Waits]:
        pipe = self.redis.pipeline(transaction=False)
        for kind in WAIT_KINDS:
            pipe.zcard(self._waits(workflow, kind))
            pipe.zrange(self._waits(workflow, kind), 0, 0, withscores=True)
        found = pipe.execute()
        return {kind: Waits(int(count), float(first[0][1]) if first else None)
                for kind, count, first in zip(WAIT_KINDS, found[::2], found[1::2], strict=True)}

    @unavailable_as_store_error
    def count_overdue(self, before: float) -> int:
        return int(self.redis.zcount(self._idx("due"), "-inf", f"({before!r}"))

    @unavailable_as_store_error
    def find_run_ids(self, prefix: str, limit: int = 10) -> list[str]:
        # 0xff never occurs in UTF-8, so it sorts after every id that has the prefix.
        low, high = b"[" + prefix.encode(), b"(" + prefix.encode() + b"\xff"
        return [_text(i) for i in
                self.redis.zrangebylex(self._idx("ids"), low, high, start=0, num=limit)]

    @unavailable_as_store_error
    def pending_gates(self, approver: str | None = None) -> list[RunRecord]:
        key = self._idx("gates" if approver is None else f"gates:{approver}")
        ids = sorted(_text(i) for i in self.redis.smembers(key))
        out: list[RunRecord] = []
        for start in range(0, len(ids), _BATCH):
            batch = ids[start:start + _BATCH]
            pipe = self.redis.pipeline(transaction=False)
            for run_id in batch:
                pipe.hget(self._rec(run_id), "doc")
            found = (_listed(i, doc) for i, doc in zip(batch, pipe.execute(), strict=True))
            out += [rec for rec in found if rec is not None]
        return out

    @unavailable_as_store_error
    def purge_expired(self, limit: int = 500) -> int:
        return int(self._purge(keys=[self._idx("expiry")], args=[limit, self.key_prefix]))

    @unavailable_as_store_error
    def quarantine(self, run_id: str) -> None:
        self._quarantine(keys=[self._rec(run_id), self._idx("corrupt")],
                         args=[run_id, self.key_prefix])

    @unavailable_as_store_error
    def corrupt_runs(self) -> list[str]:
        return sorted(_text(i) for i in self.redis.smembers(self._idx("corrupt")))

    @unavailable_as_store_error
    def raw(self, run_id: str) -> dict[str, str] | None:
        fields = self.redis.hgetall(self._rec(run_id))
        if not fields:
            return None
        return {_text(k): _text(v) for k, v in fields.items()}

    def announce_end(self, run_id: str) -> None:
        # Best effort: a watcher also looks again on its own now and then.
        try:
            self.redis.publish(self._ended(run_id), "ended")
        except redis.RedisError as exc:  # e.g. an ACL without this channel
            log.debug("could not announce the end of run %s: %s", run_id, exc)

    @contextlib.contextmanager
    def watch_end(self, run_id: str) -> Iterator[EndWatch]:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self._ended(run_id))
        except redis.RedisError as exc:  # no channel rights, or Redis away: poll instead
            log.debug("cannot watch run %s end (%s); polling", run_id, exc)
            pubsub.close()
            yield EndWatch(time.sleep, live=False)
            return
        def wait(seconds: float) -> None:
            # get_message answers None at once for the subscription's own confirmation.
            until = time.monotonic() + seconds
            while (left := until - time.monotonic()) > 0:
                if pubsub.get_message(timeout=left) is not None:
                    return

        try:
            yield EndWatch(wait)
        finally:
            pubsub.close()

    def _ended(self, run_id: str) -> str:
        """The channel a run's end is published on (a channel, not a key)."""
        return f"{self.key_prefix}ended:{{{run_id}}}"

    def close(self) -> None:
        self.redis.close()


def _chain_contended(run_id: str) -> RuntimeError:
    return RuntimeError(f"run {run_id}: {_CHAIN_RETRIES} appends in a row lost the race for "
                        f"its audit chain")


def _loaded(run_id: str, v: bytes | None, doc: bytes | None, now: float,
            starts: int = 1) -> Loaded:
    if doc is None:
        return Loaded(None, 0, now, starts)
    return Loaded(parse_record(run_id, doc), int(v or 0), now, starts)


def _results(raw: dict[Any, Any]) -> dict[str, BranchResult]:
    return {_text(k): BranchResult.model_validate_json(v) for k, v in raw.items()}


def _listed(run_id: str, doc: bytes | None) -> RunRecord | None:
    """A listed run's record; None if it expired since it was listed, or is corrupt (the
    sweep quarantines those: one bad record must not break every listing)."""
    if doc is None:
        return None
    try:
        return parse_record(run_id, doc)
    except CorruptRecord:
        return None


def _outbox_tail(outbox: Outbox | None, ended: str) -> list[str | int]:
    """The arguments a script's send_outbox (lib.lua) reads at the end of its own; `ended`
    is the channel announce_end publishes on."""
    writes = outbox.writes if outbox is not None else ()
    if outbox is not None and outbox.announce_end:
        writes = (*writes, (ended, "publish", "ended"))
    return [*(part for name, op, value in writes for part in (op, name, value)), len(writes)]


def _wait_op(previous: RunRecord, record: RunRecord, kind: str) -> str:
    """What a commit does to a wait index: '' nothing, '-' the wait is over, else when the
    (new) wait began. Only a commit that changes the wait writes to the index."""
    before, after = wait_since(previous, kind), wait_since(record, kind)
    if before == after:
        return ""
    return "-" if after is None else repr(after)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _scored(rows: Any) -> list[tuple[str, float]]:
    return [(_text(member), float(score)) for member, score in rows]


def redact(url: str) -> str:
    """The URL without its passwords, for error messages and logs."""
    return _redis_url.redact(url)
