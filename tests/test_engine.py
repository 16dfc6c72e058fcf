"""The pure engine, one transition at a time: no Redis, no Celery, no clock."""

from __future__ import annotations

import operator
from typing import Any

import pytest
from hypothesis import event as hypothesis_event
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import ControlError
from orchestrator import _engine as engine
from orchestrator._engine import (
    END,
    START,
    BranchSpec,
    Checkpoint,
    Decide,
    FanOut,
    GateSpec,
    GoTo,
    Join,
    Outcome,
    Pause,
    Resume,
    Revoke,
    SendFork,
    SendTask,
    StepDone,
    StepFailed,
    Stop,
    Tick,
    WaitFor,
)
from orchestrator._records import (
    BranchResult,
    FlowSpec,
    RunError,
    RunRecord,
    RunStatus,
    StepPolicy,
    StepSpec,
    Task,
)

SPEC = FlowSpec("W", "v1", {
    START: StepSpec(StepPolicy(queue="q"), route="A"),
    "A": StepSpec(StepPolicy(queue="q")),
    "B": StepSpec(StepPolicy(queue="q2", retries=2, backoff=1.0, backoff_factor=2.0)),
    "C": StepSpec(StepPolicy(queue="q")),
}, reducers={"logs": operator.add})
Q = StepPolicy(queue="q")


def ids(revoke: Revoke) -> tuple[str, ...]:
    return tuple(f"{revoke.run_id}:{t.task_id}" for t in revoke.tasks)


def started() -> RunRecord:
    d = engine.start(SPEC, "r1", {}, {"n": 0}, now=100.0)
    assert d.record is not None
    return d.record


def goto(target: str, output: Any = None, has_output: bool = False) -> Outcome:
    return GoTo(target, output, has_output)


def done(rec: RunRecord, outcome: Outcome, patch: dict[str, Any] | None = None,
         now: float = 101.0) -> engine.Decision:
    assert rec.task is not None
    return engine.apply(rec, StepDone(rec.task.token, now, patch or {}, outcome), SPEC)


def sent(d: engine.Decision) -> list[str]:
    return [c.task.step for c in d.commands if isinstance(c, SendTask)]


def at(rec: RunRecord, step: str) -> RunRecord:
    """Drive a fresh run to `step` (A, then goto)."""
    d = done(rec, goto(step))
    assert d.record is not None
    return d.record


# ---- start and plain transitions ---------------------------------------------------------


def test_start_follows_a_route_and_sends_the_first_step() -> None:
    d = engine.start(SPEC, "r1", {"x": 1}, {"n": 0}, now=100.0)
    assert d.record is not None and d.record.status is RunStatus.RUNNING
    assert sent(d) == ["A"] and d.record.current_step == "A"
    assert [h["event"] for h in d.history] == ["started", "routed"]
    assert d.record.task is not None and d.record.task.token == 1


def test_step_returning_a_name_sends_that_step() -> None:
    d = done(started(), goto("B"), {"n": 5})
    assert d.record is not None and sent(d) == ["B"]
    assert d.record.state == {"n": 5} and d.record.task.queue == "q2"  # type: ignore[union-attr]
    assert d.record.task.token == 2  # type: ignore[union-attr]


def test_step_returning_end_completes_with_output() -> None:
    d = done(started(), goto(END, {"ok": True}, True))
    assert d.record is not None and d.record.status is RunStatus.COMPLETED
    assert d.record.output == {"ok": True} and d.record.step_results["A"] == {"ok": True}
    assert d.commands == [] and d.record.task is None


def test_next_records_the_output_under_the_step() -> None:
    d = done(started(), goto("C", [1, 2], True))
    assert d.record is not None and d.record.step_results == {"A": [1, 2]}


def test_unknown_step_fails_naming_the_valid_ones() -> None:
    d = done(started(), goto("Nope"))
    assert d.record is not None and d.record.status is RunStatus.FAILED
    err = d.record.error
    assert err is not None and err.type == "UnknownStep" and err.step == "A"
    assert "'Nope'" in err.message and all(s in err.message for s in ("A", "B", "C", "END"))


def test_returning_start_is_not_a_valid_step() -> None:
    d = done(started(), goto(START))
    assert d.record is not None and d.record.status is RunStatus.FAILED


