"""Prometheus metrics: a prefork worker and a coordinator serving `--metrics-port`.

The worker's steps run in two pool processes; what it serves must add both up. The
coordinator serves the cluster's run counts and waits, read from Redis, including the runs
this test starts and stops itself (an app, like any other, that serves no metrics).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import MemoryStore, RunStatus, Settings, StoreUnavailable, WorkflowRunner
from orchestrator._metrics import PROCESS_METRICS, MetricsMiddleware
from orchestrator._metrics_cluster import ClusterCollector
from orchestrator._records import RunRecord, Task
from tests import flows
from tests.conftest import ROOT, TEST_ENV, Cluster, free_port, wait_for

README = (ROOT / "README.md").read_text()
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def steps(samples: Samples, workflow: str, step: str, branch: str = "") -> float:
    return value(samples, "orchestrator_step_duration_seconds_count", workflow=workflow,
                 step=step, branch=branch)


def defined_names() -> set[str]:
    """Every sample family the code can expose, as PromQL names it (counters with _total)."""
    families = [f for m in PROCESS_METRICS for f in m.describe()]
    families += list(ClusterCollector(None).describe())  # type: ignore[arg-type]
    return {f.name + ("_total" if f.type == "counter" else "") for f in families}


HISTOGRAMS = {f.name for m in PROCESS_METRICS for f in m.describe() if f.type == "histogram"}


def exposed_name(sample: str) -> str:
    """A sample's family as `defined_names` lists it (a histogram's _bucket, _count, _sum)."""
    base = re.sub(r"_(bucket|count|sum)$", "", sample)
    return base if base in HISTOGRAMS else sample


def test_a_prefork_worker_and_a_coordinator_serve_what_happened(
        cluster_factory: Callable[..., Cluster], rclient: redis.Redis) -> None:
    worker_port, coordinator_port = free_port(), free_port()
    cluster = cluster_factory()
    cluster.coordinator("coord", "--metrics-port", str(coordinator_port))
    worker_process = cluster.worker("w1", 2, "--metrics-port", str(worker_port))
    found = re.search(r"process samples in (\S+)\)", worker_process.log.read_text())
    assert found, worker_process.tail()
    samples_dir = Path(found[1])

    def run(wf: Any, data: dict[str, Any]) -> Any:
        return WorkflowRunner(wf, app=cluster.app).run(data)

    # Two runs parked in their first step at once: one in each pool process.
    held = [run(flows.three_steps, {}) for _ in range(2)]

    def in_first_step() -> set[int] | None:  # the pool processes running them
        notes = [flows.events(rclient, h.run_id) for h in held]
        return {n[0]["pid"] for n in notes} if all(notes) else None

    pids = wait_for(in_first_step, 30, what="both runs in their first step")
    assert len(pids) == 2  # steps run in two processes, which the worker adds up below
    for h in held:
        rclient.set(f"t:{h.run_id}:release", 1)
    doomed, fan = run(flows.doomed, {}), run(flows.fan_out, {"width": 3})
    gated, shop = run(flows.gated, {}), run(flows.shop, {})
    for h in held:
        assert h.result(timeout=30).status is RunStatus.COMPLETED
    assert doomed.result(timeout=30).status is RunStatus.FAILED
    assert fan.result(timeout=30).status is RunStatus.COMPLETED
    wait_for(lambda: gated.status() is RunStatus.WAITING and shop.status() is RunStatus.WAITING,
             30, what="a run at its gate and one waiting for an event")

    # A step is counted before its outcome is committed: these are all in by now.
    worker = scrape(worker_port)
    for step in ("A", "B", "C"):
        assert steps(worker, "ThreeSteps", step) == 2
    assert steps(worker, "Doomed", "__start__") == 1
    assert value(worker, "orchestrator_step_failures_total", workflow="Doomed",
                 step="__start__", branch="") == 1
    assert steps(worker, "FanOut", "Fan") == steps(worker, "FanOut", "Gather") == 1
    assert steps(worker, "FanOut", "Fan", "square") == 3  # square[0..2]: one series
    assert steps(worker, "Gated", "Ask") == 1
    assert steps(worker, "Shop", "__start__") == steps(worker, "Shop", "AwaitPayment") == 1
    assert sum(v for (name, _), v in worker.items()
               if name == "orchestrator_step_duration_seconds_count") == 6 + 1 + 5 + 1 + 2

    coordinator = scrape(coordinator_port)
    assert value(coordinator, "orchestrator_store_up") == 1
    for wf, n in (("ThreeSteps", 2), ("Doomed", 1), ("FanOut", 1), ("Gated", 1), ("Shop", 1)):
        assert value(coordinator, "orchestrator_runs_started_total", workflow=wf) == n
    assert value(coordinator, "orchestrator_runs_completed_total", workflow="ThreeSteps") == 2
    assert value(coordinator, "orchestrator_runs_completed_total", workflow="FanOut") == 1
    assert value(coordinator, "orchestrator_runs_failed_total", workflow="Doomed") == 1
    assert value(coordinator, "orchestrator_runs_waiting", workflow="Gated", wait="gate") == 1
    assert value(coordinator, "orchestrator_runs_waiting", workflow="Shop", wait="event") == 1
    assert value(coordinator, "orchestrator_runs_waiting", workflow="Gated", wait="event") == 0
    assert value(coordinator, "orchestrator_runs_waiting_oldest_seconds", workflow="Gated",
                 wait="gate") > 0
    assert value(coordinator, "orchestrator_runs", workflow="Gated", status="waiting") == 1
    assert value(coordinator, "orchestrator_timers_overdue") == 0

    shop.stop()  # committed by this process, before stop() returns
    after = scrape(coordinator_port)
    assert value(after, "orchestrator_runs_stopped_total", workflow="Shop") == 1
    assert value(after, "orchestrator_runs_waiting", workflow="Shop", wait="event") == 0
    assert value(after, "orchestrator_runs_waiting", workflow="Gated", wait="gate") == 1

    # Each pool process wrote its own files; the worker removes them all when it exits.
    assert pids <= {int(f.stem.split("_")[-1]) for f in samples_dir.glob("histogram_*.db")}
    worker_process.terminate()
    assert not samples_dir.exists()

    # Counts of runs are the cluster's (the coordinator's); a worker serves its own.
    assert not [k for k in worker if k[0].startswith("orchestrator_runs")]
    served = {exposed_name(name) for name, _ in {**worker, **after}
              if name.startswith("orchestrator_")}
    assert served <= defined_names()



def test_the_middleware_counts_retries_recovery_timers_and_ignored_completions() -> None:
    """The entries only a fault or a timer produces, counted as a commit reports them."""
    before = _sampled()
    rec = RunRecord(run_id="r", workflow="Unit", version="1", status=RunStatus.RUNNING,
                    input={}, state={}, created_at=0.0, updated_at=0.0)
    m = MetricsMiddleware()
    m.after_commit(rec, rec, [
        {"event": "step_retrying", "step": "Fan[square[4]]", "attempt": 2},
        {"event": "step_retrying", "step": "Work", "attempt": 2},
        {"event": "step_redispatched", "step": "Work"},
        {"event": "join_redriven", "step": "Fan"},
        {"event": "child_start_redriven", "step": "Call"},
        {"event": "timer_fired", "step": "Nap", "late": 0.3},
        {"event": "step_completed", "step": "Work"},  # counted by the worker's after_step
    ])
    m.on_ignored("r", "StepDone", "token 3 is not the current task")
    m.after_step(rec, Task(step="Fan", token=1, branch="square[2]"), True, 0.5)
    changed = {k: v - before.get(k, 0.0) for k, v in _sampled().items()
               if v != before.get(k, 0.0)}
    assert changed == {
        ("orchestrator_step_retries_total", "Unit", "Fan", "square"): 1,
        ("orchestrator_step_retries_total", "Unit", "Work", ""): 1,
        ("orchestrator_sweep_redispatches_total", "Unit"): 1,
        ("orchestrator_sweep_repairs_total", "Unit", "join"): 1,
        ("orchestrator_sweep_repairs_total", "Unit", "child_start"): 1,
        ("orchestrator_timer_lateness_seconds_count", "Unit"): 1,
        ("orchestrator_timer_lateness_seconds_sum", "Unit"): 0.3,
        ("orchestrator_ignored_completions_total", "StepDone"): 1,
        ("orchestrator_step_failures_total", "Unit", "Fan", "square"): 1,
        ("orchestrator_step_duration_seconds_count", "Unit", "Fan", "square"): 1,
        ("orchestrator_step_duration_seconds_sum", "Unit", "Fan", "square"): 0.5,
    }


def _sampled() -> dict[tuple[str, ...], float]:
    """This process's samples of the process metrics, bucket series left out."""
    return {(s.name, *s.labels.values()): s.value for m in PROCESS_METRICS
            for family in m.collect() for s in family.samples
            if not s.name.endswith(("_bucket", "_created"))}


def test_a_scrape_while_redis_is_down_says_so(redis_url: str) -> None:
    class Down(MemoryStore):
        def now(self) -> float:
            raise StoreUnavailable("Redis at redis://nowhere is unreachable")

    store = Down()
    runtime = SimpleNamespace(workflows={"Gated": flows.gated}, settings=Settings(),
                              store_for=lambda prefix: store, stores=lambda: [store])
    families = list(ClusterCollector(runtime).collect())  # type: ignore[arg-type]
    assert [(s.name, s.value) for f in families for s in f.samples] == [
        ("orchestrator_store_up", 0)]


def test_a_metrics_port_in_use_is_a_usage_error(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "coordinator", "--metrics-port",
             str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**os.environ, **TEST_ENV, "ORCHESTRATOR_REDIS_URL": redis_url,
                 "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr


def test_the_readme_and_the_dashboard_name_every_metric_and_only_those() -> None:
    section = README.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(orchestrator_[a-z_]+)`", section, re.MULTILINE))
    assert documented == defined_names()
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"]
                                       if p["type"] != "row")
    used = {exposed_name(n) for n in re.findall(r"\borchestrator_[a-z_]+", DASHBOARD.read_text())}
    assert used == defined_names()
