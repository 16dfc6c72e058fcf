"""RedisStore: runs in Redis, written by Lua scripts so each commit is one atomic step.

Key schema (P is the workflow's key prefix; {id} is a hash tag, so one run's keys share a
slot):
    P run:{id}               hash  v (version), doc (RunRecord JSON), fork (its token)
    P run:{id}:history       list  history entries, appended, never rewritten
    P run:{id}:lease:<task>  str   present while a worker runs <task> (TTL, heartbeat)
    P run:{id}:fork:<token>  hash  branch -> result, for the open fork (dropped at its join)
    P due                    zset  run id -> when the sweep must look at it
    P runs                   zset  run id -> created
    P status                 hash  run id -> status
    P gates, P gates:<who>   set   runs waiting at a gate, all and by approver
The index keys are shared by all runs, so the commit script is single-instance Redis only;
Redis Cluster would need the index writes split from the per-run commit.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .._records import BranchResult, RunRecord, RunStatus
from .base import Loaded, RunStore, StoreUnavailable, closed_fork, gate_approvers

T = TypeVar("T")


def _script(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name).read_text()


def connect(url: str) -> redis.Redis:
    """A client that fails fast when Redis is down and retries a dropped link."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=3,
        socket_timeout=30,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _unavailable(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(self: RedisStore, *args: Any, **kwargs: Any) -> T:
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
    ) -> None:
        self.key_prefix = key_prefix
        self.retain_seconds = retain_seconds
        self.safe_url = _redact(url)
        self.redis = client or connect(url)
        self._create = self.redis.register_script(_script("create.lua"))
        self._commit = self.redis.register_script(_script("commit.lua"))
        self._claim = self.redis.register_script(_script("claim_due.lua"))
        self._record_branch = self.redis.register_script(_script("record_branch.lua"))

    # ---- keys ----------------------------------------------------------------------

    def _rec(self, run_id: str) -> str:
        return f"{self.key_prefix}run:{{{run_id}}}"

    def _hist(self, run_id: str) -> str:
        return f"{self._rec(run_id)}:history"

    def _lease(self, run_id: str, task_id: str) -> str:
        return f"{self._rec(run_id)}:lease:{task_id}"

    def _fork(self, run_id: str, token: int) -> str:
        return f"{self._rec(run_id)}:fork:{token}"

    def _idx(self, name: str) -> str:
        return f"{self.key_prefix}{name}"

    # ---- RunStore ----------------------------------------------------------------------

    @_unavailable
    def now(self) -> float:
        sec, usec = self.redis.time()
        return sec + usec / 1e6

    @_unavailable
    def create(self, record: RunRecord, history: list[dict[str, Any]], due: float | None) -> bool:
        keys = [self._rec(record.run_id), self._hist(record.run_id), self._idx("runs"),
                self._idx("status"), self._idx("due")]
        args = [record.run_id, record.model_dump_json(), record.status.value, record.created_at,
                "" if due is None else repr(due), *(json.dumps(h) for h in history)]
        return bool(self._create(keys=keys, args=args))

    @_unavailable
    def load(self, run_id: str) -> Loaded:
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.hmget(self._rec(run_id), "v", "doc")
        (sec, usec), (v, doc) = pipe.execute()
        return _loaded(v, doc, sec + usec / 1e6)

    @_unavailable
    def begin_task(self, run_id: str, task_id: str, lease_ttl: float) -> Loaded:
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.hmget(self._rec(run_id), "v", "doc")
        lease = self._lease(run_id, task_id)
        pipe.incr(lease)  # counts starts while the lease lives: a redelivery sees 2
        pipe.pexpire(lease, int(lease_ttl * 1000))
        (sec, usec), (v, doc), starts, _ = pipe.execute()
        return _loaded(v, doc, sec + usec / 1e6, int(starts))

    @_unavailable
    def renew_lease(self, run_id: str, task_id: str, lease_ttl: float) -> None:
        self.redis.pexpire(self._lease(run_id, task_id), int(lease_ttl * 1000))

    @_unavailable
    def live_leases(self, run_id: str, task_ids: list[str]) -> frozenset[str]:
        if not task_ids:
            return frozenset()
        pipe = self.redis.pipeline(transaction=False)
        for t in task_ids:
            pipe.exists(self._lease(run_id, t))
        return frozenset(t for t, alive in zip(task_ids, pipe.execute(), strict=True) if alive)

    @_unavailable
    def commit(
        self,
        previous: RunRecord,
        version: int,
        record: RunRecord,
        history: list[dict[str, Any]],
        due: float | None,
        release: str | None = None,
    ) -> bool:
        run_id = record.run_id
        before, after = gate_approvers(previous), gate_approvers(record)
        gate_op, who = "", set[str]()
        if after and not before:
            gate_op, who = "open", after
        elif before and not after:
            gate_op, who = "close", before
        closed = closed_fork(previous, record)
        keys = [self._rec(run_id), self._hist(run_id),
                self._lease(run_id, release) if release else self._rec(run_id),
                self._idx("due"), self._idx("status"), self._idx("gates"),
                self._fork(run_id, closed) if closed is not None else self._rec(run_id),
                *(self._idx(f"gates:{w}") for w in sorted(who))]
        retain = self.retain_seconds if record.status.is_terminal else 0
        args = [version, record.model_dump_json(), run_id, record.status.value,
                "" if due is None else repr(due), retain, gate_op,
                "" if record.fork is None else str(record.fork.token),
                *(json.dumps(h) for h in history)]
        return bool(self._commit(keys=keys, args=args))

    @_unavailable
    def record_branch(self, run_id: str, token: int, branch: str, result: BranchResult,
                      entry: dict[str, Any], release: str, width: int,
                      join_at: float) -> int | None:
        n = int(self._record_branch(
            keys=[self._rec(run_id), self._fork(run_id, token), self._hist(run_id),
                  self._lease(run_id, release), self._idx("due")],
            args=[token, branch, result.model_dump_json(), json.dumps(entry), width, run_id,
                  repr(join_at)]))
        return n if n >= 0 else None

    @_unavailable
    def branch_results(self, run_id: str, token: int) -> dict[str, BranchResult]:
        raw = self.redis.hgetall(self._fork(run_id, token))
        return {_text(k): BranchResult.model_validate_json(v) for k, v in raw.items()}

    @_unavailable
    def claim_due(self, limit: int, hold_for: float) -> list[str]:
        ids = self._claim(keys=[self._idx("due")], args=[limit, hold_for])
        return [_text(i) for i in ids]

    @_unavailable
    def note(self, run_id: str, entry: dict[str, Any], release: str | None = None) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(self._hist(run_id), json.dumps(entry))
        if release is not None:
            pipe.delete(self._lease(run_id, release))
        pipe.execute()

    @_unavailable
    def set_due(self, run_id: str, due: float | None) -> None:
        if due is None:
            self.redis.zrem(self._idx("due"), run_id)
        else:
            self.redis.zadd(self._idx("due"), {run_id: due})

    @_unavailable
    def history(self, run_id: str, start: int = 0, end: int = -1) -> list[dict[str, Any]]:
        return [json.loads(h) for h in self.redis.lrange(self._hist(run_id), start, end)]

    @_unavailable
    def list_runs(
        self, status: RunStatus | None = None, workflow: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        if status is not None:
            statuses = self.redis.hgetall(self._idx("status"))
            ids = [_text(k) for k, v in statuses.items() if _text(v) == status.value]
        else:
            ids = [_text(i) for i in self.redis.zrevrange(self._idx("runs"), 0, -1)]
        return self._records(ids, workflow, limit)

    @_unavailable
    def pending_gates(self, approver: str | None = None) -> list[RunRecord]:
        key = self._idx("gates" if approver is None else f"gates:{approver}")
        return self._records(sorted(_text(i) for i in self.redis.smembers(key)), None, 10**9)

    def _records(self, ids: list[str], workflow: str | None, limit: int) -> list[RunRecord]:
        out: list[RunRecord] = []
        for start in range(0, len(ids), 200):
            pipe = self.redis.pipeline(transaction=False)
            for run_id in ids[start:start + 200]:
                pipe.hget(self._rec(run_id), "doc")
            for doc in pipe.execute():
                if doc is None:
                    continue  # expired after finishing
                rec = RunRecord.model_validate_json(doc)
                if workflow is None or rec.workflow == workflow:
                    out.append(rec)
                    if len(out) >= limit:
                        return out
        return out

    def close(self) -> None:
        self.redis.close()


def _loaded(v: bytes | None, doc: bytes | None, now: float, starts: int = 1) -> Loaded:
    if doc is None:
        return Loaded(None, 0, now, starts)
    return Loaded(RunRecord.model_validate_json(doc), int(v or 0), now, starts)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