def test_duplicate_completion_is_ignored() -> None:
    rec = started()
    first = done(rec, goto("B"))
    assert first.record is not None
    again = engine.apply(first.record, StepDone(1, 102.0, {}, goto("C")), SPEC)
    assert not again.changed and again.ignored


def test_apply_never_mutates_its_input() -> None:
    rec = started()
    snapshot = rec.model_dump()
    done(rec, goto("B"), {"n": 1})
    engine.apply(rec, Stop(101.0), SPEC)
    assert rec.model_dump() == snapshot


# ---- failures and retries ---------------------------------------------------------------


def fail(rec: RunRecord, now: float = 101.0, retryable: bool = True,
         attempt: int = 0) -> engine.Decision:
    assert rec.task is not None
    error = RunError(type="ConnectionError", message="boom", traceback="Traceback ...")
    return engine.apply(rec, StepFailed(rec.task.token, now, error, retryable,
                                        attempt=attempt), SPEC)


def test_failure_retries_with_backoff_then_fails_keeping_the_traceback() -> None:
    rec = at(started(), "B")
    token = rec.task.token  # type: ignore[union-attr]
    d = fail(rec, now=200.0)
    assert d.record is not None and d.commands == []  # backoff: a timer, not a message
    task = d.record.task
    assert task is not None and task.attempt == 2 and task.due_at == 201.0
    assert task.token == token and task.dispatched_at is None
    assert engine.next_due(d.record, 60, 5) == 201.0
    fired = engine.apply(d.record, Tick(201.0), SPEC)
    assert fired.record is not None and sent(fired) == ["B"]
    d2 = fail(fired.record, now=202.0)
    assert d2.record is not None and d2.record.task.due_at == 204.0  # type: ignore[union-attr]
    d3 = fail(engine.apply(d2.record, Tick(204.0), SPEC).record, now=205.0)  # type: ignore[arg-type]
    assert d3.record is not None and d3.record.status is RunStatus.FAILED
    assert d3.record.error is not None and d3.record.error.step == "B"
    assert d3.record.error.traceback == "Traceback ..."


def test_non_retryable_failure_fails_at_once() -> None:
    d = fail(at(started(), "B"), retryable=False)
    assert d.record is not None and d.record.status is RunStatus.FAILED


def test_failure_of_an_older_attempt_is_ignored() -> None:
    d = fail(at(started(), "B"))
    assert d.record is not None
    stale = fail(d.record, attempt=1)
    assert not stale.changed


def test_checkpoint_merges_state_for_the_current_token_only() -> None:
    rec = started()
    d = engine.apply(rec, Checkpoint(1, 101.0, {"n": 3}), SPEC)
    assert d.record is not None and d.record.state == {"n": 3}
    assert not engine.apply(rec, Checkpoint(9, 101.0, {"n": 4}), SPEC).changed


# ---- pause, resume, stop --------------------------------------------------------------


def test_pause_holds_the_next_step_until_resume() -> None:
    rec = engine.apply(started(), Pause(100.5), SPEC).record
    assert rec is not None and rec.status is RunStatus.PAUSED
    d = done(rec, goto("B"))
    assert d.record is not None and d.commands == [] and d.record.status is RunStatus.PAUSED
    assert d.record.task is not None and d.record.task.dispatched_at is None
    assert engine.next_due(d.record, 60, 5) is None  # no timer while paused
    resumed = engine.apply(d.record, Resume(103.0), SPEC)
    assert resumed.record is not None and sent(resumed) == ["B"]
    assert resumed.record.status is RunStatus.RUNNING


def test_pause_twice_and_resume_unpaused_change_nothing() -> None:
    rec = engine.apply(started(), Pause(100.5), SPEC).record
    assert rec is not None
    assert not engine.apply(rec, Pause(101.0), SPEC).changed
    assert not engine.apply(started(), Resume(101.0), SPEC).changed


def test_stop_revokes_in_flight_work_and_ignores_late_results() -> None:
    rec = started()
    d = engine.apply(rec, Stop(101.0, "enough"), SPEC)
    assert d.record is not None and d.record.status is RunStatus.STOPPED
    assert len(d.commands) == 1 and isinstance(d.commands[0], Revoke)
    assert ids(d.commands[0]) == ("r1:1:1",)
    assert not engine.apply(d.record, StepDone(1, 102.0, {}, goto("B")), SPEC).changed
    with pytest.raises(ControlError, match="stopped"):
        engine.apply(d.record, Resume(103.0), SPEC)
    with pytest.raises(ControlError):
        engine.apply(d.record, Pause(103.0), SPEC)


