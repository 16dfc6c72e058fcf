"""The recovery sweep: fire due timers (retry backoff, gate timeouts) and drive on runs
whose work was lost (a message dropped, a fork's join lost, a worker killed whole).

Coordinators run it every sweep interval; the embedded mode runs it on a thread. A run is
only re-sent when its work is really lost: no live lease, and (where the transport lets
us look) no message of it still waiting in its queue, so an overloaded cluster does not
multiply its own load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import _engine as engine
from ._committer import Committer
from ._dispatch.base import Dispatcher
from ._outage import OutageLog
from ._records import RunRecord, Task
from ._stores import CorruptRecord, RunStore, StoreUnavailable

log = logging.getLogger("orchestrator.sweep")


class QueueView:
    """What the sweep learns about queues in one pass, asking each queue once."""

    def __init__(self, dispatcher: Dispatcher, starting_within: float) -> None:
        self._dispatcher = dispatcher
        self._starting_within = starting_within
        self._lengths: dict[str, int] = {}
        self._messages: dict[str, frozenset[str] | None] = {}

    def busy(self, queue: str) -> bool:
        if queue not in self._lengths:
            self._lengths[queue] = self._dispatcher.queue_length(queue)
        return self._lengths[queue] > 0

    def waiting(self, rec: RunRecord, task: Task) -> bool | None:
        """Whether a message of `task` still waits in its queue (or a worker took it so
        recently that it has not taken the lease yet); None where the transport cannot tell."""
        queue = self.queue_of(rec, task)
        if queue not in self._messages:
            self._messages[queue] = self._dispatcher.message_ids(queue, self._starting_within)
        ids = self._messages[queue]
        return None if ids is None else self._dispatcher.message_id(rec.run_id, task) in ids

    def queue_of(self, rec: RunRecord, task: Task) -> str:
        """The broker queue of the run's version that `task` goes to."""
        return self._dispatcher.queue_of(rec.workflow, rec.version, task)


class Sweeper:
    def __init__(self, committer: Committer, hosts: Callable[[str], bool]) -> None:
        self.committer = committer
        self._hosts = hosts
        self._outage = OutageLog("sweep", log)
        self.saturated = False  # the last pass claimed a full batch: more is due at once

    def sweep(self, store: RunStore, limit: int | None = None) -> int:
        """One pass over runs whose timer is due. Returns how many runs changed."""
        s = self.committer.settings
        changed = 0
        queues = QueueView(self.committer.dispatcher, s.lease_ttl)
        claimed = store.claim_due(limit or s.sweep_batch, s.redispatch_after)
        self.saturated = self.saturated or len(claimed) >= (limit or s.sweep_batch)
        for run_id in claimed:
            try:
                changed += self._tick(store, run_id, queues)
            except CorruptRecord as exc:
                log.error("run %s: its record is corrupt (%s); quarantined: read it with "
                          "`orchestrator status %s --raw`", run_id, exc, run_id)
                store.quarantine(run_id)
            except StoreUnavailable:
                raise
            except Exception:  # one broken run must not stop the sweep of the others
                log.exception("run %s: sweep failed", run_id)
        store.purge_expired(s.sweep_batch)
        return changed

    def sweep_all(self, stores: list[RunStore]) -> int:
        """Sweep every store; an outage is logged once as one line, and so is the end of it."""
        self.saturated = False
        return self._outage.run(lambda: sum(self.sweep(store) for store in stores))

    def _tick(self, store: RunStore, run_id: str, queues: QueueView) -> int:
        s = self.committer.settings
        loaded = store.load(run_id)
        if loaded.record is None:
            store.set_due(run_id, None)
            return 0
        if not self._hosts(loaded.record.workflow):
            # Another runtime shares this key prefix and hosts it (an embedded runtime
            # beside a cluster): give the claim back rather than send what it cannot run.
            store.set_due(run_id, self.committer.due(loaded.record), loaded.version)
            return 0

        def tick(rec: RunRecord, now: float) -> engine.Event:
            results = store.branch_results(run_id, rec.fork.token) if rec.fork else {}
            tasks = [t for t in engine.live_tasks(rec) if t.branch not in results]
            live = store.live_leases(run_id, [t.lease_id for t in tasks])
            overdue = [t for t in tasks if t.lease_id not in live and t.dispatched_at is not None
                       and now - t.dispatched_at >= s.redispatch_after]
            waiting = {t.lease_id: queues.waiting(rec, t) for t in overdue}
            queued = frozenset(lease for lease, found in waiting.items() if found)
            busy = frozenset(t.queue for t in overdue if waiting[t.lease_id] is None
                             and queues.busy(queues.queue_of(rec, t)))
            return engine.Tick(now, live, busy, s.redispatch_after, s.join_after,
                               float(s.visibility_timeout), results, queued,
                               self._children_seen(rec), self._children_ended(rec))

        try:
            d = self.committer.apply(store, run_id, tick, loaded=loaded)
        except engine.ControlError as exc:
            # What is due needs the definition of a version not hosted here (a lost join
            # to re-drive): a coordinator that hosts it will.
            log.debug("run %s: %s; left to a host of version %s", run_id, exc,
                      loaded.record.version)
            store.set_due(run_id, self.committer.due(loaded.record), loaded.version)
            return 0
        if not d.changed:  # a commit since the load set the timer that counts
            store.set_due(run_id, self.committer.due(loaded.record), loaded.version)
        return int(d.changed)

    def _children_seen(self, rec: RunRecord) -> frozenset[str]:
        """The children this run waits to see started whose record exists by now."""
        children = self.committer.children
        if children is None:
            return frozenset()
        return frozenset(c.run_id for c in engine.pending_children(rec)
                         if children.exists(c.key_prefix, c.run_id))

    def _children_ended(self, rec: RunRecord) -> frozenset[str]:
        """The children this run stopped that have ended since (all of them where no
        child runner is plugged in: nothing could stop them again)."""
        children = self.committer.children
        if children is None:
            return frozenset(c.run_id for c in rec.stopping)
        return frozenset(c.run_id for c in rec.stopping
                         if children.ended(c.key_prefix, c.run_id))
