"""Parallel branches as Celery chords, through real Redis and real workers."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import redis

from orchestrator import RunStatus, WorkflowRunner
from orchestrator._config import DEFAULT_QUEUE
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


def test_lost_chord_body_is_redriven_by_the_sweep(cluster_factory: Callable[..., Cluster],
                                                  rclient: redis.Redis) -> None:
    c = cluster_factory()
    c.worker("w1", 2, "-Q", DEFAULT_QUEUE)  # nobody consumes Gather's queue yet
    handle = WorkflowRunner(flows.fan_out_far_gather, app=c.app).run({"width": 4},
                                                                     run_id="lj1")
    gather = step_queue(flows.fan_out_far_gather, flows.GATHER_QUEUE)
    wait_for(lambda: rclient.llen(gather) == 1, 60,
             what="the chord's body: Gather, told to join first")
    rec = handle.record()
    assert rec.fork is not None and rec.status is RunStatus.RUNNING
    rclient.delete(gather)  # the body is lost: nothing will join the fork
    c.coordinator("coord")
    c.worker("w2", 1, "-Q", flows.GATHER_QUEUE)
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED
    assert result.output == [1, 2, 5, 10]
    assert len(_history(handle, "join_redriven")) == 1
    assert len(_history(handle, "joined")) == 1


def test_fan_outs_join_with_no_coordinator(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory()
    c.worker("w1", 2)  # the chord's body is Gather itself: it joins, then runs, on a worker
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
