"""Agents: a step opens them, the runtime closes what the step left open."""

from __future__ import annotations

import pytest
import redis

from orchestrator import RunStatus, WorkflowRunner
from tests import flows
from tests.conftest import Cluster


@pytest.mark.parametrize("mode", ["embedded", "distributed"])
def test_runtime_closes_agents_a_step_left_open(mode: str, request: pytest.FixtureRequest,
                                                redis_url: str, rclient: redis.Redis,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_REDIS_URL", redis_url)
    if mode == "embedded":
        runner = WorkflowRunner(flows.with_agents)
    else:
        cluster: Cluster = request.getfixturevalue("cluster")
        runner = WorkflowRunner(flows.with_agents, app=cluster.app)
    handle = runner.run(run_id=f"ag-{mode}")
    result = handle.result(timeout=60)
    # The last step raised with its agent open: the run fails with that error...
    assert result.status is RunStatus.FAILED
    assert result.error is not None and "crashed with an agent open" in result.error.message
    assert result.step_results["Polite"] == {"approved": True, "problems": [], "by": "polite"}
    assert result.step_results["Sloppy"]["problems"] == ["TODO"]
    # ...and every agent was closed exactly once, by its step or by the runtime.
    closed = [c.decode() for c in rclient.lrange(f"t:{handle.run_id}:closed", 0, -1)]
    assert sorted(closed) == ["crashy", "polite", "sloppy"]
    forced = [e for e in handle.history() if e["event"] == "agent_closed_by_runtime"]
    assert [(e["step"], e["agent"]) for e in forced] == [("Sloppy", "reviewer"),
                                                         ("Crashy", "reviewer")]