# ---- gates ------------------------------------------------------------------------------


def gate(**kw: Any) -> Outcome:
    options = {"approvers": ("ann", "bob"), "then": "B", **kw}
    return WaitFor(GateSpec(**options))


def waiting(**kw: Any) -> RunRecord:
    d = done(started(), gate(**kw))
    assert d.record is not None and d.record.status is RunStatus.WAITING and d.commands == []
    return d.record


def decide(rec: RunRecord, approve: bool, by: str, now: float = 110.0) -> engine.Decision:
    return engine.apply(rec, Decide(now, approve, by, "why"), SPEC)


def test_approval_sends_the_next_step_and_records_the_decision() -> None:
    d = decide(waiting(), True, "ann")
    assert d.record is not None and sent(d) == ["B"] and d.record.gate is None
    result = d.record.step_results["A"]
    assert result["decision"] == "approved" and result["by"] == "ann"
    assert result["comment"] == "why" and result["at"] == 110.0


def test_only_listed_approvers_decide() -> None:
    rec = waiting()
    with pytest.raises(PermissionError, match="eve"):
        decide(rec, True, "eve")
    with pytest.raises(PermissionError):
        decide(rec, False, "eve")


def test_quorum_counts_distinct_approvers() -> None:
    rec = waiting(min_approvals=2)
    one = decide(rec, True, "ann").record
    assert one is not None and one.status is RunStatus.WAITING
    assert not decide(one, True, "ann").changed
    two = decide(one, True, "bob")
    assert two.record is not None and sent(two) == ["B"]
    assert [a["by"] for a in two.record.step_results["A"]["approvals"]] == ["ann", "bob"]


def test_reject_without_on_reject_fails_naming_who_and_why() -> None:
    d = decide(waiting(), False, "bob")
    assert d.record is not None and d.record.status is RunStatus.FAILED
    assert d.record.error is not None and d.record.error.type == "GateRejected"
    assert "bob" in d.record.error.message and "why" in d.record.error.message


def test_reject_with_on_reject_goes_there() -> None:
    d = decide(waiting(on_reject="C"), False, "bob")
    assert d.record is not None and sent(d) == ["C"]
    assert d.record.step_results["A"]["reason"] == "why"


def test_gate_timeout_fires_from_the_sweep() -> None:
    rec = waiting(timeout=30.0, on_timeout="C")
    assert engine.next_due(rec, 60, 5) == 131.0
    assert not engine.apply(rec, Tick(130.0), SPEC).changed
    d = engine.apply(rec, Tick(131.0), SPEC)
    assert d.record is not None and sent(d) == ["C"]
    assert d.record.step_results["A"]["decision"] == "timed_out"
    failed = engine.apply(waiting(timeout=30.0), Tick(131.0), SPEC)
    assert failed.record is not None and failed.record.error is not None
    assert failed.record.error.type == "GateTimeout"


def test_gate_naming_an_unknown_step_fails() -> None:
    d = done(started(), gate(then="Nowhere"))
    assert d.record is not None and d.record.status is RunStatus.FAILED


def test_approval_while_paused_waits_for_resume() -> None:
    paused = engine.apply(waiting(), Pause(105.0), SPEC).record
    assert paused is not None and paused.status is RunStatus.PAUSED
    d = decide(paused, True, "ann")
    assert d.record is not None and d.commands == [] and d.record.status is RunStatus.PAUSED
    resumed = engine.apply(d.record, Resume(111.0), SPEC)
    assert sent(resumed) == ["B"]


def test_deciding_without_a_gate_or_after_the_end_is_refused() -> None:
    with pytest.raises(ControlError, match="no gate"):
        decide(started(), True, "ann")
    stopped = engine.apply(waiting(), Stop(106.0), SPEC).record
    assert stopped is not None
    with pytest.raises(ControlError, match="stopped"):
        decide(stopped, True, "ann")


# ---- parallel ---------------------------------------------------------------------------


def branches(*names: str, mapped: bool = False) -> Outcome:
    specs = tuple(BranchSpec(n, f"m:{n}", Q, item=i if mapped else None, has_item=mapped)
                  for i, n in enumerate(names))
    return FanOut(specs, "C")


