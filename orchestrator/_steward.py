"""The Steward: a registry of workflows, published to Redis so apps can find them by name.

Workers and coordinators publish what they host when they start; an app that never
imports the workflow code reads the catalog, validates input against the published JSON
schema and starts runs by name.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from typing import Any

import redis
from pydantic import BaseModel

from . import _graph
from ._definition import Workflow
from ._records import FlowSpec, StepPolicy, StepSpec
from ._registry import spec_of

CATALOG_KEY = "orchestrator:catalog"


class CatalogEntry(BaseModel):
    """What the catalog says about one workflow."""

    name: str
    description: str
    version: str
    key_prefix: str
    input_schema: dict[str, Any]
    state_schema: dict[str, Any]
    graph: dict[str, list[str]]
    queues: dict[str, str]
    steps: dict[str, dict[str, Any]]
    imperative: bool
    initial_state: dict[str, Any]
    hosts: list[str] = []
    published_at: float = 0.0

    def spec(self) -> FlowSpec:
        """The engine's view, rebuilt from the catalog (no reducers: starting needs none)."""
        return FlowSpec(self.name, self.version,
                        {n: StepSpec(StepPolicy.model_validate(o["policy"]), o.get("route"))
                         for n, o in self.steps.items()})


class Steward:
    """`steward.register(wf)` (also usable as a decorator on a function returning one)."""

    def __init__(self, workflows: Iterable[Workflow] = ()) -> None:
        self._workflows: dict[str, Workflow] = {}
        for wf in workflows:
            self.register(wf)

    def register(self, wf: Workflow) -> Workflow:
        wf.check_complete()
        known = self._workflows.get(wf.name)
        if known is not None and known.version != wf.version:
            raise ValueError(f"the Steward already has a different workflow named {wf.name!r}")
        self._workflows[wf.name] = wf
        return wf

    def __iter__(self) -> Any:
        return iter(self._workflows.values())

    def __len__(self) -> int:
        return len(self._workflows)

    def get(self, name: str) -> Workflow:
        return self._workflows[name]

    def publish(self, client: redis.Redis, host: str | None = None) -> list[CatalogEntry]:
        return publish(client, self._workflows.values(), host)


def entry_of(wf: Workflow, host: str | None = None) -> CatalogEntry:
    spec = spec_of(wf)
    return CatalogEntry(
        name=wf.name, description=wf.description, version=wf.version,
        key_prefix=wf.persistence_options.key_prefix,
        input_schema=wf.input_model.model_json_schema(),
        state_schema=wf.state_model.model_json_schema(),
        graph=_graph.edges(wf), queues=wf.queues(),
        steps={n: {"policy": s.policy.model_dump(mode="json"), "route": s.route}
               for n, s in spec.steps.items()},
        imperative=wf.is_imperative, initial_state=wf.state_model().model_dump(mode="json"),
        hosts=[host] if host else [], published_at=time.time(),
    )


def publish(client: redis.Redis, workflows: Iterable[Workflow],
            host: str | None = None) -> list[CatalogEntry]:
    """Write each workflow's entry; hosts accumulate across the processes that publish."""
    host = host or socket.gethostname()
    entries = []
    for wf in workflows:
        entry = entry_of(wf, host)
        raw = client.hget(CATALOG_KEY, wf.name)
        if raw is not None:
            old = CatalogEntry.model_validate_json(raw)
            if old.version == entry.version:
                entry.hosts = sorted(set(old.hosts) | {host})
        client.hset(CATALOG_KEY, wf.name, entry.model_dump_json())
        entries.append(entry)
    return entries


def read_catalog(client: redis.Redis) -> dict[str, CatalogEntry]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): CatalogEntry.model_validate_json(v)
            for k, v in client.hgetall(CATALOG_KEY).items()}
