"""Durable timers: `Wait(Sleep(...), "Next")` and `Wait(Until(...), "Next")` park a run in
the `due` set; the sweep wakes it once, whichever coordinator is alive by then."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from orchestrator import END, START, RunStatus, Sleep, Until, Wait, Workflow, WorkflowRunner
from orchestrator import _engine as engine
from orchestrator._engine import Doze, StepDone, Stop, Tick
from orchestrator._records import FlowSpec, RunRecord, StepPolicy, StepSpec
from tests import flows
from tests.conftest import Cluster, queued, wait_for

SPEC = FlowSpec("T", "v1", {START: StepSpec(StepPolicy()), "Next": StepSpec(StepPolicy())})


def _sleeping(seconds: float = 30.0) -> RunRecord:
    rec = engine.start(SPEC, "t1", {}, {}, now=100.0).record
    assert rec is not None
    d = engine.apply(rec, StepDone(1, 101.0, {}, Doze("Next", seconds=seconds)), SPEC)
    assert d.record is not None and not d.commands
    return d.record


def test_a_timer_parks_the_run_and_fires_once_when_due() -> None:
    rec = _sleeping(30.0)
    assert rec.status is RunStatus.WAITING and rec.timer is not None
    assert rec.timer.wake_at == 131.0 and engine.next_due(rec, 60, 5) == 131.0
    assert not engine.apply(rec, Tick(130.9), SPEC).changed  # not yet
    fired = engine.apply(rec, Tick(131.2), SPEC)
    assert fired.record is not None and fired.record.timer is None
    assert fired.record.status is RunStatus.RUNNING
    assert fired.record.step_results[START] == {"slept_until": 131.0, "woke_at": 131.2}
    (send,) = fired.commands
    assert isinstance(send, engine.SendTask) and send.task.step == "Next"
    assert not engine.apply(fired.record, Tick(131.3), SPEC).commands  # fires once


def test_until_wakes_at_its_time_and_stop_withdraws_a_timer() -> None:
    rec = engine.start(SPEC, "t2", {}, {}, now=100.0).record
    assert rec is not None
    d = engine.apply(rec, StepDone(1, 101.0, {}, Doze("Next", until=500.0)), SPEC)
    assert d.record is not None and d.record.timer is not None
    assert d.record.timer.wake_at == 500.0
    stopped = engine.apply(d.record, Stop(102.0), SPEC).record
    assert stopped is not None and stopped.timer is None and engine.next_due(stopped, 60, 5) is None


def test_a_timer_to_an_unknown_step_fails_naming_the_choices() -> None:
    rec = engine.start(SPEC, "t3", {}, {}, now=100.0).record
    assert rec is not None
    failed = engine.apply(rec, StepDone(1, 101.0, {}, Doze("Nope", seconds=1)), SPEC).record
    assert failed is not None and failed.status is RunStatus.FAILED
    assert failed.error is not None and "'Nope'" in failed.error.message


def test_paused_while_sleeping_continues_after_resume() -> None:
    rec = _sleeping(1.0)
    paused = engine.apply(rec, engine.Pause(101.5), SPEC).record
    assert paused is not None
    woke = engine.apply(paused, Tick(103.0), SPEC)
    assert woke.record is not None and woke.record.task is not None and not woke.commands
    resumed = engine.apply(woke.record, engine.Resume(104.0), SPEC)
    assert [c.task.step for c in resumed.commands if isinstance(c, engine.SendTask)] == ["Next"]


def test_bad_timers_are_refused_when_made() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Until(datetime(2030, 1, 1))
    with pytest.raises(ValueError, match=">= 0"):
        Sleep(seconds=-1)
    assert Sleep(timedelta(minutes=1.5)).duration == 90.0


def test_sleep_and_until_run_embedded() -> None:
    at = datetime.now(UTC) + timedelta(seconds=0.3)

    def until(ctx: Any) -> Wait:
        return Wait(Until(at), "Done")

    wf = Workflow("Alarm", "").flow({START: until, "Done": lambda ctx: END})
    with WorkflowRunner(wf) as runner:
        result = runner.run({}).result(timeout=30)
    assert result.status is RunStatus.COMPLETED
    slept = result.step_results[START]
    assert slept["slept_until"] == pytest.approx(at.timestamp())
    assert slept["woke_at"] >= at.timestamp()


def test_a_sleep_survives_its_coordinator_being_killed_and_fires_once(
        cluster_factory: Callable[..., Cluster], rclient: redis.Redis) -> None:
    c = cluster_factory()
    first = c.coordinator("coord-a")
    c.worker("w1")
    handle = WorkflowRunner(flows.napping, app=c.app).run({"seconds": 3.0}, run_id="nap1")
    wait_for(lambda: handle.status() is RunStatus.WAITING, 60, what="the run to fall asleep")
    assert queued(rclient) == 0  # a sleeping run holds no message
    first.kill()  # nobody fires the timer now; it lives in Redis
    timer = handle.record().timer
    assert timer is not None
    store = c.app.runtime.store_for("nap:")
    wait_for(lambda: store.now() > timer.wake_at + 1, 30, what="the timer to be overdue")
    assert handle.status() is RunStatus.WAITING  # due, but no coordinator: still asleep
    c.coordinator("coord-b")
    c.coordinator("coord-c")  # two sweepers race for the one timer
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED
    assert result.output["slept_until"] == timer.wake_at
    woke = [e for e in flows.events(rclient, "nap1") if e["what"] == "woke"]
    assert len(woke) == 1
    fired = [h for h in handle.history() if h["event"] == "timer_fired"]
    assert len(fired) == 1


def test_a_sweep_that_claims_a_full_batch_says_more_is_due() -> None:
    """Coordinators sweep again at once after a full batch: 1,000 timers due together
    would otherwise wait a sweep interval per batch."""
    from orchestrator import Settings
    from orchestrator._dispatch.base import Dispatcher
    from orchestrator._runtime import Runtime
    from orchestrator._stores import MemoryStore

    class Silent(Dispatcher):
        def send(self, commands: Any) -> None:
            pass

    store = MemoryStore("b:")
    runtime = Runtime(Silent(), Settings(sweep_batch=2), store_factory=lambda p: store)
    wf = (Workflow("Batch", "").persistence(key_prefix="b:")
          .flow({START: lambda ctx: Wait(Sleep(0), "Done"), "Done": lambda ctx: END}))
    runtime.register(wf)
    for i in range(3):
        runtime.start(wf, {}, run_id=f"b{i}")
        store.set_due(f"b{i}", store.now() - 1)
    runtime.sweep_all()  # claims 2 of the 3 due
    assert runtime.sweeper.saturated
    runtime.sweep_all()  # the last one
    assert not runtime.sweeper.saturated
