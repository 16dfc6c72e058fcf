"""Client: start and control runs by workflow name, without importing workflow code.

    client = Client()                       # ORCHESTRATOR_REDIS_URL and friends
    run = client.start("BuildAndDeploy", {"repo": "acme/app"})
    run.result(timeout=60)
"""

from __future__ import annotations

from typing import Any

import jsonschema
from celery import Celery

from ._config import Settings, celery_config
from ._dispatch.celery import CeleryDispatcher
from ._records import RunRecord, RunStatus
from ._runner import RunHandle
from ._runtime import RunNotFound, Runtime, UnknownWorkflow
from ._steward import CatalogEntry, read_catalog
from ._stores.redis import connect


class InvalidInput(ValueError):
    """Input that does not match the workflow's published schema; nothing was enqueued."""


class Client:
    def __init__(self, redis_url: str | None = None, *, broker_url: str | None = None,
                 settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env(redis_url=redis_url, broker_url=broker_url)
        app = Celery("orchestrator-client", set_as_current=False)
        app.conf.update(celery_config(self.settings))
        self.app = app
        self.runtime = Runtime(CeleryDispatcher(app), self.settings)
        self.redis = connect(self.settings.redis_url)

    def close(self) -> None:
        self.redis.close()
        self.app.close()

    # ---- the catalog -------------------------------------------------------------------

    def workflows(self) -> list[CatalogEntry]:
        return sorted(read_catalog(self.redis).values(), key=lambda e: e.name)

    def workflow(self, name: str) -> CatalogEntry:
        catalog = read_catalog(self.redis)
        if name not in catalog:
            raise UnknownWorkflow(
                f"no worker serves a workflow named {name!r}; published: {sorted(catalog)}")
        return catalog[name]

    # ---- runs ------------------------------------------------------------------------

    def start(self, name: str, input: dict[str, Any] | None = None, *,
              run_id: str | None = None) -> RunHandle:
        """Validate against the published schema, then enqueue. Same run id: same run."""
        entry = self.workflow(name)
        data = input or {}
        errors = sorted(jsonschema.Draft202012Validator(entry.input_schema).iter_errors(data),
                        key=lambda e: list(e.path))
        if errors:
            detail = "; ".join(f"{'.'.join(map(str, e.path)) or 'input'}: {e.message}"
                               for e in errors)
            raise InvalidInput(f"invalid input for {name}: {detail}")
        run_id, _ = self.runtime.start_spec(entry.spec(), entry.key_prefix, data,
                                            dict(entry.initial_state), run_id)
        return self._handle(run_id, entry.key_prefix)

    def attach(self, run_id: str, workflow: str | None = None) -> RunHandle:
        """A handle to a run, found in its workflow's store (every store if not given)."""
        prefixes = ([self.workflow(workflow).key_prefix] if workflow
                    else self._prefixes())
        for prefix in prefixes:
            if self.runtime.store_for(prefix).load(run_id).record is not None:
                return self._handle(run_id, prefix)
        raise RunNotFound(f"no run {run_id!r}")

    def runs(self, status: RunStatus | None = None, workflow: str | None = None,
             limit: int = 100) -> list[RunRecord]:
        found: list[RunRecord] = []
        for prefix in self._prefixes(workflow):
            found += self.runtime.store_for(prefix).list_runs(status, workflow, limit)
        return sorted(found, key=lambda r: r.created_at, reverse=True)[:limit]

    def gates(self, approver: str | None = None) -> list[RunRecord]:
        found: list[RunRecord] = []
        for prefix in self._prefixes():
            found += self.runtime.store_for(prefix).pending_gates(approver)
        return sorted(found, key=lambda r: r.gate.opened_at if r.gate else 0)

    def _prefixes(self, workflow: str | None = None) -> list[str]:
        entries = [self.workflow(workflow)] if workflow else self.workflows()
        return sorted({e.key_prefix for e in entries})

    def _handle(self, run_id: str, prefix: str) -> RunHandle:
        return RunHandle(run_id, self.runtime, self.runtime.store_for(prefix))