def forked(*names: str, mapped: bool = False) -> RunRecord:
    d = done(started(), branches(*names, mapped=mapped), {"n": 1})
    assert d.record is not None and d.record.fork is not None
    (cmd,) = d.commands
    assert isinstance(cmd, SendFork) and [t.branch for t in cmd.tasks] == list(names)
    return d.record


def result(output: Any, patch: dict[str, Any] | None = None, at: float = 120.0) -> BranchResult:
    return BranchResult(output=output, state_patch=patch or {}, finished_at=at)


def test_join_before_every_branch_finished_is_ignored() -> None:
    rec = forked("x", "y")
    assert not engine.apply(rec, Join(rec.fork.token, 121.0, {"x": result(1)}), SPEC).changed  # type: ignore[union-attr]


def test_join_merges_branch_state_and_outputs() -> None:
    rec = forked("x", "y")
    token = rec.fork.token  # type: ignore[union-attr]
    d = engine.apply(rec, Join(token, 121.0, {
        "x": result("X", {"a": 1, "logs": ["x"]}), "y": result("Y", {"b": 2, "logs": ["y"]})}),
        SPEC)
    assert d.record is not None and sent(d) == ["C"] and d.record.fork is None
    assert d.record.state == {"n": 1, "a": 1, "b": 2, "logs": ["x", "y"]}  # reducer: add
    assert d.record.step_results["x"] == "X" and d.record.step_results["y"] == "Y"
    assert not engine.apply(d.record, Join(token, 122.0, {}), SPEC).changed


def test_two_branches_writing_a_key_without_a_reducer_fail() -> None:
    rec = forked("x", "y")
    d = engine.apply(rec, Join(rec.fork.token, 121.0, {  # type: ignore[union-attr]
        "x": result(1, {"k": 1}), "y": result(2, {"k": 2})}), SPEC)
    assert d.record is not None and d.record.status is RunStatus.FAILED
    assert d.record.error is not None and d.record.error.type == "StateConflict"
    assert "'k'" in d.record.error.message and "x" in d.record.error.message


def test_map_branches_give_a_list_in_input_order() -> None:
    names = ("f[0]", "f[1]", "f[2]")
    rec = forked(*names, mapped=True)
    d = engine.apply(rec, Join(rec.fork.token, 121.0, {  # type: ignore[union-attr]
        "f[2]": result(20), "f[0]": result(0), "f[1]": result(10)}), SPEC)
    assert d.record is not None and d.record.step_results["f"] == [0, 10, 20]


def test_failed_branch_fails_the_run_and_revokes_its_siblings() -> None:
    rec = forked("x", "y")
    error = RunError(type="RuntimeError", message="on fire")
    d = engine.apply(rec, StepFailed(rec.fork.token, 121.0, error, branch="x"), SPEC)  # type: ignore[union-attr]
    assert d.record is not None and d.record.status is RunStatus.FAILED
    assert d.record.error is not None and d.record.error.step == "A[x]"
    (revoke,) = d.commands
    assert isinstance(revoke, Revoke) and ids(revoke) == ("r1:2:y:1",)


def test_tick_redrives_a_lost_join() -> None:
    rec = forked("x", "y")
    done_all = {"x": result(1, at=120.0), "y": result(2, at=121.0)}
    assert not engine.apply(rec, Tick(123.0, join_after=5.0, branch_results=done_all),
                            SPEC).changed
    d = engine.apply(rec, Tick(126.0, join_after=5.0, branch_results=done_all), SPEC)
    assert d.record is not None and sent(d) == ["C"]
    assert "join_redriven" in [h["event"] for h in d.history]


def nested_done(rec: RunRecord, branch: str, *children: str,
                patch: dict[str, Any] | None = None) -> engine.Decision:
    """Branch `branch` returned Parallel(children)."""
    specs = tuple(BranchSpec(c, f"m:{c}", Q) for c in children)
    assert rec.fork is not None
    return engine.apply(rec, StepDone(rec.fork.token, 121.0, patch or {},
                                      FanOut(specs), branch), SPEC)


