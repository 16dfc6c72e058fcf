"""Control and faults with real processes: pause, stop, duplicates, SIGKILLed workers and
coordinators, a coordinator that dies between committing and dispatching."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from orchestrator import RunStatus, WorkflowRunner
from orchestrator._dispatch.base import step_task_name
from orchestrator._engine import GoTo, StepDone
from orchestrator._stores import RedisStore
from tests import flows
from tests.conftest import ROOT, TEST_ENV, Cluster, queued, step_queue, wait_for


def _events(client: redis.Redis, run_id: str, what: str, step: str | None = None) -> list[Any]:
    return [e for e in flows.events(client, run_id)
            if e["what"] == what and (step is None or e["step"] == step)]


def _history(handle: Any, event: str, step: str | None = None) -> list[dict[str, Any]]:
    return [e for e in handle.history() if e["event"] == event
            and (step is None or e.get("step") == step)]


def _parent_pid(pid: int) -> int:
    """The parent of a live process, from /proc (Linux, as CI runs)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("PPid:")))


def _queue_empty(client: redis.Redis) -> bool:
    return queued(client) == 0


def test_pause_between_steps_holds_the_next_step(cluster: Cluster, rclient: redis.Redis) -> None:
    handle = WorkflowRunner(flows.three_steps, app=cluster.app).run(run_id="p1")
    wait_for(lambda: _events(rclient, "p1", "started", "A"), what="A to start")
    handle.pause()
    assert handle.status() is RunStatus.PAUSED
    rclient.set("t:p1:release", 1)
    wait_for(lambda: _history(handle, "step_completed", "A"), what="A's completion")
    rec = handle.record()
    assert rec.status is RunStatus.PAUSED
    assert rec.task is not None and rec.task.step == "B" and rec.task.dispatched_at is None
    assert _queue_empty(rclient) and not _events(rclient, "p1", "started", "B")
    handle.resume()
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED and result.output == "done"
    assert [e["step"] for e in _events(rclient, "p1", "started")] == ["A", "B", "C"]


def test_stop_starts_nothing_after_it(cluster: Cluster, rclient: redis.Redis) -> None:
    handle = WorkflowRunner(flows.three_steps, app=cluster.app).run(run_id="s1")
    wait_for(lambda: _events(rclient, "s1", "started", "A"), what="A to start")
    handle.stop(reason="operator said so")
    assert handle.status() is RunStatus.STOPPED
    rclient.set("t:s1:release", 1)
    # A was revoked (its process terminated) or finishes and is ignored; either way the
    # run stays stopped and nothing else is dispatched.
    result = handle.result(timeout=5)
    assert result.status is RunStatus.STOPPED
    wait_for(lambda: _queue_empty(rclient), what="the queue to drain")
    rec = handle.record()
    assert rec.task is None and rec.current_step == "A"
    assert not _events(rclient, "s1", "started", "B")
    assert _history(handle, "stopped")[0]["reason"] == "operator said so"
    # A message for the stopped run delivered now is skipped without running.
    cluster.app.send_task(step_task_name("ThreeSteps", "B"), args=["s1", rec.seq],
                          queue=step_queue(flows.three_steps))
    wait_for(lambda: _queue_empty(rclient), what="the stale message to be consumed")
    wait_for(lambda: "is no longer expected" in cluster.logs() or None, 20,
             what="the worker to skip the stale message")
    assert not _events(rclient, "s1", "started", "B")


def test_concurrent_duplicate_delivery_commits_once(cluster: Cluster,
                                                    rclient: redis.Redis) -> None:
    handle = WorkflowRunner(flows.counting, app=cluster.app).run(run_id="d1")
    wait_for(lambda: rclient.get("t:d1:count") == b"1", what="Count to start")
    token = handle.record().task.token  # type: ignore[union-attr]
    # The same message again, as a broker redelivery would: the other worker runs it too.
    cluster.app.send_task(step_task_name("Counting", "Count"), args=["d1", token],
                          queue=step_queue(flows.counting))
    wait_for(lambda: rclient.get("t:d1:count") == b"2", what="the duplicate to run")
    rclient.set("t:d1:release", 1)
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED and result.output == "ok"
    wait_for(lambda: _history(handle, "ignored"), what="the second completion to be ignored")
    assert len(_history(handle, "step_completed", "Count")) == 1
    assert len(_history(handle, "step_completed", "Done")) == 1


