"""One contract, every store: the same tests run on MemoryStore and RedisStore."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from orchestrator import _engine as engine
from orchestrator._engine import GateSpec, Outcome, StepDone
from orchestrator._records import BranchResult, FlowSpec, RunRecord, RunStatus, StepSpec
from orchestrator._stores import MemoryStore, RedisStore, RunStore

SPEC = FlowSpec("W", "v1", {"__start__": StepSpec("q"), "B": StepSpec("q")})


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[RunStore]:
    if request.param == "memory":
        yield MemoryStore("t:")
        return
    s = RedisStore(request.getfixturevalue("redis_url"), "t:")
    yield s
    s.close()


def new_run(store: RunStore, run_id: str = "r1") -> RunRecord:
    d = engine.start(SPEC, run_id, {}, {}, store.now())
    assert d.record is not None and store.create(d.record, d.history, d.record.created_at + 60)
    return d.record


def test_create_refuses_an_existing_id(store: RunStore) -> None:
    rec = new_run(store)
    assert not store.create(rec, [], None)
    loaded = store.load("r1")
    assert loaded.record == rec and loaded.version == 1
    assert [h["event"] for h in store.history("r1")] == ["started"]


def test_commit_is_a_compare_and_set(store: RunStore) -> None:
    rec = new_run(store)
    d = engine.apply(rec, StepDone(1, store.now(), {"x": 1}, Outcome("goto", "B")), SPEC)
    assert d.record is not None
    assert store.commit(rec, 1, d.record, d.history, None)
    assert not store.commit(rec, 1, d.record, d.history, None)  # stale version
    assert store.load("r1").version == 2
    assert [h["event"] for h in store.history("r1")] == ["started", "step_completed"]
    assert store.history("r1", 1) == store.history("r1")[1:]


def test_timers_are_claimed_once(store: RunStore) -> None:
    rec = new_run(store)
    assert store.claim_due(10, 30) == []  # due in 60s
    store.set_due(rec.run_id, store.now() - 1)
    assert store.claim_due(10, 30) == ["r1"]
    assert store.claim_due(10, 30) == []  # held for 30s by the first claimer


def test_leases_live_and_lapse(store: RunStore) -> None:
    new_run(store)
    began = store.begin_task("r1", "1", 0.3)
    assert began.record is not None and began.starts == 1
    assert store.begin_task("r1", "1", 0.3).starts == 2  # a redelivery while it lives
    assert store.live_leases("r1", ["1", "2"]) == frozenset({"1"})
    deadline = time.monotonic() + 5
    while store.live_leases("r1", ["1"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.live_leases("r1", ["1"]) == frozenset()


def test_heartbeat_keeps_a_lease_alive(store: RunStore) -> None:
    new_run(store)
    store.begin_task("r1", "1", 0.3)
    with store.lease("r1", "1", 0.3):
        until = time.monotonic() + 0.6  # two TTLs: only the heartbeat keeps it alive
        while time.monotonic() < until:
            assert store.live_leases("r1", ["1"]) == frozenset({"1"})
            time.sleep(0.02)


def test_gate_indexes_follow_the_record(store: RunStore) -> None:
    rec = new_run(store)
    gate = GateSpec(approvers=("ann",), then="B")
    d = engine.apply(rec, StepDone(1, store.now(), {}, Outcome("wait", "B", gate=gate)), SPEC)
    assert d.record is not None and store.commit(rec, 1, d.record, d.history, None)
    assert [r.run_id for r in store.pending_gates()] == ["r1"]
    assert [r.run_id for r in store.pending_gates("ann")] == ["r1"]
    assert store.pending_gates("bob") == []
    assert [r.run_id for r in store.list_runs(RunStatus.WAITING)] == ["r1"]
    closed = engine.apply(d.record, engine.Decide(store.now(), True, "ann"), SPEC)
    assert closed.record is not None
    assert store.commit(d.record, 2, closed.record, closed.history, None)
    assert store.pending_gates() == [] and store.pending_gates("ann") == []


def test_branch_results_are_kept_once_per_open_fork(store: RunStore) -> None:
    rec = new_run(store)
    out = Outcome("parallel", "B", branches=(engine.BranchSpec("x", "m:x", "q"),
                                             engine.BranchSpec("y", "m:y", "q")))
    d = engine.apply(rec, StepDone(1, store.now(), {}, out), SPEC)
    assert d.record is not None and d.record.fork is not None
    assert store.commit(rec, 1, d.record, d.history, None)
    token = d.record.fork.token
    entry = {"event": "branch_completed"}
    result = BranchResult(output=1, finished_at=store.now())
    assert store.record_branch("r1", token, "x", result, entry, "2:x", 2, 1.0) == 1
    assert store.record_branch("r1", token, "x", result, entry, "2:x", 2, 1.0) is None
    assert store.record_branch("r1", token + 1, "y", result, entry, "9:y", 2, 1.0) is None
    assert store.record_branch("r1", token, "y", result, entry, "2:y", 2, 1.0) == 2
    assert set(store.branch_results("r1", token)) == {"x", "y"}
    assert store.claim_due(10, 30) == ["r1"]  # the last branch brought the timer forward
    stopped = engine.apply(d.record, engine.Stop(store.now()), SPEC)
    assert stopped.record is not None
    assert store.commit(d.record, 2, stopped.record, stopped.history, None)
    assert store.branch_results("r1", token) == {}  # dropped with the fork
    assert store.record_branch("r1", token, "x", result, entry, "2:x", 2, 1.0) is None


def test_notes_append_without_touching_the_record(store: RunStore) -> None:
    new_run(store)
    store.note("r1", {"event": "ignored"})
    assert store.load("r1").version == 1
    assert store.history("r1")[-1] == {"event": "ignored"}