def test_a_branch_that_fans_out_again_sends_its_children_into_the_same_fork() -> None:
    rec = forked("x", "y")
    d = nested_done(rec, "x", "p", "q", patch={"a": 1})
    assert d.record is not None and d.record.fork is not None
    fork = d.record.fork
    assert fork.branches["x"].children == ["x/p", "x/q"]
    assert sorted(fork.leaves()) == ["x/p", "x/q", "y"]
    (cmd,) = d.commands
    assert isinstance(cmd, SendFork) and [t.branch for t in cmd.tasks] == ["x/p", "x/q"]
    assert cmd.token == fork.token
    assert fork.state_seen_by("x/p") == {"n": 1, "a": 1}  # what x set before fanning out
    assert [h["event"] for h in d.history] == ["branch_forked"]
    assert not nested_done(d.record, "x", "p").changed  # a duplicate of x: x runs no more
    assert not engine.apply(d.record, Join(fork.token, 122.0, {  # x's children unfinished
        "y": result("Y"), "x": result("X")}), SPEC).changed


def test_a_nested_fan_out_gathers_into_its_branch() -> None:
    rec = nested_done(forked("x", "y"), "x", "p", "q", patch={"a": 1}).record
    assert rec is not None and rec.fork is not None
    d = engine.apply(rec, Join(rec.fork.token, 123.0, {
        "y": result("Y", {"logs": ["y"]}), "x/p": result("P", {"logs": ["p"]}),
        "x/q": result("Q")}), SPEC)
    assert d.record is not None and sent(d) == ["C"]
    assert d.record.step_results["x"] == {"p": "P", "q": "Q"}
    assert d.record.step_results["y"] == "Y" and "x/p" not in d.record.step_results
    assert d.record.state == {"n": 1, "a": 1, "logs": ["p", "y"]}
    assert d.record.task is not None and d.record.task.token == rec.fork.then_token


def test_a_parallel_nested_in_the_definition_is_flattened_at_the_fork() -> None:
    inner = (BranchSpec("a", "m:a", Q), BranchSpec("b", "m:b", Q, item=1, has_item=True))
    out = FanOut((BranchSpec("w", "", Q, children=inner), BranchSpec("y", "m:y", Q)), "C")
    d = done(started(), out)
    assert d.record is not None and d.record.fork is not None
    (cmd,) = d.commands
    assert isinstance(cmd, SendFork) and [t.branch for t in cmd.tasks] == ["w/a", "w/b", "y"]
    j = engine.apply(d.record, Join(d.record.fork.token, 121.0, {
        "w/a": result("A"), "w/b": result("B"), "y": result("Y")}), SPEC)
    assert j.record is not None and j.record.step_results["w"] == {"a": "A", "b": ["B"]}


def test_a_failing_nested_branch_revokes_every_live_branch() -> None:
    rec = nested_done(forked("x", "y"), "x", "p", "q").record
    assert rec is not None and rec.fork is not None
    error = RunError(type="RuntimeError", message="on fire")
    d = engine.apply(rec, StepFailed(rec.fork.token, 122.0, error, branch="x/p"), SPEC)
    assert d.record is not None and d.record.status is RunStatus.FAILED
    assert d.record.error is not None and d.record.error.step == "A[x/p]"
    (revoke,) = d.commands
    assert isinstance(revoke, Revoke) and ids(revoke) == ("r1:2:y:1", "r1:2:x/q:1")


# ---- recovery -------------------------------------------------------------------------


def test_tick_resends_lost_work_but_not_live_or_queued_work() -> None:
    rec = started()  # A was sent at 100
    assert engine.next_due(rec, 60, 5) == 160.0
    assert not engine.apply(rec, Tick(150.0), SPEC).changed  # not yet overdue
    live = Tick(170.0, live_tasks=frozenset({"1"}))
    assert not engine.apply(rec, live, SPEC).changed
    queued = Tick(170.0, busy_queues=frozenset({"q"}))
    assert not engine.apply(rec, queued, SPEC).changed
    d = engine.apply(rec, Tick(170.0), SPEC)
    assert d.record is not None and sent(d) == ["A"]
    assert d.record.task is not None and d.record.task.attempt == 2
    forced = engine.apply(rec, Tick(4000.0, busy_queues=frozenset({"q"})), SPEC)
    assert sent(forced) == ["A"]


# ---- properties ------------------------------------------------------------------------

EVENTS = st.sampled_from(["done_B", "done_END", "fail", "pause", "resume", "stop", "tick"])


