"""`Client().schedules`: create, list and control schedules; coordinators fire them.

    client.schedules.create("nightly", "BuildAndDeploy", cron="0 3 * * *",
                            timezone="Europe/Berlin", input={"repo": "acme/app"})
    client.schedules.trigger("nightly").result(timeout=60)
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

from ._client import _checked, normalise
from ._runner import RunHandle
from ._schedule_firer import ScheduleFirer
from ._schedule_rules import Overlap, Timing, check_name, manual_run_id
from ._schedules import Schedule, ScheduleStore
from ._steward import ClusterView
from ._stores.redis import unavailable_as_store_error

if TYPE_CHECKING:
    from ._client import Client


class Schedules:
    def __init__(self, client: Client) -> None:
        self._client = client
        self.safe_url = client.safe_url
        self._store = ScheduleStore(client.redis, client.settings.key_prefix, client.safe_url)

    @unavailable_as_store_error
    def create(self, name: str, workflow: str, *, cron: str | None = None,
               timezone: str = "UTC", every: int | None = None,
               input: dict[str, Any] | None = None, overlap: Overlap | str = Overlap.SKIP,
               catchup: float = 60.0) -> Schedule:
        """Store a schedule whose first tick is the first after now. Everything is checked
        first: the timing (ValueError for a bad cron expression, time zone or interval),
        the workflow (UnknownWorkflow), the input against its published schema
        (InvalidInput); ScheduleExists if the name is taken."""
        check_name(name)
        Timing(cron, timezone, every)
        if overlap not in set(Overlap):
            raise ValueError(f"overlap must be one of {', '.join(Overlap)}, got {overlap!r}")
        if (isinstance(catchup, bool) or not isinstance(catchup, int | float)
                or not 1 <= catchup < math.inf):
            raise ValueError(f"catchup must be at least 1 second (a tick normally starts "
                             f"within a sweep interval of its time), got {catchup!r}")
        entry = self._client.workflow(workflow)
        data = normalise(entry.input_schema, _checked(workflow, entry.input_schema, input or {}))
        size, limit = len(json.dumps(data)), self._client.settings.max_payload
        if size > limit:
            raise ValueError(f"input is {size} bytes of JSON, over the {limit}-byte limit "
                             f"(ORCHESTRATOR_MAX_PAYLOAD)")
        now = self._store.now()
        schedule = Schedule(name=name, workflow=workflow, cron=cron, timezone=timezone,
                            every=every, input=data, overlap=Overlap(overlap),
                            catchup=float(catchup), created_at=now, last_tick=now)
        self._store.create(schedule)
        return schedule

    def list(self) -> list[Schedule]:
        return [stored.schedule for stored in self._store.all()]

    def get(self, name: str) -> Schedule:
        return self._store.get(name).schedule

    def pause(self, name: str) -> Schedule:
        """No tick fires until resume (a claim already made is still carried out)."""
        return self._store.update(name, lambda s: s.model_copy(update={"paused": True})).schedule

    def resume(self, name: str) -> Schedule:
        """Fire again from now on: ticks that fell in the pause are not started."""
        now = self._store.now()
        return self._store.update(name, lambda s: s.model_copy(update={
            "paused": False, "last_tick": max(s.last_tick, now)})).schedule

    @unavailable_as_store_error
    def trigger(self, name: str) -> RunHandle:
        """Start one run now, whatever the overlap policy and even while paused; it becomes
        the run the next tick's overlap looks at."""
        schedule = self.get(name)
        client = self._client
        view = ClusterView.read(client.redis, client.settings.key_prefix)
        entry = client.workflow(schedule.workflow)  # UnknownWorkflow before anything is written
        _checked(entry.name, entry.input_schema, schedule.input)
        # The first timers of the run must be the cluster's, as for Client.start.
        cluster: dict[str, Any] = view.cluster_settings() or {}
        client.runtime.settings = dataclasses.replace(client.settings, **cluster)
        now = self._store.now()
        run_id = manual_run_id(name, now)
        claimed = self._store.update(name, lambda s: s.model_copy(update={
            "starting": [*s.starting, run_id], "last_run_id": run_id}))
        ScheduleFirer(client.runtime, client.redis).carry_out(claimed, now, lambda: view.entries)
        return client.attach(run_id, schedule.workflow)

    def delete(self, name: str) -> None:
        """Runs it started go on."""
        self._store.delete(name)
