"""Deploys while runs are in flight: each run is pinned to its version, only workers that
host that version run its steps, and runs move to a new version only when told to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import redis

from orchestrator import Client, RunStatus, WorkflowRunner
from tests import flows
from tests.conftest import Cluster, wait_for
from tests.test_cli import cli, cli_json
from tests.versions import v1, v2

V1 = {"ORCHESTRATOR_WORKFLOWS": "tests.versions.v1"}
V2 = {"ORCHESTRATOR_WORKFLOWS": "tests.versions.v2"}
V1_QUEUE = "orchestrator.steps@Rollout@1"


def _ran(rclient: redis.Redis, run_id: str) -> list[tuple[str, str]]:
    return [(e["step"], e["version"]) for e in flows.events(rclient, run_id)]


def _parked(cluster: Cluster, run_id: str, **input: Any) -> Any:
    handle = WorkflowRunner(v1.rollout, app=cluster.app).run(input, run_id=run_id)
    wait_for(lambda: handle.status() is RunStatus.WAITING, 60, what=f"{run_id} at its gate")
    return handle


def _acknowledged(rclient: redis.Redis) -> None:
    """A run is parked once its step is committed, and the step's task done once its
    message is acknowledged: a worker stopped in between (terminate signals its pool too)
    gives the message back, and the queue would hold it beside the next step."""
    wait_for(lambda: rclient.hlen("unacked") == 0, 30, what="every message acknowledged")


def test_a_run_waits_visibly_for_a_worker_of_its_version_and_finishes_on_its_code(
        cluster_factory: Callable[..., Cluster], redis_url: str,
        rclient: redis.Redis) -> None:
    old, new = cluster_factory(**V1), cluster_factory(**V2)
    old.coordinator("coord")
    v1_worker = old.worker("v1a")
    handle = _parked(old, "roll1")
    _acknowledged(rclient)
    v1_worker.terminate()  # the deploy: version 1's workers replaced by version 2's
    new.worker("v2a")
    client = Client(redis_url)
    client.attach("roll1").approve("ops")
    # Its next step waits in version 1's queue; version 2's worker does not touch it.
    wait_for(lambda: rclient.llen(V1_QUEUE) == 1, 30, what="B queued for version 1")
    shown = cli(redis_url, "status", "roll1").stdout
    assert "no worker hosts Rollout@1" in shown, shown
    assert "no worker hosts Rollout@1" in cli(redis_url, "runs").stdout
    fresh = client.start("Rollout", {"gate": False})  # new runs start on the newest
    assert fresh.result(timeout=60).output == {"version": "2"}
    # The console says so too, beside a run its version's worker finished (no users
    # here: it reads anonymously); its catalog counts the run in flight on version 1.
    _, console = new.console()
    for page in ("/runs/roll1", "/"):
        assert "no worker hosts Rollout@1" in httpx.get(console + page).text, page
    catalog = httpx.get(console + "/api/v1/workflows/Rollout").json()
    assert catalog["in_flight"] == {"1": 1} and "1" not in catalog["versions"]
    workflows_page = httpx.get(console + "/workflows").text
    assert "Runs in flight" in workflows_page and ">1<" in workflows_page
    assert handle.status() is RunStatus.RUNNING and rclient.llen(V1_QUEUE) == 1
    old.worker("v1b")  # version 1 is back: the parked run finishes on its own code
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED and result.output == {"version": "1"}
    assert _ran(rclient, "roll1") == [("A", "1"), ("B", "1")]
    (listed,) = cli_json(redis_url, "workflows")
    assert listed["version"] == "2" and listed["in_flight"] == {}
    assert {v: [h.split("@")[0] for h in hosts] for v, hosts in listed["versions"].items()} \
        == {"1": ["v1b"], "2": ["v2a"]}
    client.close()


def test_an_upgrade_moves_runs_to_the_new_version_and_a_refused_one_changes_nothing(
        cluster_factory: Callable[..., Cluster], redis_url: str,
        rclient: redis.Redis) -> None:
    old, new = cluster_factory(**V1), cluster_factory(**V2)
    old.coordinator("coord")
    v1_worker = old.worker("v1a")
    movable = _parked(old, "up1", count=3)
    stuck = _parked(old, "up2", count=-5)  # version 2's state refuses a negative count
    queued = _parked(old, "up3")
    _acknowledged(rclient)
    v1_worker.terminate()
    new.worker("v2a")
    client = Client(redis_url)
    client.attach("up3").approve("ops")  # between steps: B queued for version 1
    wait_for(lambda: rclient.llen(V1_QUEUE) == 1, 30, what="B queued for version 1")
    before = stuck.record()
    dry = cli(redis_url, "runs", "upgrade", "--workflow", "Rollout", "--from", "1",
              "--dry-run", check=False, **V2)
    assert dry.returncode == 2 and "would move" in dry.stdout, dry.stdout + dry.stderr
    assert movable.record().version == "1"  # a dry run changes nothing
    done = cli(redis_url, "runs", "upgrade", "--workflow", "Rollout", "--from", "1",
               "--to", "2", check=False, **V2)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "up2: left on 1: its state does not fit" in done.stdout
    assert "2 of 3 run(s) moved" in done.stdout
    assert stuck.record() == before  # refused: exactly as it was
    moved = movable.record()
    assert moved.version == "2" and moved.gate is not None and moved.gate.then == "B2"
    (entry,) = [h for h in movable.history() if h["event"] == "upgraded"]
    assert entry["from"] == "1" and entry["to"] == "2" and entry["steps"] == {"B": "B2"}
    client.attach("up1").approve("ops")
    assert movable.result(timeout=60).output == {"version": "2"}
    assert _ran(rclient, "up1") == [("A", "1"), ("B2", "2")]
    # The step that waited in version 1's queue went again to version 2's, as B2.
    assert queued.result(timeout=60).output == {"version": "2"}
    assert _ran(rclient, "up3") == [("A", "1"), ("B2", "2")]
    assert stuck.record().version == "1" and stuck.status() is RunStatus.WAITING
    client.close()


def test_other_code_under_a_served_version_label_is_refused(
        cluster_factory: Callable[..., Cluster]) -> None:
    old = cluster_factory(**V1)
    old.worker("v1a")
    changed = cluster_factory(ORCHESTRATOR_WORKFLOWS="tests.versions.v1_changed")
    proc = changed._start("worker", "impostor", "-c", "1")
    assert proc.proc.wait(60) != 0
    assert "two definitions may not share a version label" in proc.log.read_text()


def test_a_mixed_fleet_under_load_runs_no_step_under_the_wrong_version(
        cluster_factory: Callable[..., Cluster], rclient: redis.Redis) -> None:
    old, new = cluster_factory(**V1), cluster_factory(**V2)
    old.coordinator("coord")
    for name in ("v1a", "v1b"):
        old.worker(name)
    for name in ("v2a", "v2b"):
        new.worker(name)
    handles = []
    for i in range(100):
        handles.append(WorkflowRunner(v1.rollout, app=old.app).run({"gate": False},
                                                                   run_id=f"mix1-{i}"))
        handles.append(WorkflowRunner(v2.rollout, app=new.app).run({"gate": False},
                                                                   run_id=f"mix2-{i}"))
    for handle in handles:
        result = handle.result(timeout=120)
        version = handle.record().version
        assert result.output == {"version": version}
        assert {v for _, v in _ran(rclient, handle.run_id)} == {version}, handle.run_id