@settings(max_examples=200, deadline=None)
@given(st.lists(EVENTS, max_size=25))
def test_any_event_sequence_keeps_the_invariants(script: list[str]) -> None:
    rec = started()
    now = 100.0
    for name in script:
        now += 1.0
        token = rec.task.token if rec.task is not None else 0
        event: engine.Event = {
            "done_B": StepDone(token, now, {}, goto("B")),
            "done_END": StepDone(token, now, {}, goto(END)),
            "fail": StepFailed(token, now, RunError(type="E", message="m")),
            "pause": Pause(now), "resume": Resume(now), "stop": Stop(now), "tick": Tick(now),
        }[name]
        try:
            d = engine.apply(rec, event, SPEC)
        except ControlError:
            assert rec.status.is_terminal  # control is refused only once it is over
            continue
        if d.record is None:
            continue
        assert d.record.seq >= rec.seq
        if rec.status.is_terminal:
            raise AssertionError("a finished run changed")
        if d.record.paused:
            assert not any(isinstance(c, SendTask) for c in d.commands)
        tokens = [c.task.token for c in d.commands if isinstance(c, SendTask)]
        assert len(tokens) == len(set(tokens))
        rec = d.record


FORK_ACTIONS = st.lists(st.tuples(
    st.sampled_from(["finish"] * 6 + ["expand"] * 3 + ["join"] * 2 + ["fail", "tick", "pause",
                                                                      "resume"]),
    st.integers(min_value=0, max_value=7)), max_size=30)


def _nested_output(fork: Any, name: str, results: dict[str, BranchResult]) -> Any:
    b = fork.branches[name]
    if b.children is None:
        return results[name].output
    return {c.rsplit("/", 1)[-1]: _nested_output(fork, c, results) for c in b.children}


@settings(max_examples=200, deadline=None)
@given(FORK_ACTIONS)
def test_any_fork_script_joins_once_with_every_leaf(script: list[tuple[str, int]]) -> None:
    rec = forked("x", "y")
    fork_at_start = rec.fork
    assert fork_at_start is not None
    token = fork_at_start.token
    results: dict[str, BranchResult] = {}
    now = 121.0
    for action, pick in script:
        now += 1.0
        if rec.fork is None:
            break
        open_leaves = [n for n, b in rec.fork.leaves().items()  # running: sent, unfinished
                       if b.task.dispatched_at is not None and n not in results]
        leaf = open_leaves[pick % len(open_leaves)] if open_leaves else None
        event: engine.Event | None = None
        if action == "finish" and leaf is not None:
            results[leaf] = result(f"out:{leaf}", at=now)  # recorded beside the record
            continue
        if action == "expand" and leaf is not None and leaf.count("/") < 3:
            specs = (BranchSpec("p", "m:p", Q), BranchSpec("q", "m:q", Q))
            event = StepDone(token, now, {}, FanOut(specs), leaf)
        elif action == "fail" and leaf is not None and pick == 0:  # rare: it ends the run
            event = StepFailed(token, now, RunError(type="E", message="m"), branch=leaf)
        elif action == "join":
            event = Join(token, now, dict(results))
        elif action == "tick":
            event = Tick(now, join_after=0.0, branch_results=dict(results))
        elif action == "pause":
            event = Pause(now)
        elif action == "resume":
            event = Resume(now)
        if event is None:
            continue
        before = rec
        try:
            d = engine.apply(rec, event, SPEC)
        except ControlError:
            continue
        if d.record is None:
            continue
        assert before.fork is not None
        for cmd in d.commands:  # only open leaves of this fork are ever sent
            tasks = cmd.tasks if isinstance(cmd, SendFork) else (
                (cmd.task,) if isinstance(cmd, SendTask) and cmd.task.branch else ())
            for t in tasks:
                assert d.record.fork is not None and t.branch in d.record.fork.leaves()
                assert t.branch not in results
        if d.record.fork is None and d.record.status is RunStatus.RUNNING:
            # joined: every leaf had a result, and each output landed where it belongs
            assert before.fork.complete(results)
            for top in (n for n in before.fork.branches if "/" not in n):
                assert d.record.step_results[top] == _nested_output(before.fork, top, results)
            assert d.record.task is not None and d.record.task.token == before.fork.then_token
            nested = any(not b.is_leaf for b in before.fork.branches.values())
            hypothesis_event("joined a nested fork" if nested else "joined a flat fork")
        rec = d.record


# ---- one policy, carried from the definition to every task -------------------------------


