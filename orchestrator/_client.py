"""Client: start and control runs by workflow name, without importing workflow code.

    client = Client()                       # ORCHESTRATOR_REDIS_URL and friends
    run = client.start("BuildAndDeploy", {"repo": "acme/app"})
    run.result(timeout=60)
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Celery

from ._committer import MAX_INPUT_DEPTH, nesting_depth
from ._config import Settings, celery_config
from ._dispatch.celery import CeleryDispatcher
from ._records import RunRecord, RunStatus
from ._runner import RunHandle
from ._runtime import RunNotFound, Runtime, UnknownWorkflow
from ._schemas import field_errors, normalise
from ._steward import CatalogEntry, ClusterView
from ._stores.redis import connect, redact, unavailable_as_store_error

if TYPE_CHECKING:
    from ._schedule_api import Schedules

T = TypeVar("T")

# Deeper input is refused before it is validated: validators, JSON encoders and the store's
# Lua JSON decoder all recurse, and would fail far from the caller at ~1,000 levels.
# Candidates an ambiguous shortened run id lists (per store asked).
AMBIGUITY_SHOWN = 10


class InvalidInput(ValueError):
    """Input that does not match the workflow's published schema; nothing was enqueued.
    `errors` lists (field, message), the field a dotted path ('' for the whole input)."""

    def __init__(self, message: str, errors: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [("", message)]


class AmbiguousRunId(ValueError):
    """A shortened run id that starts more than one run id; the message lists some."""


class NoLiveWorker(UnknownWorkflow):
    """The workflow is in the catalog but no live worker executes it: a start would wait
    in a queue nobody reads. `Client.start(..., queue_anyway=True)` enqueues it anyway."""


class Client:
    def __init__(self, redis_url: str | None = None, *, broker_url: str | None = None,
                 settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env(redis_url=redis_url, broker_url=broker_url)
        app = Celery("orchestrator-client", set_as_current=False)
        app.conf.update(celery_config(self.settings))
        self.app = app
        self.runtime = Runtime(CeleryDispatcher(app), self.settings)
        self.redis = connect(self.settings.redis_url)
        self.safe_url = redact(self.settings.redis_url)

    def close(self) -> None:
        self.redis.close()
        self.app.close()

    # ---- the catalog -------------------------------------------------------------------

    @unavailable_as_store_error
    def workflows(self) -> list[CatalogEntry]:
        """Every published workflow; `hosts` lists the live workers executing it."""
        return sorted(self._view().entries.values(), key=lambda e: e.name)

    @unavailable_as_store_error
    def workflow(self, name: str) -> CatalogEntry:
        return self._entry(self._view(), name)

    @unavailable_as_store_error
    def in_flight(self, workflow: str) -> dict[str, int]:
        """Runs of `workflow` not finished yet, per version: when a version has none left,
        its workers can go."""
        store = self.runtime.store_for(self.workflow(workflow).key_prefix)
        return dict(Counter(r.version for r in store.active_runs(workflow)))

    @unavailable_as_store_error
    def unhosted(self, records: list[RunRecord]) -> dict[str, str]:
        """Run id -> "no worker hosts W@V", for active runs whose version no live worker
        executes: they wait (their steps stay queued) until one appears."""
        view = self._view()
        return {r.run_id: f"no worker hosts {r.workflow}@{r.version}" for r in records
                if not r.status.is_terminal and not view.hosts_of(r.workflow, r.version)}

    def _view(self) -> ClusterView:
        return ClusterView.read(self.redis, self.settings.key_prefix)

    @staticmethod
    def _entry(view: ClusterView, name: str) -> CatalogEntry:
        if name not in view.entries:
            raise UnknownWorkflow(f"no worker has published a workflow named {name!r}; "
                                  f"published: {sorted(view.entries)}")
        return view.entries[name]

    @property
    def schedules(self) -> Schedules:
        """Create, list, pause, resume, trigger and delete schedules."""
        from ._schedule_api import Schedules  # it builds on this module

        return Schedules(self)

    # ---- runs ------------------------------------------------------------------------

    @unavailable_as_store_error
    def start(self, name: str, input: dict[str, Any] | None = None, *,
              run_id: str | None = None, queue_anyway: bool = False, by: str | None = None,
              source: str = "client") -> RunHandle:
        """Validate against the published schema, normalise as the workflow's model would,
        then enqueue. Same run id: same run. NoLiveWorker when no live worker executes the
        workflow, unless `queue_anyway` (it then waits in its queue for one). `by` (from
        `source`: client, api, console, cli) goes into the history as who started it."""
        view = self._view()
        entry = self._entry(view, name)
        if not entry.hosts and not queue_anyway:
            raise NoLiveWorker(
                f"no live worker hosts {name!r}: none has renewed its catalog lease in the "
                f"last {self.settings.catalog_ttl:g}s (pass queue_anyway=True to enqueue it "
                f"anyway)")
        data = normalise(entry.input_schema, _checked(name, entry.input_schema, input or {}))
        # The first timers of the run must be the cluster's, not this app's defaults.
        cluster: dict[str, Any] = view.cluster_settings() or {}
        self.runtime.settings = dataclasses.replace(self.settings, **cluster)
        run_id, _ = self.runtime.start_spec(entry.spec(), entry.key_prefix, data,
                                            dict(entry.initial_state), run_id,
                                            by=by, source=source)
        return self._handle(run_id, entry.key_prefix)

    @unavailable_as_store_error
    def attach(self, run_id: str, workflow: str | None = None) -> RunHandle:
        """A handle to a run, found in its workflow's store (every store if not given).
        A unique start of a run id will do; AmbiguousRunId if it starts several."""
        prefixes = ([self.workflow(workflow).key_prefix] if workflow
                    else self._prefixes())
        for prefix in prefixes:
            if self.runtime.store_for(prefix).load(run_id).record is not None:
                return self._handle(run_id, prefix)
        found = [(rid, prefix) for prefix in prefixes
                 for rid in self.runtime.store_for(prefix).find_run_ids(run_id, AMBIGUITY_SHOWN)]
        if len(found) > 1:
            shown = ", ".join(sorted(f for f, _ in found)[:AMBIGUITY_SHOWN])
            raise AmbiguousRunId(f"{run_id!r} starts more than one run id: {shown}")
        if found:
            return self._handle(*found[0])
        raise RunNotFound(f"no run {run_id!r}")

    @unavailable_as_store_error
    def send(self, run_id: str, name: str, payload: Any = None, *,
             key: str | None = None) -> str:
        """Send event `name` to a run (see `RunHandle.send`), checked against the schema
        its workflow publishes."""
        return self.attach(run_id).send(name, payload, key=key)

    @unavailable_as_store_error
    def runs(self, status: RunStatus | None = None, workflow: str | None = None,
             limit: int = 100) -> list[RunRecord]:
        found: list[RunRecord] = []
        for prefix in self._prefixes(workflow):
            found += self.runtime.store_for(prefix).list_runs(status, workflow, limit)
        return sorted(found, key=lambda r: r.created_at, reverse=True)[:limit]

    @unavailable_as_store_error
    def gates(self, approver: str | None = None,
              groups: Iterable[str] = ()) -> list[RunRecord]:
        """Runs waiting at a gate, the longest waiting first: every one, or those `approver`
        may decide, listed by name or as `group:<g>` for one of `groups`."""
        names = [None] if approver is None else [approver, *(f"group:{g}" for g in groups)]
        found: dict[str, RunRecord] = {}
        for prefix in self._prefixes():
            for name in names:
                for record in self.runtime.store_for(prefix).pending_gates(name):
                    found.setdefault(record.run_id, record)
        return sorted(found.values(), key=lambda r: r.gate.opened_at if r.gate else 0)

    def _prefixes(self, workflow: str | None = None) -> list[str]:
        entries = [self.workflow(workflow)] if workflow else self.workflows()
        return sorted({e.key_prefix for e in entries})

    def _handle(self, run_id: str, prefix: str) -> RunHandle:
        return RunHandle(run_id, self.runtime, self.runtime.store_for(prefix))


def _checked(name: str, schema: dict[str, Any], data: Any) -> Any:
    if nesting_depth(data) > MAX_INPUT_DEPTH:
        raise InvalidInput(f"invalid input for {name}: nested deeper than "
                           f"{MAX_INPUT_DEPTH} levels")
    problems = field_errors(schema, data)
    if problems:
        text = "; ".join(f"{field or 'input'}: {message}" for field, message in problems)
        raise InvalidInput(f"invalid input for {name}: {text}", problems)
    return data