def test_completion_applied_twice_changes_nothing(cluster: Cluster, redis_url: str,
                                                  rclient: redis.Redis) -> None:
    handle = WorkflowRunner(flows.counting, app=cluster.app).run(run_id="d2")
    wait_for(lambda: rclient.get("t:d2:count") == b"1", what="Count to start")
    runtime = cluster.app.runtime
    store = RedisStore(redis_url, flows.counting.persistence_options.key_prefix)
    token = handle.record().task.token  # type: ignore[union-attr]
    done = StepDone(token, 0.0, {}, GoTo("Done", "by hand", True))

    def make(rec: Any, now: float) -> StepDone:
        return StepDone(done.token, now, done.state_patch, done.outcome)

    first = runtime.apply(store, "d2", make, release=str(token))
    version = store.load("d2").version
    second = runtime.apply(store, "d2", make, release=str(token))
    assert first.changed and not second.changed
    assert store.load("d2").version == version
    rclient.set("t:d2:release", 1)  # the real step finishes too: its result is ignored
    assert handle.result(timeout=60).step_results["Count"] == "by hand"
    wait_for(lambda: len(_history(handle, "ignored")) == 2, what="both late results ignored")


def test_sigkill_worker_pool_child_mid_step(cluster: Cluster, rclient: redis.Redis) -> None:
    handle = WorkflowRunner(flows.killable_flow, app=cluster.app).run(run_id="k1")
    started = wait_for(lambda: _events(rclient, "k1", "started", "Work"), what="Work to start")
    os.kill(started[0]["pid"], signal.SIGKILL)  # the pool child, not the worker
    result = handle.result(timeout=90)
    assert result.status is RunStatus.COMPLETED, result.error
    runs = _events(rclient, "k1", "started", "Work")
    assert len(runs) == 2 and runs[1]["pid"] != runs[0]["pid"]
    assert result.step_results["Work"]["attempt"] == 2  # ctx.attempt tells the step
    assert len(_history(handle, "step_completed", "Work")) == 1


def test_sigkill_whole_worker_mid_step(cluster_factory: Callable[..., Cluster],
                                       rclient: redis.Redis) -> None:
    c = cluster_factory()
    c.coordinator("coord")
    victim = c.worker("victim")
    handle = WorkflowRunner(flows.killable_flow, app=c.app).run(run_id="k2")
    wait_for(lambda: _events(rclient, "k2", "started", "Work"), what="Work to start")
    survivor = c.worker("survivor")
    victim.kill()  # main process and pool: its unacked message is stranded
    result = handle.result(timeout=120)
    assert result.status is RunStatus.COMPLETED, c.logs()
    runs = _events(rclient, "k2", "started", "Work")
    assert len(runs) == 2 and runs[0]["pid"] != runs[1]["pid"]
    # The lease lapsed long before the broker's visibility timeout (3 s against 30 s), so
    # the coordinator re-dispatched, and a pool process of the survivor ran it again.
    assert len(_history(handle, "step_redispatched", "Work")) == 1
    assert _parent_pid(runs[1]["pid"]) == survivor.pid
    assert len(_history(handle, "step_completed", "Work")) == 1


