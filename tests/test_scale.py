"""Waiting is free: thousands of runs parked at a gate hold no message and no worker."""

from __future__ import annotations

import os

import redis

from orchestrator import RunStatus, WorkflowRunner
from tests import flows
from tests.conftest import Cluster, wait_for

PARKED = int(os.environ.get("ORCHESTRATOR_TEST_PARKED", "10000"))


def test_ten_thousand_runs_parked_at_a_gate(cluster: Cluster, rclient: redis.Redis) -> None:
    runner = WorkflowRunner(flows.parked, app=cluster.app)
    baseline = rclient.info("memory")["used_memory"]
    handles = [runner.run(run_id=f"park{i}") for i in range(PARKED)]
    wait_for(lambda: rclient.scard("parked:gates") == PARKED, 600, 0.5,
             what=f"{PARKED} runs to reach the gate")
    # No message anywhere: not queued, not reserved by a worker, not unacked.
    queues = [k for k in rclient.keys("orchestrator*") if rclient.type(k) == b"list"]
    assert [q for q in queues if rclient.llen(q)] == []
    assert rclient.hlen("unacked") == 0
    inspect = cluster.app.control.inspect(timeout=2)
    assert not any((inspect.active() or {}).values())
    assert not any((inspect.reserved() or {}).values())
    per_run = (rclient.info("memory")["used_memory"] - baseline) / PARKED
    print(f"\n{PARKED} runs parked at a gate: {per_run:.0f} bytes of Redis memory per run")
    sample = handles[PARKED // 2]
    assert sample.status() is RunStatus.WAITING
    sample.approve(by="ops-lead")
    assert sample.result(timeout=60).output == "released"
    assert rclient.scard("parked:gates") == PARKED - 1
