"""Workflows end to end, in both modes: embedded (threads, memory store) and distributed
(real Redis, real Celery worker subprocesses)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis
from pydantic import BaseModel, ValidationError

from orchestrator import (
    END,
    START,
    Next,
    RunStatus,
    RunStore,
    Settings,
    StoreUnavailable,
    Workflow,
    WorkflowRunner,
)
from orchestrator._celery import create_app
from orchestrator._dispatch.base import Dispatcher
from orchestrator._runtime import Runtime
from orchestrator._stores import RedisStore
from tests import flows
from tests.conftest import Cluster, Runner, queued, wait_for
from workers.deploy import build_and_deploy


def test_build_and_deploy_completes(make_runner: Runner) -> None:
    handle = make_runner(build_and_deploy).run({"repo": "acme/app"})
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.state == {"commit": result.state["commit"], "artifact": "out.tar",
                            "released": True}
    assert result.state["commit"] and len(result.state["commit"]) == 7
    assert result.step_results["Clone"] == {"repo": "acme/app", "commit": result.state["commit"]}
    assert result.step_results["build_mac"] == {"platform": "mac", "binary": "app-mac"}
    assert result.step_results["Bundle"]["contains"] == ["app-linux", "app-mac", "app-win"]
    assert result.output == {"released": "out.tar", "to": "staging"}  # staging: no gate
    steps = [e["step"] for e in handle.history() if e["event"] == "step_completed"]
    assert steps == ["__start__", "Clone", "Build", "Bundle", "Test", "Deploy", "Release"]


def test_loop_of_200_iterations(make_runner: Runner) -> None:
    handle = make_runner(flows.loop).run({"times": 200})
    result = handle.result(timeout=120)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.state == {"n": 200}
    ticks = [e for e in handle.history() if e["event"] == "step_completed" and e["step"] == "Tick"]
    assert len(ticks) == 200


def test_branching_on_input_takes_different_paths(make_runner: Runner) -> None:
    runner = make_runner(flows.branching)
    big, small = runner.run({"value": 50}), runner.run({"value": 3})
    big_result, small_result = big.result(timeout=60), small.result(timeout=60)
    assert big_result.output == "big" and "Big" in big_result.step_results
    assert small_result.output == "small" and "Small" in small_result.step_results
    assert "Small" not in big_result.step_results and "Big" not in small_result.step_results


def test_imperative_checkpoints_persist_as_they_happen(
        make_runner: Runner, rclient: redis.Redis) -> None:
    runner = make_runner(flows.imperative)
    rclient.set("t:imp1:hold", 1)
    handle = runner.run(run_id="imp1")
    # Mid-body, the first two checkpoints are already in the store.
    from tests.conftest import wait_for

    wait_for(lambda: rclient.llen("t:imp1:checkpoints") >= 2, what="two checkpoints")
    assert handle.record().state == {"done": ["fetch", "transform"]}
    assert handle.status() is RunStatus.RUNNING
    rclient.set("t:imp1:release", 1)
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED
    assert result.output == {"parts": 3}
    assert result.state == {"done": ["fetch", "transform", "load"]}


def test_same_run_id_starts_one_run(make_runner: Runner) -> None:
    runner = make_runner(flows.branching)
    first = runner.run({"value": 50}, run_id="dedupe-1")
    second = runner.run({"value": 3}, run_id="dedupe-1")
    assert first.run_id == second.run_id
    result = second.result(timeout=60)
    assert result.output == "big"  # the second start changed nothing
    starts = [e for e in second.history() if e["event"] == "started"]
    assert len(starts) == 1


# ---- bad input -------------------------------------------------------------------------


def _keys(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    return [k for k in client.keys("*") if not k.startswith(b"_kombu")]


def test_invalid_input_raises_and_creates_nothing(make_runner: Runner, redis_url: str) -> None:
    runner = make_runner(build_and_deploy)
    before, runs_before = _keys(redis_url), len(runner.store.list_runs(limit=10**6))
    with pytest.raises(ValidationError) as info:
        runner.run({"repository": "acme/app"})
    assert "repo" in str(info.value)
    assert _keys(redis_url) == before
    assert len(runner.store.list_runs(limit=10**6)) == runs_before


def test_unknown_step_name_fails_naming_valid_steps(make_runner: Runner) -> None:
    result = make_runner(flows.bad_transition).run().result(timeout=60)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and result.error.type == "UnknownStep"
    assert "'Nowhere'" in result.error.message
    assert "Go" in result.error.message and "Elsewhere" in result.error.message
    assert result.error.step == "Go"


def test_invalid_state_change_fails_with_validation_error(make_runner: Runner) -> None:
    result = make_runner(flows.bad_state).run().result(timeout=60)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and result.error.type == "ValidationError"
    assert "n" in result.error.message and result.error.step == "Set"
    assert result.state == {"n": 0}  # a failed step commits none of its changes


def test_non_json_output_fails_clearly(make_runner: Runner) -> None:
    result = make_runner(flows.bad_output).run().result(timeout=60)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and "not JSON-serializable" in result.error.message
    assert result.error.type == "InvalidStepResult"


def test_redis_unreachable_at_run_is_a_clear_error(
        local_runtimes: Callable[[RunStore], Runtime]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = RedisStore(f"redis://:secret@127.0.0.1:{port}/0")
    runner = WorkflowRunner(flows.branching, runtime=local_runtimes(store))
    with pytest.raises(StoreUnavailable) as info:
        runner.run({"value": 1})
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "secret" not in str(info.value)


def test_distributed_bad_input_sends_no_message(cluster: Cluster, redis_url: str) -> None:
    app = create_app(cluster.settings)
    runner = WorkflowRunner(build_and_deploy, app=app)
    client = redis.Redis.from_url(redis_url)
    with pytest.raises(ValidationError):
        runner.run({"repo": 42})
    assert queued(client) == 0


def test_start_given_as_a_name_costs_no_task(make_runner: Runner) -> None:
    handle = make_runner(flows.branching).run({"value": 1})
    assert handle.result(timeout=60).output == "small"
    history = handle.history()
    assert [e["step"] for e in history if e["event"] == "step_completed"] == ["Check", "Small"]
    assert [(e["step"], e["next"]) for e in history if e["event"] == "routed"] == [
        ("__start__", "Check")]


def test_in_memory_persistence_cannot_run_on_a_cluster(cluster: Cluster) -> None:
    from orchestrator import DefinitionError

    in_memory = flows.branching.persistence(store="memory")
    with pytest.raises(DefinitionError, match="only run embedded"):
        WorkflowRunner(in_memory, app=cluster.app)
    assert WorkflowRunner(in_memory).run({"value": 1}).result(timeout=30).output == "small"


def test_payload_limit_is_a_clear_error(make_runner: Runner) -> None:
    runner = make_runner(flows.blob)
    result = runner.run({"size": 2 * 1024 * 1024}).result(timeout=60)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and "over the 1048576-byte limit" in result.error.message
    assert runner.run({"size": 10}).result(timeout=60).output == "x" * 10


def test_oversized_input_is_refused_before_anything_is_written(
        redis_url: str, local_runtimes: Callable[[RunStore], Runtime]) -> None:
    class Text(BaseModel):
        text: str

    echo = Workflow("Echo").input(Text).flow({START: lambda ctx: Next(END, ctx.input.text)})
    runner = WorkflowRunner(echo, runtime=local_runtimes(RedisStore(redis_url)))
    with pytest.raises(ValueError, match="ORCHESTRATOR_MAX_PAYLOAD"):
        runner.run({"text": "x" * (2 * 1024 * 1024)})
    assert runner.store.list_runs() == []
    assert runner.run({"text": "hi"}).result(timeout=30).output == "hi"


class _Recorder(Dispatcher):
    """Sends nothing: keeps the commands, so a test plays the lost message."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, commands: Sequence[Any]) -> None:
        self.sent.extend(commands)


