"""Human approval gates through real Redis and real Celery workers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import pytest
import redis

from orchestrator import ControlError, RunStatus, WorkflowRunner
from tests import flows
from tests.conftest import ROOT, TEST_ENV, Cluster, queued, wait_for
from workers.deploy import build_and_deploy


def _history(handle: Any, event: str) -> list[dict[str, Any]]:
    return [e for e in handle.history() if e["event"] == event]


def _waiting(handle: Any) -> bool:
    return handle.status() is RunStatus.WAITING


def _decide_in_other_process(redis_url: str, run_id: str, verb: str, by: str, why: str) -> None:
    code = (
        "import sys\n"
        "from orchestrator import WorkflowRunner, create_app\n"
        "from workers.deploy import build_and_deploy\n"
        "handle = WorkflowRunner(build_and_deploy, app=create_app()).attach(sys.argv[1])\n"
        "getattr(handle, sys.argv[2])(sys.argv[3], sys.argv[4])\n"
    )
    env = {**os.environ, **TEST_ENV, "ORCHESTRATOR_REDIS_URL": redis_url,
           "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, run_id, verb, by, why], env=env, cwd=ROOT,
                   check=True, timeout=60)


def test_seed_approved_from_a_second_process(cluster: Cluster, redis_url: str,
                                             rclient: redis.Redis) -> None:
    runner = WorkflowRunner(build_and_deploy, app=cluster.app)
    handle = runner.run({"repo": "acme/app", "environment": "production"})
    wait_for(lambda: _waiting(handle), 60, what="the gate at Deploy")
    gate = handle.gate()
    assert gate is not None and gate.step == "Deploy" and gate.approvers == ["ops-lead"]
    assert gate.prompt == "Release out.tar of acme/app to production?"
    assert gate.payload == {"commit": handle.record().state["commit"]}
    assert [r.run_id for r in runner.pending_gates()] == [handle.run_id]
    assert [r.run_id for r in runner.pending_gates("ops-lead")] == [handle.run_id]
    assert runner.pending_gates("intern") == []
    # Waiting is free: no message anywhere, no worker busy.
    assert queued(rclient) == 0
    assert not any((cluster.app.control.inspect(timeout=1).active() or {}).values())

    _decide_in_other_process(redis_url, handle.run_id, "approve", "ops-lead", "ship it")
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.state["released"] is True
    assert result.output == {"released": "out.tar", "to": "production"}
    decision = result.step_results["Deploy"]
    assert decision["decision"] == "approved" and decision["by"] == "ops-lead"
    assert decision["comment"] == "ship it" and decision["at"] > 0
    assert _history(handle, "gate_approved")[0]["by"] == "ops-lead"
    assert runner.pending_gates() == []


def test_seed_rejected_from_a_second_process(cluster: Cluster, redis_url: str) -> None:
    runner = WorkflowRunner(build_and_deploy, app=cluster.app)
    handle = runner.run({"repo": "acme/app", "environment": "production"})
    wait_for(lambda: _waiting(handle), 60, what="the gate at Deploy")
    _decide_in_other_process(redis_url, handle.run_id, "reject", "ops-lead", "tests are flaky")
    result = handle.result(timeout=60)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and result.error.type == "GateRejected"
    assert "ops-lead" in result.error.message and "tests are flaky" in result.error.message
    assert result.state["released"] is False
    assert result.step_results["Deploy"]["decision"] == "rejected"
    assert result.step_results["Deploy"]["reason"] == "tests are flaky"


def test_only_listed_approvers_decide(cluster: Cluster) -> None:
    handle = WorkflowRunner(flows.gated, app=cluster.app).run({})
    wait_for(lambda: _waiting(handle), 60, what="the gate")
    before = handle.record()
    with pytest.raises(PermissionError, match="intern"):
        handle.approve(by="intern")
    with pytest.raises(PermissionError):
        handle.reject(by="intern", reason="no")
    assert handle.record() == before
    assert not _history(handle, "gate_approved")


def test_quorum_of_distinct_approvers(cluster: Cluster) -> None:
    handle = WorkflowRunner(flows.gated, app=cluster.app).run(
        {"approvers": ["ann", "bob", "cy"], "min_approvals": 2})
    wait_for(lambda: _waiting(handle), 60, what="the gate")
    handle.approve(by="ann", comment="fine")
    handle.approve(by="ann", comment="still fine")  # the same person twice counts once
    gate = handle.gate()
    assert gate is not None and [a.by for a in gate.approvals] == ["ann"]
    assert handle.status() is RunStatus.WAITING
    handle.approve(by="cy")
    result = handle.result(timeout=60)
    assert result.output == "released"
    approvals = result.step_results["Ask"]["approvals"]
    assert [a["by"] for a in approvals] == ["ann", "cy"]


def test_reject_goes_to_on_reject(cluster: Cluster) -> None:
    handle = WorkflowRunner(flows.gated, app=cluster.app).run({"on_reject": "Rejected"})
    wait_for(lambda: _waiting(handle), 60, what="the gate")
    handle.reject(by="ops-lead", reason="not today")
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED and result.output == "rejected"
    assert result.step_results["Ask"]["reason"] == "not today"


def test_timeout_goes_to_on_timeout(cluster: Cluster) -> None:
    handle = WorkflowRunner(flows.gated, app=cluster.app).run(
        {"timeout": 0.5, "on_timeout": "TimedOut"})
    result = handle.result(timeout=60)  # the coordinator's sweep fires the timer
    assert result.status is RunStatus.COMPLETED and result.output == "timed_out"
    assert result.step_results["Ask"]["decision"] == "timed_out"


def test_timeout_without_on_timeout_fails(cluster: Cluster) -> None:
    handle = WorkflowRunner(flows.gated, app=cluster.app).run({"timeout": 0.5})
    result = handle.result(timeout=60)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and result.error.type == "GateTimeout"
    with pytest.raises(ControlError, match="failed"):
        handle.approve(by="ops-lead")


def test_two_approvers_at_the_same_instant(cluster: Cluster, rclient: redis.Redis) -> None:
    runner = WorkflowRunner(flows.gated, app=cluster.app)
    for i in range(5):
        handle = runner.run({"approvers": ["ann", "bob"]}, run_id=f"race{i}")
        wait_for(lambda h=handle: _waiting(h), 60, what="the gate")
        barrier = threading.Barrier(2)
        outcomes: dict[str, str] = {}

        def decide(who: str, h: Any = handle, b: threading.Barrier = barrier,
                   out: dict[str, str] = outcomes) -> None:
            b.wait()
            try:
                h.approve(by=who)
                out[who] = "approved"
            except ControlError:
                out[who] = "too late"

        threads = [threading.Thread(target=decide, args=(w,)) for w in ("ann", "bob")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes.values()) == ["approved", "too late"]
        result = handle.result(timeout=60)
        assert result.output == "released"
        assert len(_history(handle, "gate_approved")) == 1
        winner = next(w for w, o in outcomes.items() if o == "approved")
        assert result.step_results["Ask"]["by"] == winner
        assert len(flows.events(rclient, handle.run_id)) == 1  # Release ran once


def test_approval_racing_the_timeout_has_one_outcome(cluster: Cluster,
                                                     rclient: redis.Redis) -> None:
    runner = WorkflowRunner(flows.gated, app=cluster.app)
    for i in range(6):
        handle = runner.run({"timeout": 0.3 + 0.1 * (i % 3), "on_timeout": "TimedOut"},
                            run_id=f"tr{i}")
        wait_for(lambda h=handle: _waiting(h) or h.status().is_terminal, 60, what="the gate")
        gate = handle.gate()
        if gate is not None and gate.timeout_at is not None:  # aim at the deadline
            wait_for(lambda g=gate: cluster.app.runtime.stores()[0].now()
                     >= g.timeout_at - 0.05, 10, 0.005, what="the deadline")
        try:
            handle.approve(by="ops-lead")
            accepted = True
        except ControlError:
            accepted = False
        result = handle.result(timeout=60)
        decided = _history(handle, "gate_approved") + _history(handle, "gate_timed_out")
        assert len(decided) == 1, decided
        # One winner, and everything agrees on who: the caller's answer, the history and
        # the branch that ran (the approval must not be accepted and then lose).
        expected = ("gate_approved", "released") if accepted else ("gate_timed_out", "timed_out")
        assert (decided[0]["event"], result.output) == expected, (decided, result.output)
        assert [e["step"] for e in flows.events(rclient, handle.run_id)] == [
            "Release" if accepted else "TimedOut"]


def test_approval_for_a_stopped_run_is_refused(cluster: Cluster) -> None:
    runner = WorkflowRunner(flows.gated, app=cluster.app)
    handle = runner.run({})
    wait_for(lambda: _waiting(handle), 60, what="the gate")
    handle.stop()
    with pytest.raises(ControlError, match="stopped"):
        handle.approve(by="ops-lead")
    assert handle.status() is RunStatus.STOPPED
    assert not _history(handle, "gate_approved")
    assert runner.pending_gates() == []


def test_approved_while_paused_continues_after_resume(cluster: Cluster,
                                                      rclient: redis.Redis) -> None:
    handle = WorkflowRunner(flows.gated, app=cluster.app).run({})
    wait_for(lambda: _waiting(handle), 60, what="the gate")
    handle.pause()
    handle.approve(by="ops-lead")
    rec = handle.record()
    assert rec.status is RunStatus.PAUSED and rec.gate is None
    assert rec.task is not None and rec.task.step == "Release" and rec.task.dispatched_at is None
    assert queued(rclient) == 0
    handle.resume()
    assert handle.result(timeout=60).output == "released"


def test_gate_in_embedded_mode() -> None:
    runner = WorkflowRunner(build_and_deploy)
    handle = runner.run({"repo": "acme/web", "environment": "production"})
    wait_for(lambda: _waiting(handle), 30, what="the gate")
    handle.approve(by="ops-lead")
    assert handle.result(timeout=30).output == {"released": "out.tar", "to": "production"}
