"""The Steward registers workflows and publishes them; the catalog describes them; hosts
keep their place in it with a heartbeat, and apps start runs from it through `Client`."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import redis
from pydantic import BaseModel, ConfigDict

from orchestrator import (
    END,
    START,
    Client,
    InvalidInput,
    RunNotFound,
    RunStatus,
    Settings,
    Steward,
    StoreUnavailable,
    UnknownWorkflow,
    Workflow,
)
from orchestrator._celery import find_workflows
from orchestrator._client import AmbiguousRunId, NoLiveWorker
from orchestrator._steward import read_catalog, read_cluster_settings
from tests import flows
from tests.conftest import Cluster, free_port, wait_for
from workers.deploy import build_and_deploy


def test_steward_registers_publishes_and_is_found_in_a_module(rclient: redis.Redis) -> None:
    steward = Steward([flows.loop])
    assert steward.register(build_and_deploy) is build_and_deploy
    with pytest.raises(ValueError, match="different workflow"):
        steward.register(flows.loop.flow({"__start__": "Tick", "Tick": flows.tick,
                                          "Other": flows.tick}))
    module = types.ModuleType("apps.catalogued")
    module.steward = steward  # type: ignore[attr-defined]
    assert {w.name for w in find_workflows(module)} == {"Loop", "BuildAndDeploy"}

    steward.publish(rclient, host="w1@box")
    steward.publish(rclient, host="w2@box")
    catalog = read_catalog(rclient)
    entry = catalog["BuildAndDeploy"]
    assert entry.hosts == ["w1@box", "w2@box"]
    assert entry.version == build_and_deploy.version_id and entry.key_prefix == "deploy:"
    assert entry.initial_state == {"commit": None, "artifact": None, "released": False}
    assert entry.spec().steps["Clone"].policy.queue == "orchestrator.steps"
    assert catalog["Loop"].graph["Tick"] == ["Tick", "__end__"]
    assert read_cluster_settings(rclient) == {"redispatch_after": 60.0, "join_after": 5.0,
                                              "lease_ttl": 30.0}


def test_the_catalog_lives_under_the_key_prefix(rclient: redis.Redis, redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, key_prefix="blue:")
    Steward([flows.loop]).publish(rclient, host="w1@box", settings=settings)
    assert rclient.exists("blue:catalog") and not rclient.exists("orchestrator:catalog")
    assert read_catalog(rclient) == {}
    assert read_catalog(rclient, "blue:")["Loop"].hosts == ["w1@box"]
    assert [e.name for e in Client(settings=settings).workflows()] == ["Loop"]


# ---- liveness, with real worker processes -------------------------------------------------


def _hosts(client: Client, name: str) -> list[str]:
    return next((e.hosts for e in client.workflows() if e.name == name), [])


def test_a_flushed_catalog_comes_back_within_a_heartbeat(
        cluster_factory: Callable[..., Cluster], redis_url: str, rclient: redis.Redis) -> None:
    cluster = cluster_factory(ORCHESTRATOR_CATALOG_TTL="1.5")
    cluster.worker("w1")
    client = Client(redis_url)
    assert [h.split("@")[0] for h in _hosts(client, "Loop")] == ["w1"]

    rclient.flushall()  # what a restart without persistence or an empty replica leaves
    assert client.workflows() == []
    wait_for(lambda: _hosts(client, "Loop"), 5, what="the worker to publish again")
    run = client.start("Loop", {"times": 2})
    assert run.result(timeout=30, raise_on_failure=True).state == {"n": 2}


def test_stopped_workers_leave_the_catalog_and_starts_are_refused(
        cluster_factory: Callable[..., Cluster], redis_url: str) -> None:
    cluster = cluster_factory(ORCHESTRATOR_CATALOG_TTL="1.5")
    client = Client(redis_url)
    stopped = cluster.worker("w1")
    assert _hosts(client, "Loop")
    stopped.terminate()  # a clean shutdown withdraws at once
    assert _hosts(client, "Loop") == []
    with pytest.raises(NoLiveWorker, match="no live worker hosts 'Loop'"):
        client.start("Loop", {"times": 1})

    killed = cluster.worker("w2")
    assert _hosts(client, "Loop")
    killed.kill()  # no goodbye: the lease runs out
    wait_for(lambda: _hosts(client, "Loop") == [], 5, what="the killed worker's lease to end")
    assert isinstance(NoLiveWorker("x"), UnknownWorkflow)
    with pytest.raises(NoLiveWorker):
        client.start("Loop", {"times": 1})

    queued = client.start("Loop", {"times": 1}, queue_anyway=True)
    assert queued.status() is RunStatus.PENDING or queued.status() is RunStatus.RUNNING
    cluster.worker("w3")
    assert queued.result(timeout=30, raise_on_failure=True).state == {"n": 1}


def test_a_client_starts_runs_with_the_clusters_recovery_timers(
        cluster_factory: Callable[..., Cluster], redis_url: str, rclient: redis.Redis) -> None:
    cluster_factory().coordinator("coord")  # ORCHESTRATOR_REDISPATCH_AFTER=3 (tests' env)
    assert read_cluster_settings(rclient) == {"redispatch_after": 3.0, "join_after": 1.0,
                                              "lease_ttl": 2.0}
    client = Client(settings=Settings(redis_url=redis_url))  # redispatch_after 60
    assert client.settings.redispatch_after == 60
    with pytest.raises(NoLiveWorker):  # a coordinator runs no steps
        client.start("Loop", {"times": 1})
    run = client.start("Loop", {"times": 1}, queue_anyway=True)
    due = rclient.zscore("loop:due", run.run_id)
    assert due is not None
    assert due - run.record().created_at == pytest.approx(3.0, abs=0.5)


# ---- input, as the workflow's model would store it ------------------------------------------


class Limits(BaseModel):
    cpus: int = 2
    memory: float = 1.5


class Target(BaseModel):
    model_config = ConfigDict(extra="allow")
    host: str
    port: int = 22


class RichInput(BaseModel):
    name: str
    count: int
    limits: Limits = Limits()
    target: Target | None = None
    targets: list[Target] = []
    pair: tuple[int, str] = (0, "x")
    labels: dict[str, int] = {}
    meta: dict[str, Any] = {}


def _noop(ctx: Any) -> str:
    return END


rich = Workflow("Rich").input(RichInput).flow({START: "Go", "Go": _noop})


@pytest.fixture
def rich_client(rclient: redis.Redis, redis_url: str) -> Client:
    Steward([rich]).publish(rclient, host="w1@box")  # a live host for one lease
    return Client(redis_url)


@pytest.mark.parametrize("given", [
    {"name": "a", "count": 1.0, "extra": True},
    {"name": "a", "count": 3, "limits": {"cpus": 4.0, "gpu": 1}, "pair": [2.0, "y"],
     "target": {"host": "h", "port": 2.0, "user": "me"}, "labels": {"x": 5.0},
     "targets": [{"host": "h1"}, {"host": "h2", "port": 8.0}], "meta": {"k": 1.0}},
])
def test_client_stores_input_as_the_workflow_runner_does(rich_client: Client,
                                                         given: dict[str, Any]) -> None:
    stored = rich_client.start("Rich", given).record().input
    assert stored == RichInput.model_validate(given).model_dump(mode="json")


def test_input_nested_a_thousand_deep_is_invalid_input(rich_client: Client) -> None:
    deep: dict[str, Any] = {}
    for _ in range(1000):
        deep = {"d": deep}
    with pytest.raises(InvalidInput, match="nested deeper than"):
        rich_client.start("Rich", {"name": "a", "count": 1, "meta": deep})


def test_attach_takes_a_unique_start_of_a_run_id(rich_client: Client) -> None:
    for run_id in ("abc-1", "abc-2", "xyz-1"):
        rich_client.start("Rich", {"name": "a", "count": 1}, run_id=run_id)
    assert rich_client.attach("xy").run_id == "xyz-1"
    assert rich_client.attach("abc-2", "Rich").run_id == "abc-2"
    with pytest.raises(AmbiguousRunId, match="abc-1, abc-2"):
        rich_client.attach("ab")
    assert issubclass(AmbiguousRunId, ValueError)
    with pytest.raises(RunNotFound):
        rich_client.attach("q")


def test_client_reports_redis_down_as_store_unavailable() -> None:
    client = Client(f"redis://127.0.0.1:{free_port()}/0")
    for call in (lambda: client.start("Rich", {}), client.workflows,
                 lambda: client.attach("r1")):
        with pytest.raises(StoreUnavailable):
            call()
