"""Fire schedules: each coordinator, every sweep pass, starts the runs of due ticks.

Any number of coordinators may run the same pass at once. Each decides a schedule's due
ticks from the record it read and claims them with a compare-and-set (`ScheduleStore`);
the one that wins starts the runs it wrote down. A run's id comes from the schedule and
the tick, so even a claim carried out twice (its coordinator died half-way and another
took it up) creates each run once.

Runs are started from the catalog, as `Client.start` does (the coordinator may not host
the workflow), and without asking for a live worker: a tick's run waits in its queue for
one rather than being lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from . import _engine as engine
from ._client import _checked, normalise
from ._engine import ControlError
from ._outage import OutageLog
from ._runtime import RunNotFound, Runtime, UnknownWorkflow
from ._schedule_rules import Overlap, is_due, plan, run_id_for
from ._schedules import Schedule, ScheduleStore, Stored
from ._steward import CatalogEntry, ClusterView
from ._stores import CorruptRecord, StoreUnavailable
from ._stores.redis import redact

log = logging.getLogger("orchestrator.schedules")

Catalog = Callable[[], dict[str, CatalogEntry]]


class ScheduleFirer:
    def __init__(self, runtime: Runtime, client: redis.Redis) -> None:
        self.runtime = runtime
        self.redis = client
        s = runtime.settings
        self.store = ScheduleStore(client, s.key_prefix, redact(s.redis_url))
        self._outage = OutageLog("schedules", log)

    def fire_due(self, now: float | None = None) -> int:
        """One pass over every schedule (at Redis's time unless `now` is given). Returns how
        many runs it started. An outage is logged once, and so is the end of it."""
        return self._outage.run(lambda: self._pass(now))

    def _pass(self, now: float | None) -> int:
        schedules = self.store.all()
        if not schedules:
            return 0
        now = self.store.now() if now is None else now
        catalog = self.catalog()
        started = 0
        for stored in schedules:
            try:
                started += self._fire(stored, now, catalog)
            except StoreUnavailable:
                raise
            except Exception:  # one broken schedule must not stop the others
                log.exception("schedule %s: firing failed", stored.schedule.name)
        return started

    def catalog(self) -> Catalog:
        """The catalog, read at most once, and only if a schedule needs it."""
        read: list[dict[str, CatalogEntry]] = []

        def entries() -> dict[str, CatalogEntry]:
            if not read:
                read.append(ClusterView.read(self.redis, self.runtime.settings.key_prefix)
                            .entries)
            return read[0]

        return entries

    def _fire(self, stored: Stored, now: float, catalog: Catalog) -> int:
        s = stored.schedule
        if s.starting or s.stopping:  # a claim whose coordinator may have died before it
            return self.carry_out(stored, now, catalog)
        timing = s.timing()
        if s.paused or not is_due(timing, s.last_tick, s.buffered, now):
            return 0
        running = s.overlap is not Overlap.ALLOW and self._running(s, catalog)
        p = plan(timing, s.overlap, s.catchup, s.last_tick, s.buffered, running, now)
        if not p.changes(s.last_tick, s.buffered):
            return 0
        for note in p.notes:
            log.info("schedule %s: %s", s.name, note)
        starting = [run_id_for(s.name, t) for t in p.start]
        claimed = self.store.replace(stored, s.model_copy(update={
            "last_tick": p.last_tick, "buffered": p.buffered, "starting": starting,
            "stopping": s.last_run_id if p.stop_previous else None,
            "last_run_id": starting[-1] if starting else s.last_run_id,
            "notes": s.noted(now, p.notes)}))
        if claimed is None:  # another coordinator decided these ticks first
            return 0
        return self.carry_out(claimed, now, catalog)

    def carry_out(self, stored: Stored, now: float, catalog: Catalog) -> int:
        """Stop, then start, what a claim wrote down; then clear it. Returns how many runs
        were created. A start that cannot succeed (the workflow left the catalog, the input
        no longer fits its schema) is noted and dropped; an outage leaves the claim for the
        next pass."""
        s = stored.schedule
        if s.stopping:
            self._stop(s, s.stopping, catalog)
        created, notes = 0, []
        for run_id in s.starting:
            try:
                created += self._start(s, run_id, catalog)
            except (UnknownWorkflow, ValueError) as exc:
                log.warning("schedule %s: run %s not started: %s", s.name, run_id, exc)
                notes.append({"event": "not_started", "run_id": run_id, "reason": str(exc)})
        self.store.replace(stored, s.model_copy(update={
            "starting": [], "stopping": None, "notes": s.noted(now, notes)}))
        return created

    def _start(self, s: Schedule, run_id: str, catalog: Catalog) -> int:
        entry = self._entry(s.workflow, catalog)
        data = normalise(entry.input_schema, _checked(entry.name, entry.input_schema, s.input))
        _, created = self.runtime.start_spec(entry.spec(), entry.key_prefix, data,
                                             dict(entry.initial_state), run_id)
        if created:
            log.info("schedule %s: started run %s", s.name, run_id)
        return int(created)

    def _stop(self, s: Schedule, run_id: str, catalog: Catalog) -> None:
        entry = catalog().get(s.workflow)
        if entry is None:  # its runs cannot be found either
            return
        store = self.runtime.store_for(entry.key_prefix)
        reason = f"schedule {s.name}: replaced by a later tick (overlap cancel_other)"
        try:
            self.runtime.apply(store, run_id, lambda rec, now: engine.Stop(now, reason))
        except (ControlError, RunNotFound):  # it ended meanwhile, or never started
            return
        log.info("schedule %s: stopped run %s", s.name, run_id)

    def _running(self, s: Schedule, catalog: Catalog) -> bool:
        entry = catalog().get(s.workflow)
        if s.last_run_id is None or entry is None:
            return False
        try:
            rec = self.runtime.store_for(entry.key_prefix).load(s.last_run_id).record
        except CorruptRecord:  # quarantined: it will not go on
            return False
        return rec is not None and not rec.status.is_terminal

    @staticmethod
    def _entry(workflow: str, catalog: Catalog) -> CatalogEntry:
        entry = catalog().get(workflow)
        if entry is None:
            raise UnknownWorkflow(f"no worker has published a workflow named {workflow!r}")
        return entry
