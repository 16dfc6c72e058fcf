"""Events sent to runs: the mailbox, keys, payload models, and AnyOf, through real Redis
and real Celery workers."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
import redis

from orchestrator import (
    END,
    START,
    AnyOf,
    Client,
    ControlError,
    Event,
    HumanApproval,
    InvalidEvent,
    Next,
    RunStatus,
    Sleep,
    Wait,
    Workflow,
    WorkflowRunner,
)
from orchestrator import _engine as engine
from orchestrator._definition import DefinitionError
from orchestrator._engine import Deliver, Expect, FirstOf, StepDone, Tick, WaitFor
from orchestrator._records import FlowSpec, StepPolicy, StepSpec
from tests import flows
from tests.conftest import Cluster, wait_for
from tests.test_cli import cli

SPEC = FlowSpec("E", "v1", {n: StepSpec(StepPolicy()) for n in (START, "Next", "Other", "Late")})


def _history(handle: Any, event: str) -> list[dict[str, Any]]:
    return [e for e in handle.history() if e["event"] == event]


# ---- the engine's rules ------------------------------------------------------------------


def _started() -> Any:
    rec = engine.start(SPEC, "e1", {}, {}, now=100.0).record
    assert rec is not None
    return rec


def test_an_event_before_its_wait_is_kept_in_order_and_taken_by_the_wait() -> None:
    rec = _started()
    for i, key in enumerate(["a", "b"]):
        d = engine.apply(rec, Deliver(101.0 + i, "paid", {"n": i}, key))
        assert d.record is not None and [h["event"] for h in d.history] == ["event_queued"]
        rec = d.record
    assert [m.payload for m in rec.mailbox] == [{"n": 0}, {"n": 1}]
    d = engine.apply(rec, StepDone(1, 110.0, {}, Expect("paid", "Next")), SPEC)
    assert d.record is not None and d.record.step_results[START] == {"n": 0}  # the oldest
    assert [m.payload for m in d.record.mailbox] == [{"n": 1}]
    assert not d.record.events and d.record.status is RunStatus.RUNNING
    taken = [h for h in d.history if h["event"] == "event_received"]
    assert taken[0]["key"] == "a" and taken[0]["sent_at"] == 101.0
    assert [c.task.step for c in d.commands if isinstance(c, engine.SendTask)] == ["Next"]


def test_a_key_is_stored_once_and_a_finished_run_refuses_events() -> None:
    rec = _started()
    rec = engine.apply(rec, Deliver(101.0, "paid", 1, "k")).record
    assert rec is not None
    again = engine.apply(rec, Deliver(102.0, "paid", 2, "k"))
    assert not again.changed and "sent already" in (again.ignored or "")
    ended = engine.apply(rec, engine.Stop(103.0)).record
    assert ended is not None
    with pytest.raises(ControlError, match="cannot send to run e1: it is stopped"):
        engine.apply(ended, Deliver(104.0, "paid", 3, "other"))
    late_retry = engine.apply(ended, Deliver(105.0, "paid", 1, "k"))  # still a duplicate
    assert not late_retry.changed and "sent already" in (late_retry.ignored or "")


def test_an_event_wait_times_out_to_on_timeout_or_fails() -> None:
    rec = _started()
    waiting = engine.apply(rec, StepDone(1, 101.0, {}, Expect("paid", "Next", 10, "Late")),
                           SPEC).record
    assert waiting is not None and waiting.status is RunStatus.WAITING
    assert engine.next_due(waiting, 60, 5) == 111.0
    late = engine.apply(waiting, Tick(111.0)).record
    assert late is not None and late.task is not None and late.task.step == "Late"
    assert late.step_results[START]["timed_out"] is True
    strict = engine.apply(rec, StepDone(1, 101.0, {}, Expect("paid", "Next", 10)), SPEC).record
    assert strict is not None
    failed = engine.apply(strict, Tick(112.0)).record
    assert failed is not None and failed.status is RunStatus.FAILED
    assert failed.error is not None and failed.error.type == "EventTimeout"


def test_any_of_fires_one_arm_and_withdraws_the_others_in_the_same_commit() -> None:
    rec = _started()
    gate = engine.GateSpec(approvers=("ops",), then="Next")
    arms = FirstOf({"approved": WaitFor(gate), "cancelled": Expect("cancel", "Other"),
                    "late": engine.Doze("Late", seconds=30)})
    waiting = engine.apply(rec, StepDone(1, 101.0, {}, arms), SPEC).record
    assert waiting is not None and waiting.gate and waiting.timer and waiting.events
    cancelled = engine.apply(waiting, Deliver(102.0, "cancel", {"why": "x"})).record
    assert cancelled is not None
    assert (cancelled.gate, cancelled.timer, cancelled.events) == (None, None, [])
    assert cancelled.step_results[START] == {"fired": "cancelled", "event": "cancel",
                                             "payload": {"why": "x"}, "key": None}
    with pytest.raises(ControlError, match="no gate"):  # the late approval
        engine.apply(cancelled, engine.Decide(103.0, True, "ops"))
    later = engine.apply(cancelled, Tick(200.0)).history  # the timer went with it
    assert not [h for h in later if h["event"] == "timer_fired"]
    timed = engine.apply(waiting, Tick(131.0)).record
    assert timed is not None and timed.step_results[START]["fired"] == "late"
    assert timed.gate is None and not timed.events


def test_bad_definitions_are_refused_when_written() -> None:
    with pytest.raises(DefinitionError, match="at least two"):
        AnyOf(a=Event("x"))
    with pytest.raises(DefinitionError, match="at most one HumanApproval"):
        AnyOf(a=HumanApproval(["x"]), b=HumanApproval(["y"]))
    with pytest.raises(DefinitionError, match="naming the step after each"):
        Wait(AnyOf(a=Event("x"), b=Sleep(1)), {"a": "Next"})
    with pytest.raises(DefinitionError, match="event name"):
        Event("has space")
    with pytest.raises(DefinitionError, match="a step name"):
        Wait(Event("x"), {"a": "b"})


def test_an_undeclared_event_fails_the_step_saying_how_to_declare_it() -> None:
    wf = Workflow("Undeclared").flow({START: lambda ctx: Wait(Event("paid"), "Next"),
                                      "Next": lambda ctx: END})
    with WorkflowRunner(wf) as runner:
        result = runner.run({}).result(timeout=30)
    assert result.status is RunStatus.FAILED and result.error is not None
    assert ".events(" in result.error.message and "'paid'" in result.error.message


def test_events_embedded_with_the_payload_model_in_step_results() -> None:
    def ship(ctx: Any) -> Next:
        paid = ctx.step_results["AwaitPayment"]
        return Next(END, output=type(paid).__name__)

    local = (Workflow("LocalShop").input(flows.ShopInput).events(paid=flows.Payment)
             .flow({START: "AwaitPayment", "AwaitPayment": flows.await_payment, "Ship": ship,
                    "Cancel": lambda ctx: END}))
    with WorkflowRunner(local) as runner:
        handle = runner.run({})
        wait_for(lambda: handle.status() is RunStatus.WAITING, 30, what="the wait")
        with pytest.raises(InvalidEvent, match="amount"):
            handle.send("paid", {"amount": "lots"})
        assert handle.record().mailbox == [] and not _history(handle, "event_queued")
        assert handle.send("paid", {"amount": "7"}) == "delivered"  # the model coerces
        result = handle.result(timeout=30)
    assert result.output == "Payment" and result.step_results["AwaitPayment"] == {
        "amount": 7, "currency": "EUR"}


# ---- on the cluster ----------------------------------------------------------------------


def test_an_event_sent_before_the_wait_is_taken(cluster: Cluster, redis_url: str,
                                                rclient: redis.Redis) -> None:
    handle = WorkflowRunner(flows.shop, app=cluster.app).run({"hold": True}, run_id="early1")
    wait_for(lambda: any(e["what"] == "holding" for e in flows.events(rclient, "early1")), 60,
             what="the first step to run")
    client = Client(redis_url)
    assert client.send("early1", "paid", {"amount": 5}, key="webhook-1") == "queued"
    assert handle.record().mailbox[0].payload == {"amount": 5, "currency": "EUR"}
    rclient.set("t:early1:go", 1)
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.output == {"amount": 5, "currency": "EUR"}
    shipped = [e for e in flows.events(rclient, "early1") if e["what"] == "shipped"]
    assert shipped == [{**shipped[0], "amount": 5, "model": "Payment"}]
    (taken,) = _history(handle, "event_received")
    assert taken["key"] == "webhook-1" and taken["step"] == "AwaitPayment"
    # A finished run refuses events; an unknown run is not found.
    with pytest.raises(ControlError, match="completed"):
        client.send("early1", "paid", {"amount": 1})
    done = cli(redis_url, "send", "early1", "paid", "--data", '{"amount": 1}', check=False)
    assert done.returncode == 2 and "completed" in done.stderr
    assert cli(redis_url, "send", "nosuchrun", "paid", check=False).returncode == 3
    client.close()


@pytest.mark.parametrize("at_the_wait", [False, True])
def test_the_same_key_from_ten_threads_is_taken_once(cluster: Cluster, redis_url: str,
                                                     rclient: redis.Redis,
                                                     at_the_wait: bool) -> None:
    run_id = f"dupe{int(at_the_wait)}"
    handle = WorkflowRunner(flows.shop, app=cluster.app).run({"hold": not at_the_wait},
                                                             run_id=run_id)
    if at_the_wait:
        wait_for(lambda: handle.status() is RunStatus.WAITING, 60, what="the wait")
    else:
        wait_for(lambda: any(e["what"] == "holding" for e in flows.events(rclient, run_id)),
                 60, what="the first step")
    barrier = threading.Barrier(10)
    outcomes: list[str] = []

    def send(i: int) -> None:
        client = Client(redis_url)
        barrier.wait()
        try:  # a retry may come after the run has ended: still a duplicate, not an error
            outcomes.append(client.send(run_id, "paid", {"amount": 10 + i}, key="webhook-123"))
        except Exception as exc:
            outcomes.append(repr(exc))
        client.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    first = "delivered" if at_the_wait else "queued"
    assert Counter(outcomes) == {first: 1, "duplicate": 9}
    rclient.set(f"t:{run_id}:go", 1)
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED, result.error
    assert len([e for e in flows.events(rclient, run_id) if e["what"] == "shipped"]) == 1
    assert len(_history(handle, "event_received")) == 1
    assert handle.record().mailbox == []


def test_an_invalid_payload_is_refused_naming_the_field(cluster: Cluster,
                                                        redis_url: str) -> None:
    handle = WorkflowRunner(flows.shop, app=cluster.app).run({}, run_id="bad1")
    wait_for(lambda: handle.status() is RunStatus.WAITING, 60, what="the wait")
    client = Client(redis_url)  # no workflow code: the published schema decides
    with pytest.raises(InvalidEvent, match="amount"):
        client.send("bad1", "paid", {"amount": "lots"})
    with pytest.raises(InvalidEvent, match="declares: cancel, paid"):
        client.send("bad1", "pay", {"amount": 1})
    bad = cli(redis_url, "send", "bad1", "paid", "--data", '{"currency": "EUR"}', check=False)
    assert bad.returncode == 2 and "amount" in bad.stderr
    assert cli(redis_url, "send", "bad1", "paid", "--data", "{nope", check=False
               ).returncode == 2
    rec = handle.record()
    assert rec.status is RunStatus.WAITING and rec.mailbox == [] and rec.event_keys == []
    assert not [h for h in handle.history() if h["event"].startswith("event_")
                and h["event"] != "event_awaited"]
    shown = cli(redis_url, "status", "bad1").stdout
    assert "waiting for event 'paid'" in shown
    ok = cli(redis_url, "send", "bad1", "paid", "--data", '{"amount": 3}', "--key", "k1")
    assert "delivered" in ok.stdout
    assert handle.result(timeout=60).output == {"amount": 3, "currency": "EUR"}
    client.close()


def test_any_of_with_a_racing_approval_and_event_has_one_outcome(
        cluster: Cluster, redis_url: str, rclient: redis.Redis) -> None:
    runner = WorkflowRunner(flows.either, app=cluster.app)
    client = Client(redis_url)
    handles = [runner.run({}, run_id=f"race{i}") for i in range(20)]
    winners: Counter[str] = Counter()
    for handle in handles:
        wait_for(lambda h=handle: h.status() is RunStatus.WAITING, 60, what="the AnyOf")
        said = _race(lambda h=handle: h.approve("ops"),
                     lambda h=handle: client.send(h.run_id, "cancel", {"why": "race"}))
        result = handle.result(timeout=60)
        assert result.status is RunStatus.COMPLETED, result.error
        fired = result.output["fired"]
        winners[fired] += 1
        ran = [e["what"] for e in flows.events(rclient, handle.run_id)]
        # Exactly one arm fired, and everything agrees on which: the result, the step that
        # ran, the history, and what each caller was told.
        if fired == "approved":
            assert ran == ["released"] and said["approve"] is None
            assert said["send"] == "queued" or isinstance(said["send"], ControlError)
            assert len(_history(handle, "gate_approved")) == 1
            assert not _history(handle, "event_received")
        else:
            assert ran == ["cleaned"] and said["send"] == "delivered"
            assert isinstance(said["approve"], ControlError)
            assert len(_history(handle, "event_received")) == 1
            assert not _history(handle, "gate_approved")
    assert sum(winners.values()) == 20
    client.close()


def _race(approve: Any, send: Any) -> dict[str, Any]:
    """Call both at the same instant; what each returned or raised (ControlError)."""
    barrier = threading.Barrier(2)
    said: dict[str, Any] = {}

    def call(name: str, fn: Any) -> None:
        barrier.wait()
        try:
            said[name] = fn()
        except ControlError as exc:
            said[name] = exc

    threads = [threading.Thread(target=call, args=("approve", approve)),
               threading.Thread(target=call, args=("send", send))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return said
