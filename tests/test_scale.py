"""Waiting is free: runs parked at a gate hold no message and no worker.

The suite parks a few hundred runs so it stays fast on CI; set ORCHESTRATOR_TEST_PARKED to
park more. The 10,000-run figure and Redis bytes per parked run come from
`bench/gates.py` (docs/benchmarks.md), which measures memory, not correctness.
"""

from __future__ import annotations

import os
from typing import Any

import redis

from orchestrator import RunStatus, WorkflowRunner
from tests import flows
from tests.conftest import Cluster, wait_for

PARKED = int(os.environ.get("ORCHESTRATOR_TEST_PARKED", "300"))


def test_runs_parked_at_a_gate_hold_no_message(cluster: Cluster, rclient: redis.Redis) -> None:
    runner = WorkflowRunner(flows.parked, app=cluster.app)
    handles = [runner.run(run_id=f"park{i}") for i in range(PARKED)]
    wait_for(lambda: rclient.scard("parked:gates") == PARKED, 60 + PARKED / 20, 0.5,
             what=f"{PARKED} runs to reach the gate")
    # No message anywhere: not queued, not reserved by a worker, not unacked. Redis drops
    # an emptied list, so outside the runs' own keys (their histories) a queue holding a
    # message is the only list there can be.
    lists = [k for k in rclient.scan_iter(count=1000) if rclient.type(k) == b"list"]
    assert [k for k in lists if not k.startswith(b"parked:")] == []
    assert rclient.hlen("unacked") == 0 and rclient.zcard("unacked_index") == 0
    active, reserved = wait_for(lambda: _inspect(cluster), 30, 0.2, what="inspect to answer")
    assert active is not None and len(active) == 3, "every worker and the coordinator answer"
    assert not any(active.values()) and not any((reserved or {}).values())
    assert all(h.status() is RunStatus.WAITING for h in handles[:: max(1, PARKED // 20)])
    sample = handles[PARKED // 2]
    sample.approve(by="ops-lead")
    assert sample.result(timeout=60).output == "released"
    assert rclient.scard("parked:gates") == PARKED - 1


def _inspect(cluster: Cluster) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """What every node is running and holds. A reply link can be cut under us (seen after
    a Redis restart earlier in the session): ask again rather than fail on the link."""
    inspect = cluster.app.control.inspect(timeout=2)
    try:
        return inspect.active(), inspect.reserved()
    except redis.ConnectionError:
        return None
