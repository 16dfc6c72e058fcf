"""A runtime: the workflows a process hosts, their stores, and the parts that move runs.

Both modes use the same parts and differ only in the store and the dispatcher:
    Registry         which workflows are hosted here, and the engine's view of each
    Committer        load, decide, commit, then send (the one write path)
    WorkerExecution  run a dispatched task's code and commit what it did
    Sweeper          fire timers, re-drive lost work
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel

from . import _engine as engine
from . import _tracing
from ._children import ChildRuns, ChildTarget
from ._committer import CommitConflict, Committer, EventMaker, RunNotFound, check_input_depth
from ._config import Settings
from ._definition import Workflow
from ._dispatch.base import Dispatcher
from ._events import EventChecker, InvalidEvent
from ._middleware import Hooks, Middleware
from ._records import FlowSpec
from ._registry import Registry, UnknownWorkflow
from ._schemas import normalise, schema_errors
from ._steward import CatalogEntry, ClusterView
from ._stores import Loaded, RedisStore, RunStore
from ._stores.redis import connect
from ._sweeper import Sweeper
from ._upgrades import Moved, upgrade_runs
from ._worker import Outcome, WorkerExecution

# Seconds a runtime reuses what it read of the catalog (for workflows it does not host).
CATALOG_READ_EVERY = 1.0

__all__ = ["CommitConflict", "InvalidEvent", "RunNotFound", "Runtime", "UnknownWorkflow"]


class Runtime:
    def __init__(
        self,
        dispatcher: Dispatcher,
        settings: Settings | None = None,
        workflows: Iterable[Workflow] = (),
        store_factory: Callable[[str], RunStore] | None = None,
        middleware: Iterable[Middleware] = (),
    ) -> None:
        self.dispatcher = dispatcher
        self.registry = Registry()
        # Tracing hooks itself in wherever opentelemetry is installed (a no-op until a
        # TracerProvider is set), so apps and workers need not pass it.
        self.committer = Committer(self.registry, dispatcher, settings or Settings(),
                                   Hooks([*middleware, *_tracing.middleware()]))
        self.children = ChildRuns(self.committer, self.store_for, self.register,
                                  self._published_target)
        self.committer.children = self.children
        self.events = EventChecker(self.registry, self._published_events)
        self.worker = WorkerExecution(self.committer)
        self.sweeper = Sweeper(self.committer, lambda name: name in self.registry.workflows)
        self._stores: dict[str, RunStore] = {}
        self._store_factory = store_factory or self._redis_store
        self._catalog_client: Any = None
        self._catalog: tuple[float, dict[str, CatalogEntry]] | None = None
        for wf in workflows:
            self.register(wf)

    @property
    def settings(self) -> Settings:
        return self.committer.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """A Client adopts the cluster's recovery timers once it has read them."""
        self.committer.settings = settings

    # ---- what is hosted here, and where it is stored -----------------------------------

    @property
    def workflows(self) -> dict[str, Workflow]:
        return self.registry.workflows

    def register(self, wf: Workflow) -> None:
        self.registry.register(wf)

    def workflow(self, name: str) -> Workflow:
        return self.registry.workflow(name)

    def spec(self, name: str) -> FlowSpec | None:
        return self.registry.spec(name)

    def store_for(self, key_prefix: str) -> RunStore:
        store = self._stores.get(key_prefix)
        if store is None:
            store = self._stores[key_prefix] = self._store_factory(key_prefix)
        return store

    def stores(self) -> list[RunStore]:
        """One store per key prefix: workflows that share a prefix share a store."""
        return [self.store_for(prefix) for prefix in self.registry.key_prefixes()]

    def _redis_store(self, prefix: str) -> RunStore:
        return RedisStore.from_settings(self.settings, prefix)

    # ---- runs ------------------------------------------------------------------------

    def start(
        self, wf: Workflow, input: BaseModel | dict[str, Any], run_id: str | None = None
    ) -> tuple[str, bool]:
        """Validate, create and dispatch a run. Returns (run id, created); a run id that
        exists already is not started again."""
        self.register(wf)
        data = input.model_dump() if isinstance(input, BaseModel) else input
        check_input_depth(data)
        model = wf.input_model.model_validate(data)  # ValidationError: nothing written
        return self.start_spec(self.registry.spec(wf.name), wf.persistence_options.key_prefix,  # type: ignore[arg-type]
                               model.model_dump(mode="json"),
                               wf.state_model().model_dump(mode="json"), run_id)

    def start_spec(
        self, spec: FlowSpec, key_prefix: str, input: dict[str, Any], state: dict[str, Any],
        run_id: str | None = None, *, by: str | None = None, source: str = "client",
    ) -> tuple[str, bool]:
        """Start from validated data; for apps that know a workflow only by its catalog."""
        run_id = uuid.uuid4().hex if run_id is None else run_id  # the start span names it
        with _tracing.starting(spec.workflow, spec.version, run_id):
            return self.committer.start(self.store_for(key_prefix), spec, input, state,
                                        run_id, by=by, source=source)

    def apply(self, store: RunStore, run_id: str, make_event: EventMaker,
              spec: FlowSpec | None = None, *, release: str | None = None,
              loaded: Loaded | None = None) -> engine.Decision:
        return self.committer.apply(store, run_id, make_event, spec, release=release,
                                    loaded=loaded)

    def send(self, store: RunStore, run_id: str, name: str, payload: Any = None,
             key: str | None = None) -> str:
        """Send event `name` to a run: "delivered" (a wait took it), "queued" (kept in the
        run's mailbox for the next wait for it) or "duplicate" (its `key` was sent before).
        InvalidEvent for an undeclared name or a payload its model refuses (nothing is
        stored); ControlError for a finished run; RunNotFound."""
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200):
            raise InvalidEvent(f"event key must be 1-200 characters, got {key!r}")
        loaded = store.load(run_id)
        if loaded.record is None:
            raise RunNotFound(f"no run {run_id!r}")
        checked = self.events.check(loaded.record.workflow, name, payload,
                                    self.settings.max_payload)
        d = self.apply(store, run_id, lambda r, now: engine.Deliver(now, name, checked, key),
                       loaded=loaded)
        if d.ignored:
            return "duplicate"
        return ("delivered" if any(h["event"] == "event_received" for h in d.history)
                else "queued")

    def upgrade(self, workflow: str, from_version: str, steps: dict[str, str] | None = None,
                dry_run: bool = False) -> list[Moved]:
        """Move runs of `workflow` on a version starting with `from_version` to the version
        hosted here (see `_upgrades`)."""
        wf = self.workflow(workflow)
        spec = self.registry.spec(workflow)
        assert spec is not None
        return upgrade_runs(self.committer, self.store_for(wf.persistence_options.key_prefix),
                            wf, spec, from_version, steps, dry_run)

    # ---- the catalog, for workflows this process does not host --------------------------

    def _published(self, name: str) -> CatalogEntry | None:
        """A workflow's catalog entry, read at most once a second: a webhook handler that
        sends many events must not parse the whole catalog for each."""
        now = time.monotonic()
        if self._catalog is None or now - self._catalog[0] > CATALOG_READ_EVERY:
            if self._catalog_client is None:
                self._catalog_client = connect(self.settings.redis_url)
            view = ClusterView.read(self._catalog_client, self.settings.key_prefix)
            self._catalog = (now, view.entries)
        return self._catalog[1].get(name)

    def _published_events(self, name: str) -> dict[str, dict[str, Any] | None] | None:
        entry = self._published(name)
        return None if entry is None else entry.events

    def _published_target(self, name: str) -> ChildTarget | None:
        entry = self._published(name)
        if entry is None:
            return None

        def check(data: Any) -> dict[str, Any]:
            problems = schema_errors(entry.input_schema, data, "input")
            if problems:
                raise ValueError(f"invalid input for {name}: {problems}")
            return normalise(entry.input_schema, data)

        return ChildTarget(entry.spec(), entry.key_prefix, dict(entry.initial_state), check)

    # ---- on a worker ----------------------------------------------------------------

    def execute(self, workflow: str, run_id: str, token: int, branch: str | None = None,
                join: int | None = None, attempt: int = 1) -> Outcome:
        wf = self.workflow(workflow)
        store = self.store_for(wf.persistence_options.key_prefix)
        return self.worker.execute(wf, store, run_id, token, branch, join, attempt)

    # ---- timers and recovery -----------------------------------------------------------

    def sweep(self, store: RunStore, limit: int | None = None) -> int:
        return self.sweeper.sweep(store, limit)

    def sweep_all(self) -> int:
        return self.sweeper.sweep_all(self.stores())

    def close(self) -> None:
        """Stop the dispatcher's background work (an embedded sweeper) and drop connections."""
        self.dispatcher.close()
        self.worker.close()
        for store in self._stores.values():
            store.close()
        if self._catalog_client is not None:
            self._catalog_client.close()


