"""Child workflows: `Call(child, input, "Next")` on real workers, stop propagation, and a
child started once however often its start is repeated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from orchestrator import RunStatus, WorkflowRunner
from orchestrator import _engine as engine
from orchestrator._engine import child_run_id
from tests import flows
from tests.conftest import Cluster, wait_for


def _history(handle: Any, event: str) -> list[dict[str, Any]]:
    return [e for e in handle.history() if e["event"] == event]


def _child(cluster: Cluster, run_id: str) -> Any:
    return WorkflowRunner(flows.doubler, app=cluster.app).attach(run_id)


def test_a_childs_result_reaches_its_parent_and_both_name_each_other(
        cluster: Cluster) -> None:
    runner = WorkflowRunner(flows.parenting, app=cluster.app)
    for by_name in (False, True):  # a Workflow object, then a catalog name
        parent = runner.run({"x": 21, "by_name": by_name}, run_id=f"p{int(by_name)}")
        result = parent.result(timeout=60)
        assert result.status is RunStatus.COMPLETED, result.error
        kid = child_run_id(parent.run_id, 2)  # the call's token: the step ran as 1
        assert result.output == {"run_id": kid, "status": "completed", "state": {"seen": 21},
                                 "output": {"doubled": 42}}
        (called,) = _history(parent, "child_called")
        assert called["child"] == kid and called["workflow"] == "Doubler"
        child = _child(cluster, kid).record()
        assert child.parent is not None and child.parent.run_id == parent.run_id
        assert child.input == {"x": 21, "hold": False}
        # The child records that its parent heard just after telling it.
        wait_for(lambda k=kid: _child(cluster, k).record().parent.notified, 30,
                 what="the child to record that its parent heard")
        assert _history(parent, "child_ended")[0]["status"] == "completed"


def test_a_failed_child_fails_the_calling_step_unless_on_failure_routes_it(
        cluster: Cluster) -> None:
    runner = WorkflowRunner(flows.parenting, app=cluster.app)
    failed = runner.run({"x": -1}).result(timeout=60)
    assert failed.status is RunStatus.FAILED and failed.error is not None
    assert failed.error.type == "ChildFailed" and failed.error.step == "CallChild"
    assert "cannot double -1" in failed.error.message
    routed = runner.run({"x": -2}).result(timeout=60)
    assert routed.status is RunStatus.COMPLETED
    assert routed.output["status"] == "failed" and "cannot double -2" in routed.output[
        "error"]["message"]


def test_stopping_the_parent_stops_its_child_but_pausing_does_not_pause_it(
        cluster: Cluster, rclient: redis.Redis) -> None:
    runner = WorkflowRunner(flows.parenting, app=cluster.app)
    parent = runner.run({"x": 2, "hold": True}, run_id="stopper")
    kid = child_run_id("stopper", 2)
    wait_for(lambda: any(e["what"] == "child ran" for e in flows.events(rclient, kid)), 60,
             what="the child's step to run")
    assert parent.status() is RunStatus.WAITING
    parent.pause()
    assert _child(cluster, kid).status() is RunStatus.RUNNING
    parent.stop("changed my mind")
    wait_for(lambda: _child(cluster, kid).status() is RunStatus.STOPPED, 30,
             what="the child to stop with its parent")
    assert parent.status() is RunStatus.STOPPED
    stopped = [h for h in _child(cluster, kid).history() if h["event"] == "stopped"]
    assert "its parent stopper was stopped" in stopped[0]["reason"]
    rclient.set(f"t:{kid}:go", 1)  # free the worker; its late result is ignored


def test_a_repeated_start_of_the_child_starts_it_once(
        cluster_factory: Callable[..., Cluster], rclient: redis.Redis) -> None:
    """The parent's step commits the call, then its process dies before the child is
    created: a coordinator's sweep starts it. A start repeated after that (a duplicate, a
    second sweeper) finds the child's run id taken and starts nothing."""
    c = cluster_factory()
    c.coordinator("coord")
    runtime = c.app.runtime
    runtime.register(flows.doubler)
    parent = WorkflowRunner(flows.parenting, app=c.app).run({"x": 5, "hold": True},
                                                            run_id="again")
    children = runtime.children
    children.carry_out = lambda store, command: None  # type: ignore[method-assign]
    try:  # this process "dies" right after the commit: the child is never created
        assert runtime.execute("Parenting", "again", 1).status == "done"
    finally:
        del children.carry_out
    kid = child_run_id("again", 2)
    kids = runtime.store_for("kids:")
    assert parent.record().child is not None and kids.load(kid).record is None
    wait_for(lambda: kids.load(kid).record is not None, 30,
             what="the coordinator's sweep to start the child")
    assert _history(parent, "child_start_redriven")
    rec = parent.record()
    assert rec.child is not None
    start = engine.StartChild("again", rec.child.step, rec.child.token, kid, "Doubler",
                              "kids:", rec.child.input)
    created_at = kids.load(kid).record.created_at  # type: ignore[union-attr]
    for _ in range(3):  # duplicates of the start, from anywhere
        runtime.committer.send(runtime.store_for("shop:"), [start])
    assert kids.load(kid).record.created_at == created_at  # type: ignore[union-attr]
    assert kids.find_run_ids("again.") == [kid]
    c.worker("w1")
    rclient.set(f"t:{kid}:go", 1)
    result = parent.result(timeout=60)
    assert result.status is RunStatus.COMPLETED and result.output["output"] == {"doubled": 10}
    assert len([e for e in flows.events(rclient, kid) if e["what"] == "child ran"]) == 1