def test_a_branch_retries_with_its_whole_policy() -> None:
    """Branches used to lose backoff_factor and max_backoff on the way to the task."""
    policy = StepPolicy(queue="q", retries=3, backoff=1.0, backoff_factor=10, max_backoff=1.5)
    rec = done(started(), FanOut((BranchSpec("x", "m:x", policy),), "C")).record
    assert rec is not None and rec.fork is not None
    error = RunError(type="ConnectionError", message="boom")
    waits = []
    for attempt, now in ((1, 130.0), (2, 140.0), (3, 150.0)):
        d = engine.apply(rec, StepFailed(rec.fork.token, now, error, branch="x",
                                         attempt=attempt), SPEC)
        assert d.record is not None and d.record.fork is not None
        task = d.record.fork.branches["x"].task
        waits.append(task.due_at - now)
        rec = d.record
    assert waits == [1.0, 1.5, 1.5]  # 1.0, then min(1.5, 10.0), then capped again


def test_jitter_spreads_retries_deterministically() -> None:
    policy = StepPolicy(backoff=10.0, jitter=0.5)
    spread = {policy.delay_before(2, f"run{i}:1") for i in range(20)}
    assert len(spread) > 10 and all(5.0 <= d <= 15.0 for d in spread)
    assert policy.delay_before(2, "run1:1") == policy.delay_before(2, "run1:1")


def test_retry_on_decides_which_errors_retry() -> None:
    from orchestrator import NonRetryable

    only_io = StepPolicy(retry_on=(OSError,))
    assert only_io.retries_error(ConnectionError()) and not only_io.retries_error(KeyError())
    assert not StepPolicy().retries_error(NonRetryable("no"))
    assert StepPolicy(retry_on=lambda e: "flaky" in str(e)).retries_error(RuntimeError("flaky"))
    assert "retry_on" not in Task(step="A", token=1, policy=only_io).model_dump_json()


# ---- branch completion rules -------------------------------------------------------------


def test_settle_branch_keeps_a_success_and_routes_the_rest_through_apply() -> None:
    rec = forked("x", "y")
    assert rec.fork is not None
    token = rec.fork.token
    ok = StepDone(token, 130.0, {"a": 1}, GoTo(END, "out", True), "x")
    kept = engine.settle_branch(rec, ok, succeeded=False)
    assert isinstance(kept, engine.KeepBranch)
    assert kept.result.output == "out" and kept.width == 2
    error = RunError(type="E", message="m")
    failed = StepFailed(token, 130.0, error, branch="x")
    assert isinstance(engine.settle_branch(rec, failed, succeeded=True), engine.IgnoreBranch)
    routed = engine.settle_branch(rec, failed, succeeded=False)
    assert isinstance(routed, engine.ApplyToRun) and routed.event.attempt == 1
    nested = StepDone(token, 130.0, {}, FanOut((BranchSpec("p", "m:p", Q),)), "x")
    assert isinstance(engine.settle_branch(rec, nested, succeeded=False), engine.ApplyToRun)
    stale = StepDone(token + 7, 130.0, {}, GoTo(END), "x")
    assert isinstance(engine.settle_branch(rec, stale, succeeded=False), engine.IgnoreBranch)


def test_the_sweep_leaves_a_task_whose_message_still_waits() -> None:
    rec = started()
    assert rec.task is not None and rec.task.dispatched_at is not None
    late = rec.task.dispatched_at + 120
    queued = Tick(late, redispatch_after=60, queued=frozenset({rec.task.lease_id}))
    assert not engine.apply(rec, queued, SPEC).changed
    lost = engine.apply(rec, Tick(late, redispatch_after=60), SPEC)
    assert lost.record is not None and lost.record.task is not None
    assert lost.record.task.attempt == 2 and any(isinstance(c, SendTask) for c in lost.commands)


def test_work_lost_again_and_again_fails_the_run_instead_of_looping() -> None:
    rec = started()
    sends = 0
    now = 200.0
    while not rec.status.is_terminal:
        assert rec.task is not None
        now += 100
        d = engine.apply(rec, Tick(now, redispatch_after=60), SPEC)
        assert d.record is not None
        rec = d.record
        sends += sum(isinstance(c, SendTask) for c in d.commands)
    assert sends == engine.LOST_ALLOWANCE  # attempts 2..4 were sent, the 5th was not
    assert rec.status is RunStatus.FAILED and rec.error is not None
    assert rec.error.type == "WorkerLost" and "lost 4 times" in rec.error.message
