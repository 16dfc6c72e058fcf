"""Defects found by a newcomer trial, an attack and a code review, each pinned by a test."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from orchestrator import (
    END,
    START,
    Middleware,
    RedisStore,
    RunRecord,
    RunStatus,
    Settings,
    Workflow,
    WorkflowRunner,
)
from orchestrator._committer import CommitConflict
from orchestrator._dispatch.base import Dispatcher
from orchestrator._engine import Tick
from orchestrator._records import Task
from orchestrator._runtime import Runtime
from orchestrator._stores import MemoryStore
from tests import flows
from tests.conftest import Cluster, free_port, wait_for


def _history(handle: Any, event: str) -> list[dict[str, Any]]:
    return [h for h in handle.history() if h.get("event") == event]


# ---- crash loops (17) -----------------------------------------------------------------


def test_a_step_that_kills_its_process_fails_the_run_instead_of_looping(
        cluster_factory: Callable[..., Cluster], rclient: redis.Redis) -> None:
    c = cluster_factory()
    c.worker("w1")
    handle = WorkflowRunner(flows.suicidal, app=c.app).run({})
    result = handle.result(timeout=120)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and result.error.type == "WorkerLost"
    assert "died 2 times while running step Die" in result.error.message
    # The first start plus one redelivery forgiven; the third delivery fails it unrun.
    assert len(flows.events(rclient, handle.run_id)) == 2


# ---- timeouts stop the work (15) -------------------------------------------------------


def test_a_step_past_its_timeout_is_interrupted_embedded(rclient: redis.Redis,
                                                         redis_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_REDIS_URL", redis_url)
    flows._clients.clear()
    with WorkflowRunner(flows.overrun) as runner:
        handle = runner.run({})
        result = handle.result(timeout=60)
    assert result.status is RunStatus.FAILED and result.error is not None
    assert result.error.type == "StepTimeout"
    interrupted = wait_for(lambda: rclient.get(f"t:{handle.run_id}:interrupted"), 30,
                           what="the step's thread to be interrupted")
    assert interrupted == b"StepTimeout"


def test_a_step_past_its_timeout_is_interrupted_on_a_worker(
        cluster_factory: Callable[..., Cluster], rclient: redis.Redis) -> None:
    c = cluster_factory()
    c.worker("w1")
    handle = WorkflowRunner(flows.overrun, app=c.app).run({})
    result = handle.result(timeout=60)
    assert result.status is RunStatus.FAILED and result.error is not None
    assert result.error.type == "StepTimeout"
    # Celery's soft time limit raised inside the step's own code, in the pool child.
    assert rclient.get(f"t:{handle.run_id}:interrupted") == b"SoftTimeLimitExceeded"


# ---- the sweep re-sends only what is lost (20) ------------------------------------------


def test_a_backlog_older_than_the_visibility_timeout_is_not_resent(
        cluster_factory: Callable[..., Cluster]) -> None:
    # Messages wait ~10 s in the queue, well past REDISPATCH_AFTER and the 3 s used as
    # the "resend even behind a backlog" horizon: the sweep must see they still wait.
    c = cluster_factory(ORCHESTRATOR_VISIBILITY_TIMEOUT="3", ORCHESTRATOR_REDISPATCH_AFTER="1")
    c.coordinator("coord")
    c.worker("w1")
    runner = WorkflowRunner(flows.slow, app=c.app)
    handles = [runner.run({"seconds": 0.25}) for _ in range(40)]
    for h in handles:
        assert h.result(timeout=180).status is RunStatus.COMPLETED
    resent = sum(len(_history(h, "step_redispatched")) for h in handles)
    ignored = sum(len(_history(h, "ignored")) for h in handles)
    assert (resent, ignored) == (0, 0)


# ---- a start that committed is a start (19) ---------------------------------------------


def test_a_start_with_the_broker_down_returns_its_handle(
        redis_url: str, cluster_factory: Callable[..., Cluster]) -> None:
    dead_broker = Settings.from_env({"ORCHESTRATOR_REDIS_URL": redis_url,
                                     "ORCHESTRATOR_BROKER_URL":
                                     f"redis://127.0.0.1:{free_port()}/0",
                                     "ORCHESTRATOR_REDISPATCH_AFTER": "1"})
    from orchestrator import create_app

    app = create_app(dead_broker, [flows.three_steps], import_modules=False)
    app.conf.broker_connection_timeout = 1
    app.conf.broker_transport_options = {"max_retries": 0}
    handle = WorkflowRunner(flows.three_steps, app=app).run({}, run_id="brokerless")
    assert handle.status() is RunStatus.RUNNING  # committed: the sweep sends it
    c = cluster_factory(ORCHESTRATOR_REDISPATCH_AFTER="1")
    c.coordinator("coord")
    c.worker("w1")
    redis.Redis.from_url(redis_url).set("t:brokerless:release", 1)
    assert handle.result(timeout=60).status is RunStatus.COMPLETED


# ---- inputs, ids and settings (23) --------------------------------------------------------


def test_run_ids_that_could_forge_log_lines_are_refused() -> None:
    wf = Workflow("Ids", "").flow({START: lambda ctx: END})
    with WorkflowRunner(wf) as runner:
        for bad in ("a\rb", "a\x00b", "a\u2028b", "a b", "a:b", ""):
            with pytest.raises(ValueError, match="run id"):
                runner.run({}, run_id=bad)


def test_deeply_nested_input_is_a_clear_input_error() -> None:
    wf = Workflow("Deep", "").flow({START: lambda ctx: END})
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(1000):
        node["x"] = {}
        node = node["x"]
    with WorkflowRunner(wf) as runner, pytest.raises(ValueError, match="nested"):
        runner.run(deep)


@pytest.mark.parametrize("name,value", [
    ("LEASE_TTL", "-5"), ("SWEEP_BATCH", "0"), ("REDISPATCH_AFTER", "0"),
    ("SWEEP_INTERVAL", "-1"), ("MAX_PAYLOAD", "0"), ("LOG_FORMAT", "xml"),
    ("LEASE_TTL", "soon"), ("TASK_EVENTS", "maybe"), ("RETAIN_SECONDS", "0"),
])
def test_bad_settings_are_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"ORCHESTRATOR_{name}"):
        Settings.from_env({f"ORCHESTRATOR_{name}": value})


# ---- commit conflicts ---------------------------------------------------------------------


class _NeverCommits(MemoryStore):
    def commit(self, *args: Any, **kwargs: Any) -> bool:
        return False


class _Silent(Dispatcher):
    def send(self, commands: Any) -> None:
        pass


def test_endless_conflicting_writes_give_up_with_commit_conflict() -> None:
    store = _NeverCommits("c:")
    runtime = Runtime(_Silent(), store_factory=lambda prefix: store)
    wf = Workflow("Conflicted", "").persistence(key_prefix="c:").flow({START: lambda c: END})
    run_id, _ = runtime.start(wf, {})
    with pytest.raises(CommitConflict, match="gave up"):
        WorkflowRunner(wf, runtime=runtime).attach(run_id).pause()
    assert store.load(run_id).record.paused is False  # type: ignore[union-attr]


# ---- the middleware seam --------------------------------------------------------------------


class _Recorder(Middleware):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def before_step(self, run: RunRecord, task: Task) -> None:
        self.calls.append(("before_step", task.where))

    def after_step(self, run: RunRecord, task: Task, failed: bool, seconds: float) -> None:
        self.calls.append(("after_step", f"{task.where}{' failed' if failed else ''}"))

    def after_commit(self, previous: RunRecord | None, record: RunRecord,
                     history: list[dict[str, Any]]) -> None:
        self.calls.append(("after_commit", record.status.value))


class _Broken(Middleware):
    def before_step(self, run: RunRecord, task: Task) -> None:
        raise RuntimeError("a broken hook")


def test_middleware_sees_steps_and_commits_and_cannot_break_a_run(
        caplog: pytest.LogCaptureFixture) -> None:
    recorder = _Recorder()
    wf = Workflow("Hooked", "").flow({START: lambda ctx: "B", "B": lambda ctx: END})
    with WorkflowRunner(wf, middleware=[_Broken(), recorder]) as runner, \
            caplog.at_level(logging.ERROR, "orchestrator.middleware"):
        assert runner.run({}).result(timeout=30).status is RunStatus.COMPLETED
    assert recorder.calls == [
        ("after_commit", "running"), ("before_step", "__start__"), ("after_step", "__start__"),
        ("after_commit", "running"), ("before_step", "B"), ("after_step", "B"),
        ("after_commit", "completed")]
    assert "a broken hook" in caplog.text


def test_middleware_runs_on_cluster_workers(cluster: Cluster) -> None:
    """A worker's hooks see the steps it runs (here: the test's own app runs none; it
    commits the start)."""
    recorder = _Recorder()
    from orchestrator import create_app

    app = create_app(cluster.settings, [flows.three_steps], import_modules=False,
                     middleware=[recorder])
    handle = WorkflowRunner(flows.three_steps, app=app).run({})
    assert recorder.calls == [("after_commit", "running")]
    redis.Redis.from_url(cluster.redis_url).set(f"t:{handle.run_id}:release", 1)
    assert handle.result(timeout=60).status is RunStatus.COMPLETED


# ---- persistence chooses the store -----------------------------------------------------------


def test_an_embedded_run_with_store_redis_keeps_its_state_in_redis(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_REDIS_URL", redis_url)
    wf = (Workflow("Kept", "").persistence(store="redis", key_prefix="kept:")
          .flow({START: lambda ctx: END}))
    with WorkflowRunner(wf) as runner:
        handle = runner.run({}, run_id="kept1")
        assert handle.result(timeout=30).status is RunStatus.COMPLETED
    stored = RedisStore(redis_url, "kept:").load("kept1").record
    assert stored is not None and stored.status is RunStatus.COMPLETED
    memory = Workflow("Mem", "").flow({START: lambda ctx: END})
    with WorkflowRunner(memory) as runner:
        runner.run({}, run_id="mem1").result(timeout=30)
    assert RedisStore(redis_url).load("mem1").record is None


def test_a_closed_embedded_runner_sends_nothing_more() -> None:
    wf = Workflow("Closing", "").flow({START: lambda ctx: "B", "B": lambda ctx: END})
    runner = WorkflowRunner(wf)
    runner.close()
    handle = runner.run({})  # committed in memory, never sent
    assert handle.status() is RunStatus.RUNNING


# ---- an outage is one log line, not a traceback a second (10) -------------------------------


class _Unreachable(MemoryStore):
    down = True

    def claim_due(self, limit: int, hold_for: float) -> list[str]:
        if self.down:
            from orchestrator import StoreUnavailable

            raise StoreUnavailable("Redis at redis://x is unreachable")
        return super().claim_due(limit, hold_for)


def test_a_store_outage_logs_one_line_then_one_on_recovery(
        caplog: pytest.LogCaptureFixture) -> None:
    store = _Unreachable("o:")
    runtime = Runtime(_Silent(), store_factory=lambda prefix: store)
    runtime.register(Workflow("Out", "").persistence(key_prefix="o:").flow({START: lambda c: END}))
    with caplog.at_level(logging.INFO, "orchestrator.sweep"):
        for _ in range(30):
            assert runtime.sweep_all() == 0
        store.down = False
        runtime.sweep_all()
    lines = [r for r in caplog.records if r.name == "orchestrator.sweep"]
    assert [r.getMessage() for r in lines] == [
        "sweep paused: Redis at redis://x is unreachable",
        "sweep resumed after 30 failed pass(es)"]
    assert not any(r.exc_info for r in lines)


# ---- found in review: embedded backlogs, stale attempts, lease threads ------------------------

_ran: list[int] = []
_ran_lock = threading.Lock()


def slow_item(ctx: Any) -> int:
    with _ran_lock:
        _ran.append(ctx.item)
    time.sleep(0.2)
    return int(ctx.item)


def test_an_embedded_backlog_is_not_mistaken_for_lost_work() -> None:
    """16 branches on 8 threads wait in the pool longer than REDISPATCH_AFTER: waiting, not
    lost, so each runs once."""
    from orchestrator import Parallel, local_runtime

    _ran.clear()
    wf = (Workflow("Backlog", "").persistence(key_prefix="bl:")
          .flow({START: lambda ctx: Parallel.map(slow_item, range(16), "Done"),
                 "Done": lambda ctx: END}))
    runtime = local_runtime(MemoryStore("bl:"), Settings(redispatch_after=0.05, lease_ttl=1))
    try:
        handle = WorkflowRunner(wf, runtime=runtime).run({})
        result = handle.result(timeout=60)
    finally:
        runtime.close()
    assert result.status is RunStatus.COMPLETED
    assert sorted(_ran) == list(range(16))
    assert _history(handle, "step_redispatched") == []


def test_a_message_of_a_superseded_attempt_does_not_run() -> None:
    calls: list[int] = []
    store = MemoryStore("st:")
    runtime = Runtime(_Silent(), store_factory=lambda prefix: store)
    wf = (Workflow("Stale", "").persistence(key_prefix="st:")
          .flow({START: lambda ctx: calls.append(ctx.attempt) or END}))
    run_id, _ = runtime.start(wf, {})
    runtime.apply(store, run_id, lambda rec, now: Tick(now + 120, redispatch_after=60))
    assert store.load(run_id).record.task.attempt == 2  # type: ignore[union-attr]
    assert runtime.execute("Stale", run_id, 1, attempt=1).status == "skipped"
    assert calls == []
    assert runtime.execute("Stale", run_id, 1, attempt=2).status == "done"
    assert calls == [2]


def test_closed_embedded_runners_leave_no_lease_threads() -> None:
    wf = Workflow("Leased", "").flow({START: lambda ctx: END})

    def lease_threads() -> int:
        return sum(t.name == "orchestrator-leases" and t.is_alive()
                   for t in threading.enumerate())

    before = lease_threads()
    for _ in range(5):
        with WorkflowRunner(wf) as runner:
            runner.run({}).result(timeout=30)
    wait_for(lambda: lease_threads() <= before, 10, what="the lease threads to end")
