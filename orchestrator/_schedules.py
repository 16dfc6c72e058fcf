"""Schedules in Redis: one record per schedule, changed only by compare-and-set.

A coordinator claims the ticks it decides by writing the record at the version it read:
of several coordinators deciding the same tick, one write wins and the others find the
record changed and leave it. The winning write also names the runs to start (`starting`)
and the run to stop (`stopping`) before any of it is done, so the decision outlives the
coordinator that made it: whoever reads the record next carries it out (each part is
idempotent) and clears it.

Keys (P is `Settings.key_prefix`):
    P schedule:<name>   hash  v (version), doc (Schedule JSON)
    P schedules         set   every schedule's name
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from pydantic import BaseModel

from ._committer import MAX_CAS_ATTEMPTS, CommitConflict
from ._schedule_rules import Overlap, Timing
from ._stores.redis import _text, unavailable_as_store_error

NOTES_KEPT = 20  # a schedule keeps its latest notes (skipped, missed, not started ticks)

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', 1, 'doc', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# A deleted schedule has no version, so a late write cannot bring it back.
_REPLACE = """
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', tonumber(ARGV[1]) + 1, 'doc', ARGV[2])
return 1
"""


class ScheduleNotFound(LookupError):
    pass


class ScheduleExists(ValueError):
    """A schedule of that name exists already (delete it first)."""


class Schedule(BaseModel):
    """A schedule and where its firing has got to."""

    name: str
    workflow: str
    cron: str | None = None
    timezone: str = "UTC"
    every: int | None = None
    input: dict[str, Any] = {}
    overlap: Overlap = Overlap.SKIP
    catchup: float = 60.0  # seconds a missed tick may be late and still start
    paused: bool = False
    created_at: float
    last_tick: float  # every tick up to here is decided
    last_run_id: str | None = None  # the run overlap looks at
    buffered: float | None = None  # buffer_one: the tick that starts when that run ends
    starting: list[str] = []  # claimed run ids, maybe not started yet
    stopping: str | None = None  # cancel_other: the run to stop before starting
    notes: list[dict[str, Any]] = []

    def timing(self) -> Timing:
        return Timing(self.cron, self.timezone, self.every)

    def next_fire_times(self, count: int = 3, after: float | None = None) -> list[datetime]:
        """The next ticks after `after` (default: now), in the schedule's time zone; none
        while paused."""
        if self.paused:
            return []
        start = max(self.last_tick, time.time() if after is None else after)
        timing = self.timing()
        return [datetime.fromtimestamp(t, timing.zone()) for t in timing.upcoming(start, count)]

    def noted(self, now: float, notes: list[dict[str, Any]] | tuple[dict[str, Any], ...],
              ) -> list[dict[str, Any]]:
        return [*self.notes, *({"at": now, **n} for n in notes)][-NOTES_KEPT:]


@dataclass(frozen=True)
class Stored:
    schedule: Schedule
    version: int


class ScheduleStore:
    def __init__(self, client: redis.Redis, key_prefix: str, safe_url: str) -> None:
        self.redis = client
        self.key_prefix = key_prefix
        self.safe_url = safe_url
        self._create = client.register_script(_CREATE)
        self._replace = client.register_script(_REPLACE)

    def _key(self, name: str) -> str:
        return f"{self.key_prefix}schedule:{name}"

    @property
    def _index(self) -> str:
        return f"{self.key_prefix}schedules"

    @unavailable_as_store_error
    def now(self) -> float:
        """Redis's clock: every coordinator decides ticks by the same one."""
        seconds, micros = self.redis.time()
        return float(seconds) + micros / 1e6

    @unavailable_as_store_error
    def create(self, schedule: Schedule) -> None:
        if not self._create(keys=[self._key(schedule.name), self._index],
                            args=[schedule.name, schedule.model_dump_json()]):
            raise ScheduleExists(f"a schedule named {schedule.name!r} exists already")

    @unavailable_as_store_error
    def get(self, name: str) -> Stored:
        version, doc = self.redis.hmget(self._key(name), ["v", "doc"])
        if version is None or doc is None:
            raise ScheduleNotFound(f"no schedule named {name!r}")
        return Stored(Schedule.model_validate_json(doc), int(version))

    @unavailable_as_store_error
    def all(self) -> list[Stored]:
        names = sorted(_text(n) for n in self.redis.smembers(self._index))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hmget(self._key(name), ["v", "doc"])
        # A schedule deleted between the two reads is gone: skipped.
        return [Stored(Schedule.model_validate_json(doc), int(version))
                for version, doc in pipe.execute() if version is not None and doc is not None]

    @unavailable_as_store_error
    def replace(self, stored: Stored, schedule: Schedule) -> Stored | None:
        """Write `schedule` if the record is still at `stored.version`; None if it changed."""
        if not self._replace(keys=[self._key(schedule.name)],
                             args=[stored.version, schedule.model_dump_json()]):
            return None
        return Stored(schedule, stored.version + 1)

    def update(self, name: str, change: Callable[[Schedule], Schedule]) -> Stored:
        """Apply `change` to the current record; retried on a concurrent write."""
        for _ in range(MAX_CAS_ATTEMPTS):
            stored = self.get(name)
            written = self.replace(stored, change(stored.schedule))
            if written is not None:
                return written
        raise CommitConflict(f"schedule {name}: gave up after {MAX_CAS_ATTEMPTS} "
                             f"conflicting writes")

    @unavailable_as_store_error
    def delete(self, name: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(self._key(name))
        pipe.srem(self._index, name)
        if not pipe.execute()[0]:
            raise ScheduleNotFound(f"no schedule named {name!r}")