def test_sigkill_coordinator_another_finishes(cluster_factory: Callable[..., Cluster],
                                              rclient: redis.Redis) -> None:
    c = cluster_factory()
    first = c.coordinator("coord-a")
    c.worker("w1")
    handle = WorkflowRunner(flows.flaky_flow, app=c.app).run(run_id="c1")
    wait_for(lambda: _history(handle, "step_retrying"), what="the first failure")
    first.kill()  # the retry timer is due in 1.5s: only a coordinator fires it
    rec = handle.record()
    assert rec.task is not None and rec.task.dispatched_at is None, rec.task
    store = RedisStore(c.redis_url, flows.flaky_flow.persistence_options.key_prefix)
    due = rec.task.due_at
    # Let the timer fall due by several sweep intervals on Redis's clock: with no
    # coordinator alive, nothing fires it.
    wait_for(lambda: store.now() > due + 1.0, 30, 0.05, what="the retry to fall due")
    rec = handle.record()
    assert rec.status is RunStatus.RUNNING
    assert rec.task is not None and rec.task.dispatched_at is None
    assert len(_events(rclient, "c1", "started", "Work")) == 1
    c.coordinator("coord-b")
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED, c.logs()
    assert result.output == {"attempt": 2}
    assert len(_events(rclient, "c1", "started", "Work")) == 2


CRASH_AFTER_COMMIT = textwrap.dedent("""
    import os, signal, sys
    from orchestrator import Settings
    from orchestrator._runtime import Runtime
    from orchestrator._dispatch.base import Dispatcher
    from tests import flows

    class DiesOnSend(Dispatcher):
        def send(self, commands):
            if commands:  # state is committed; the process dies before any message leaves
                os.kill(os.getpid(), signal.SIGKILL)

    runtime = Runtime(DiesOnSend(), Settings.from_env())
    runtime.start(flows.three_steps, {}, run_id=sys.argv[1])
""")


def test_coordinator_killed_between_commit_and_dispatch(
        cluster_factory: Callable[..., Cluster], redis_url: str, rclient: redis.Redis) -> None:
    env = {**os.environ, **TEST_ENV, "ORCHESTRATOR_REDIS_URL": redis_url,
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CRASH_AFTER_COMMIT, "x1"], env=env, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    store = RedisStore(redis_url, flows.three_steps.persistence_options.key_prefix)
    rec = store.load("x1").record
    assert rec is not None and rec.task is not None and rec.task.dispatched_at is not None
    assert _queue_empty(rclient)  # committed as dispatched, but nothing was sent
    c = cluster_factory()
    c.worker("w1")
    rclient.set("t:x1:release", 1)

    def recover_once() -> bool:
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "recover"], env=env,
                             cwd=ROOT, capture_output=True, text=True, check=True)
        return "recovered 1 run" in out.stdout

    wait_for(recover_once, 30, 0.2, what="`orchestrator recover` to re-dispatch the run")
    handle = WorkflowRunner(flows.three_steps, app=c.app).attach("x1")
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED
    redispatched = _history(handle, "step_redispatched")
    assert len(redispatched) == 1 and redispatched[0]["step"] == "A"
    assert len(_history(handle, "step_completed", "A")) == 1
    assert [e["step"] for e in _events(rclient, "x1", "started")] == ["A", "B", "C"]


def test_redis_restart_keeps_a_gate_and_workers_resume(cluster: Cluster, redis_server: Any,
                                                       rclient: redis.Redis) -> None:
    runner = WorkflowRunner(flows.gated, app=cluster.app)
    handle = runner.run({}, run_id="aof1")
    wait_for(lambda: handle.status() is RunStatus.WAITING, 60, what="the gate")
    redis_server.stop()  # appendfsync always: everything acknowledged is on disk
    redis_server.start()
    assert handle.status() is RunStatus.WAITING  # the gate survived the restart
    assert [r.run_id for r in runner.pending_gates("ops-lead")] == ["aof1"]
    handle.approve(by="ops-lead")
    # Workers reconnect and consume again (celery #8030): Release runs.
    result = handle.result(timeout=120)
    assert result.status is RunStatus.COMPLETED and result.output == "released"
    assert len(_events(rclient, "aof1", "started", "Release")) == 1
