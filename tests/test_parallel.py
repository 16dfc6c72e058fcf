"""Parallel branches (a Celery group joined by the store), through real Redis and real
workers."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import redis

from orchestrator import RunStatus, WorkflowRunner
from orchestrator._config import DEFAULT_QUEUE
from orchestrator._dispatch.base import Dispatcher
from orchestrator._records import BranchResult
from orchestrator._runtime import Runtime
from tests import flows
from tests.conftest import Cluster, Runner, step_queue, wait_for


def _history(handle: Any, event: str) -> list[dict[str, Any]]:
    return [e for e in handle.history() if e["event"] == event]


def test_three_way_fan_out_merges_branch_state(make_runner: Runner) -> None:
    result = make_runner(flows.three_way).run().result(timeout=60)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.step_results["linux"] == "L" and result.step_results["mac"] == "M"
    assert result.step_results["win"] == {"os": "win"}
    assert result.state["linux"] == "linux-7"  # the branch saw the state at the fork
    assert result.state["mac"] == "mac"
    assert sorted(result.state["logs"]) == ["linux built", "mac built"]  # the reducer
    assert result.output == ["linux", "mac", "win"]


@pytest.mark.parametrize("width", [3, 50])
def test_map_fan_out_keeps_input_order(make_runner: Runner, width: int) -> None:
    result = make_runner(flows.fan_out).run({"width": width}).result(timeout=120)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.output == [i * i + 1 for i in range(width)]


def test_two_branches_writing_one_key_fail_naming_both(make_runner: Runner) -> None:
    result = make_runner(flows.conflict).run().result(timeout=60)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and result.error.type == "StateConflict"
    assert "'shared'" in result.error.message
    assert "left" in result.error.message and "right" in result.error.message


def test_parallel_in_a_loop_and_a_later_parallel(make_runner: Runner) -> None:
    result = make_runner(flows.fork_in_loop).run().result(timeout=120)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.output == {"rounds": 3, "logs": 6, "squares": [9, 16]}


def test_failing_branch_fails_run_and_revokes_siblings(cluster: Cluster,
                                                       rclient: redis.Redis) -> None:
    handle = WorkflowRunner(flows.failing_branch, app=cluster.app).run(run_id="fb1")
    result = handle.result(timeout=60)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and result.error.step == "Fork[broken]"
    assert "the mac builder is on fire" in result.error.message
    assert result.error.traceback and "RuntimeError" in result.error.traceback
    wait_for(lambda: re.search(r"Terminating fb1:\d+:slow:1", cluster.logs()), 30,
             what="the worker to terminate the sibling")
    rclient.set("t:fb1:release", 1)  # a sibling still running would now finish
    wait_for(lambda: not rclient.keys("orchestrator:run:{fb1}:lease:*"), 30,
             what="the revoked sibling's lease to lapse")
    assert [e for e in flows.events(rclient, "fb1") if e["what"] == "finished"] == []


class _Taken(Dispatcher):
    """What a worker that dies right after its commits would have sent: kept, not sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, commands: Any) -> None:
        self.sent.extend(commands)


def _forked_unjoined(c: Cluster, run_id: str) -> Any:
    """A run of fan_out_far_gather whose branches all kept their results and whose fork
    nobody joined: this test's process plays the workers, and the one that keeps the last
    result dies before it joins."""
    wf = flows.fan_out_far_gather
    handle = WorkflowRunner(wf, app=c.app).run({"width": 4}, run_id=run_id)
    redis.Redis.from_url(c.redis_url).delete(step_queue(wf))  # this process takes Fan
    dying = Runtime(_Taken(), c.settings, [wf])
    store = dying.store_for(wf.persistence_options.key_prefix)
    dying.execute(wf.name, run_id, handle.record().task.token)
    fork = dying.dispatcher.sent.pop()  # type: ignore[attr-defined]
    *first, last = fork.tasks
    for task in first:  # recorded, and not the last: nobody joins yet
        assert dying.execute(wf.name, run_id, task.token, task.branch).status == "done"
    kept = store.record_branch(
        run_id, last.token, last.branch, BranchResult(output=last.item ** 2 + 1,
                                                      finished_at=store.now()),
        {"at": store.now(), "event": "branch_completed", "step": "Fan", "branch": last.branch},
        last.lease_id, len(fork.tasks), store.now() + c.settings.join_after)
    assert kept == len(fork.tasks) and handle.record().fork is not None
    return handle