def test_a_sweep_leaves_runs_of_workflows_it_does_not_host_to_who_does(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, redispatch_after=0.001)
    store = RedisStore(redis_url)
    host, other = _Recorder(), _Recorder()
    hosting = Runtime(host, settings, [flows.branching], store_factory=lambda p: store)
    foreign = Runtime(other, settings, [flows.blob], store_factory=lambda p: store)
    run_id, _ = hosting.start(flows.branching, {"value": 1})  # its message is "lost"
    (due_before,) = [s for _, s in store.redis.zrange("orchestrator:due", 0, -1,
                                                      withscores=True)]
    wait_for(lambda: store.now() > due_before, 5, 0.001, what="the run's timer to be due")
    assert foreign.sweep(store) == 0 and other.sent == []
    # The claim is given back: the due time is what it was, not pushed a hold ahead.
    assert store.redis.zscore("orchestrator:due", run_id) == due_before
    assert hosting.sweep(store) == 1
    assert [c.task.attempt for c in host.sent] == [1, 2]  # the start, then the re-send


def test_result_raises_run_failed_when_asked() -> None:
    from orchestrator import RunFailed

    def boom(ctx: object) -> str:
        raise RuntimeError("kaput")

    wf = Workflow("Boom", "fails").flow({START: boom})
    handle = WorkflowRunner(wf).run({})
    assert handle.result(timeout=30).status is RunStatus.FAILED  # the default returns it
    with pytest.raises(RunFailed, match="kaput") as caught:
        handle.result(timeout=30, raise_on_failure=True)
    error = caught.value.result.error
    assert error is not None and error.type == "RuntimeError"