def test_a_stop_lost_with_its_process_is_sent_again_by_the_sweep(
        cluster_factory: Callable[..., Cluster], rclient: redis.Redis) -> None:
    """The parent's stop commits, then its process dies before the child is told: a
    coordinator's sweep stops the child, and the parent stops asking once it has ended."""
    c = cluster_factory()
    c.coordinator("coord")
    c.worker("w1", 2)
    parent = WorkflowRunner(flows.parenting, app=c.app).run({"x": 3, "hold": True},
                                                           run_id="lost-stop")
    kid = child_run_id("lost-stop", 2)
    wait_for(lambda: any(e["what"] == "child ran" for e in flows.events(rclient, kid)), 60,
             what="the child's step to run")
    children = c.app.runtime.children
    children.carry_out = lambda store, command: None  # type: ignore[method-assign]
    try:  # this process "dies" right after the stop's commit
        parent.stop("lost")
    finally:
        del children.carry_out
    assert [s.run_id for s in parent.record().stopping] == [kid]
    assert _child(c, kid).status() is RunStatus.RUNNING
    wait_for(lambda: _child(c, kid).status() is RunStatus.STOPPED, 30,
             what="the sweep to stop the child")
    assert _history(parent, "child_stop_redriven")
    wait_for(lambda: not parent.record().stopping, 30,
             what="the parent to see its child ended")
    assert parent.status() is RunStatus.STOPPED
    rclient.set(f"t:{kid}:go", 1)  # free the worker; its late result is ignored


def test_a_fork_fans_out_over_child_runs(cluster: Cluster) -> None:
    runner = WorkflowRunner(flows.fan_children, app=cluster.app)
    result = runner.run({"items": [1, 2, 3, 4]}, run_id="fan1").result(timeout=90)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.output["total"] == 20
    kids = result.output["children"]
    assert len(set(kids)) == 4 and all(k.startswith("fan1.2.") for k in kids)  # fork token 2
    store = cluster.app.runtime.store_for("kids:")
    assert sorted(store.find_run_ids("fan1.")) == sorted(kids)
    failed = runner.run({"items": [2, -1]}).result(timeout=90)
    assert failed.status is RunStatus.FAILED and failed.error is not None
    assert failed.error.type == "ChildFailed" and "cannot double -1" in failed.error.message