def test_a_join_lost_with_the_last_branchs_worker_is_redriven_by_the_sweep(
        cluster_factory: Callable[..., Cluster]) -> None:
    """The branch that keeps the last result joins the fork; its worker dies between the
    two (the result is kept, the join never made): the sweep joins it after join_after."""
    c = cluster_factory()
    handle = _forked_unjoined(c, "lj1")
    c.coordinator("coord")
    c.worker("w1", 2, "-Q", f"{DEFAULT_QUEUE},{flows.GATHER_QUEUE}")
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED
    assert result.output == [1, 2, 5, 10]
    assert len(_history(handle, "join_redriven")) == 1
    assert len(_history(handle, "joined")) == 1


def test_a_chord_body_sent_by_an_older_version_joins_and_runs_the_step(
        cluster_factory: Callable[..., Cluster]) -> None:
    """Forks used to go out as Celery chords whose body was the step after the fork, told
    to join first; a run forked then and upgraded in flight still completes through it."""
    c = cluster_factory()
    handle = _forked_unjoined(c, "lj2")
    fork = handle.record().fork
    c.app.send_task(f"{flows.fan_out_far_gather.name}.Gather", args=("lj2", fork.then_token),
                    kwargs={"join": fork.token}, ignore_result=True,
                    queue=step_queue(flows.fan_out_far_gather, flows.GATHER_QUEUE))
    c.worker("w1", 1, "-Q", flows.GATHER_QUEUE)  # no coordinator: the body joins
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED and result.output == [1, 2, 5, 10]
    assert len(_history(handle, "joined")) == 1
    assert _history(handle, "join_redriven") == []


def test_fan_outs_join_with_no_coordinator(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory()
    c.worker("w1", 2)  # the branch that keeps the last result joins, on a worker
    handle = WorkflowRunner(flows.fan_out, app=c.app).run({"width": 3}, run_id="cb1")
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED and result.output == [1, 2, 5]
    joined = _history(handle, "joined")
    assert len(joined) == 1 and joined[0]["next"] == "Gather"


def test_branches_fan_out_again_when_run_and_as_written(make_runner: Runner) -> None:
    handle = make_runner(flows.nested).run()
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.output == {
        # linux ran, set state, and fanned out over data: its branches saw what it set
        "linux": {"build_arch": ["x86-fanned-7", "arm-fanned-7"]},
        "mac": "M",
        # win was a Parallel in the definition: flattened at the fork, no task of its own
        "win": {"x64": "win/x64", "arm64": "win/arm64"},
    }
    assert result.state["linux"] == "fanned" and result.state["mac"] == "mac"
    assert sorted(result.state["logs"]) == ["arm built", "mac built", "x86 built"]
    forked = _history(handle, "branch_forked")
    assert [(e["branch"], e["branches"]) for e in forked] == [
        ("linux", ["linux/build_arch[0]", "linux/build_arch[1]"])]
    assert len(_history(handle, "joined")) == 1


def test_a_failing_nested_branch_fails_the_run_and_revokes_the_rest(
        cluster: Cluster, rclient: redis.Redis) -> None:
    handle = WorkflowRunner(flows.nested_failing, app=cluster.app).run(run_id="nf1")
    result = handle.result(timeout=60)
    assert result.status is RunStatus.FAILED
    assert result.error is not None
    assert result.error.step == "Fork[outer/broken_after_sibling]"
    assert "the mac builder is on fire" in result.error.message
    # The revoke is a broadcast the worker acts on when it reads it: release the sibling
    # only once it has, or a sibling still running would finish for the wrong reason.
    wait_for(lambda: re.search(r"Terminating nf1:\d+:outer/slow_sibling", cluster.logs()), 30,
             what="the worker to terminate the nested sibling")
    rclient.set("t:nf1:release", 1)  # the nested sibling, were it still running, would finish
    wait_for(lambda: not rclient.keys("orchestrator:run:{nf1}:lease:*"), 30,
             what="the revoked nested sibling's lease to lapse")
    assert [e for e in flows.events(rclient, "nf1") if e["what"] == "finished"] == []


def test_a_nested_parallel_may_not_name_a_then(make_runner: Runner) -> None:
    result = make_runner(flows.nested_with_then).run().result(timeout=60)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and result.error.step == "Fork[nests_with_then]"
    assert "gathers into the branch itself" in result.error.message
