"""One contract, every store: the same tests run on MemoryStore and RedisStore."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from orchestrator import _engine as engine
from orchestrator._engine import Expect, FanOut, GateSpec, GoTo, StepDone, WaitFor
from orchestrator._leases import LeaseKeeper
from orchestrator._records import (
    BranchResult,
    FlowSpec,
    RunRecord,
    RunStatus,
    StepPolicy,
    StepSpec,
)
from orchestrator._stores import CorruptRecord, MemoryStore, RedisStore, RunStore, Waits
from tests.conftest import wait_for

Q = StepSpec(StepPolicy(queue="q"))
SPEC = FlowSpec("W", "v1", {"__start__": Q, "B": Q})
OTHER = FlowSpec("V", "v1", {"__start__": Q})

MakeStore = Callable[..., RunStore]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """Stores of one kind, with the options given (retain_seconds, history_limit)."""
    made: list[RunStore] = []

    def make(**options: Any) -> RunStore:
        if request.param == "memory":
            made.append(MemoryStore("t:", **options))
        else:
            made.append(RedisStore(request.getfixturevalue("redis_url"), "t:", **options))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def store(make_store: MakeStore) -> RunStore:
    return make_store()


def new_run(store: RunStore, run_id: str = "r1", at: float | None = None,
            spec: FlowSpec = SPEC) -> RunRecord:
    d = engine.start(spec, run_id, {}, {}, store.now() if at is None else at)
    assert d.record is not None and store.create(d.record, d.history, d.record.created_at + 60)
    return d.record


def stop(store: RunStore, rec: RunRecord, version: int = 1) -> RunRecord:
    d = engine.apply(rec, engine.Stop(store.now()), SPEC)
    assert d.record is not None and store.commit(rec, version, d.record, d.history, None)
    return d.record


def corrupt(store: RunStore, run_id: str, text: str) -> None:
    """Spoil a stored record the way a bad write or a manual edit would."""
    if isinstance(store, MemoryStore):
        store._runs[run_id].doc = text
    else:
        assert isinstance(store, RedisStore)
        store.redis.hset(f"t:run:{{{run_id}}}", "doc", text)


def test_create_refuses_an_existing_id(store: RunStore) -> None:
    rec = new_run(store)
    assert not store.create(rec, [], None)
    loaded = store.load("r1")
    assert loaded.record == rec and loaded.version == 1
    assert [h["event"] for h in store.history("r1")] == ["started"]


def test_commit_is_a_compare_and_set(store: RunStore) -> None:
    rec = new_run(store)
    d = engine.apply(rec, StepDone(1, store.now(), {"x": 1}, GoTo("B")), SPEC)
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
    wait_for(lambda: not store.live_leases("r1", ["1"]), 5, what="the lease to lapse")


def test_starts_are_counted_across_lapsed_leases(store: RunStore) -> None:
    new_run(store)
    for expected in (1, 2, 3):  # a worker killed whole: each redelivery finds no lease
        assert store.begin_task("r1", "1", 0.05, attempt=2).starts == expected
        wait_for(lambda: not store.live_leases("r1", ["1"]), 5, what="the lease to lapse")
    assert store.begin_task("r1", "1", 0.05, attempt=3).starts == 1  # a new attempt
    assert store.begin_task("r1", "2", 0.05).starts == 1


def test_heartbeat_keeps_a_lease_alive(store: RunStore) -> None:
    new_run(store)
    ttl = 2.0  # renewed every ttl/3: only a stall of more than 1.3s could let it lapse
    began = store.begin_task("r1", "1", ttl)
    with LeaseKeeper(store).hold("r1", "1", ttl):
        wait_for(lambda: store.now() > began.now + 1.5 * ttl, 10, what="the first TTL to pass")
        assert store.live_leases("r1", ["1"]) == frozenset({"1"})  # renewed, or it had gone
    wait_for(lambda: not store.live_leases("r1", ["1"]), 10,
             what="the lease to lapse once nothing renews it")


def test_gate_indexes_follow_the_record(store: RunStore) -> None:
    rec = new_run(store)
    gate = GateSpec(approvers=("ann",), then="B")
    d = engine.apply(rec, StepDone(1, store.now(), {}, WaitFor(gate)), SPEC)
    assert d.record is not None and store.commit(rec, 1, d.record, d.history, None)
    assert [r.run_id for r in store.pending_gates()] == ["r1"]
    assert [r.run_id for r in store.pending_gates("ann")] == ["r1"]
    assert store.pending_gates("bob") == []
    assert [r.run_id for r in store.list_runs(RunStatus.WAITING)] == ["r1"]
    closed = engine.apply(d.record, engine.Decide(store.now(), True, "ann"), SPEC)
    assert closed.record is not None
    assert store.commit(d.record, 2, closed.record, closed.history, None)
    assert store.pending_gates() == [] and store.pending_gates("ann") == []


def test_totals_and_waits_follow_the_record(store: RunStore) -> None:
    """What metrics read: runs started and ended (counters that outlive the runs), the runs
    waiting at a gate or for an event with their oldest wait, and timers nobody claimed."""
    none = {"gate": Waits(0, None), "event": Waits(0, None)}
    assert store.run_totals("W") == dict.fromkeys(["started", "completed", "failed",
                                                   "stopped"], 0)
    assert store.waiting("W") == none
    gated, awaiting = new_run(store, "g"), new_run(store, "e")
    new_run(store, "v", spec=OTHER)
    assert store.run_totals("W")["started"] == 2 and store.run_totals("V")["started"] == 1
    gate = GateSpec(approvers=("ann",), then="B")
    at_gate = engine.apply(gated, StepDone(1, 50.0, {}, WaitFor(gate)), SPEC).record
    for_event = engine.apply(awaiting, StepDone(1, 40.0, {}, Expect("paid", "B")), SPEC).record
    assert at_gate is not None and for_event is not None
    assert store.commit(gated, 1, at_gate, [], None)
    assert store.commit(awaiting, 1, for_event, [], None)
    assert store.waiting("W") == {"gate": Waits(1, 50.0), "event": Waits(1, 40.0)}
    assert store.waiting("V") == none
    quarantined = new_run(store, "q")  # a corrupt record leaves the wait indexes too
    older = engine.apply(quarantined, StepDone(1, 45.0, {}, WaitFor(gate)), SPEC).record
    assert older is not None and store.commit(quarantined, 1, older, [], None)
    assert store.waiting("W")["gate"] == Waits(2, 45.0)
    store.quarantine("q")
    assert store.waiting("W")["gate"] == Waits(1, 50.0)
    # An approval short of min_approvals, or any other commit, leaves the wait as it began.
    paused = engine.apply(at_gate, engine.Pause(60.0), SPEC).record
    assert paused is not None and store.commit(at_gate, 2, paused, [], None)
    assert store.waiting("W")["gate"] == Waits(1, 50.0)
    stop(store, paused, 3)
    received = engine.apply(for_event, engine.Deliver(70.0, "paid", 1), SPEC).record
    assert received is not None and store.commit(for_event, 2, received, [], None)
    assert store.waiting("W") == none
    assert store.run_totals("W") == {"started": 3, "completed": 0, "failed": 0, "stopped": 1}
    store.set_due("late", store.now() - 30)
    store.set_due("soon", store.now() + 30)
    assert store.count_overdue(store.now() - 10) == 1
    assert store.count_overdue(store.now() + 60) >= 2


def test_branch_results_are_kept_once_per_open_fork(store: RunStore) -> None:
    rec = new_run(store)
    out = FanOut((engine.BranchSpec("x", "m:x", Q.policy), engine.BranchSpec("y", "m:y", Q.policy)),
                 "B")
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
    numbers = [e["n"] for e in store.history("r1")]  # created, committed, branches, stopped
    assert numbers == list(range(len(numbers))) and len(numbers) > 4


def test_notes_append_without_touching_the_record(store: RunStore) -> None:
    new_run(store)
    store.note("r1", {"event": "ignored"})
    assert store.load("r1").version == 1
    assert store.history("r1")[-1] == {"n": 1, "event": "ignored"}
    store.note("nope", {"event": "ignored"})  # no run, nothing written
    assert store.history("nope") == []



def test_history_keeps_its_head_and_tail(make_store: MakeStore,
                                         request: pytest.FixtureRequest) -> None:
    store = make_store(history_limit=3)
    new_run(store)  # entry 0: started
    for i in range(1, 10):
        store.note("r1", {"event": "tick", "i": i})
    trimmed = {"event": "history_trimmed", "dropped": 4}
    assert [e.get("n") for e in store.history("r1")] == [0, 1, 2, None, 7, 8, 9]
    assert store.history("r1")[3] == trimmed
    assert store.history("r1")[4] == {"n": 7, "event": "tick", "i": 7}
    assert [e.get("n") for e in store.history("r1", 5)] == [None, 7, 8, 9]
    assert store.history("r1", 5)[0] == {"event": "history_trimmed", "dropped": 2}
    assert [e["n"] for e in store.history("r1", 1, 2)] == [1, 2]
    assert [e["n"] for e in store.history("r1", 8)] == [8, 9]
    assert [e["n"] for e in store.history("r1", -2)] == [8, 9]
    assert store.history("r1", 10) == []
    if isinstance(store, RedisStore):  # the lists stay at the limit, however long the run
        client = request.getfixturevalue("rclient")
        assert client.llen("t:run:{r1}:history") == client.llen("t:run:{r1}:history:tail") == 3


def test_a_follower_sees_each_entry_once(make_store: MakeStore) -> None:
    store = make_store(history_limit=2)
    new_run(store)
    seen: list[int] = []
    start = 0
    for i in range(1, 12):
        store.note("r1", {"event": "tick", "i": i})
        if i % 3 == 0:  # reads every third append, so it falls behind the kept tail
            numbered = [e["n"] for e in store.history("r1", start) if "n" in e]
            seen += numbered
            start = numbered[-1] + 1
    assert seen == sorted(set(seen)) and seen[-1] == 9
    assert [e.get("n") for e in store.history("r1", start)] == [10, 11]


def test_a_finished_run_leaves_nothing_behind(make_store: MakeStore,
                                              request: pytest.FixtureRequest) -> None:
    store = make_store(retain_seconds=1, history_limit=2)
    kept = new_run(store, "kept")
    rec = new_run(store)
    gate = GateSpec(approvers=("ann",), then="B")
    d = engine.apply(rec, StepDone(1, store.now(), {}, WaitFor(gate)), SPEC)
    assert d.record is not None and store.commit(rec, 1, d.record, d.history, None)
    store.begin_task("r1", "1", 0.2, attempt=1)  # a lease and a starts counter
    for i in range(5):
        store.note("r1", {"event": "tick", "i": i})  # a tail of history too
    stop(store, d.record, 2)
    store.note("r1", {"event": "ignored"})  # written after it finished: goes with it
    wait_for(lambda: store.load("r1").record is None, 10, what="the run's retention to end")
    assert store.history("r1") == []
    wait_for(lambda: store.purge_expired() == 1, 10, what="the purge")
    assert store.purge_expired() == 0
    assert [r.run_id for r in store.list_runs()] == ["kept"]
    assert store.count_runs()[RunStatus.STOPPED] == 0
    assert store.count_runs()[kept.status] == 1
    assert store.find_run_ids("r") == [] and store.pending_gates() == []
    if isinstance(store, RedisStore):
        client = request.getfixturevalue("rclient")
        wait_for(lambda: not client.keys("t:run:{r1}*"), 10, what="every key of r1 to expire")
        assert client.keys("t:run:{kept}*")
        for key in client.keys("t:*"):
            kind = client.type(key).decode()
            members = (client.zrange(key, 0, -1) if kind == "zset" else
                       client.smembers(key) if kind == "set" else
                       client.hkeys(key) if kind == "hash" else [])
            assert b"r1" not in members, key
    else:
        assert isinstance(store, MemoryStore) and set(store._runs) == {"kept"}


def test_an_id_used_again_after_its_run_expired(make_store: MakeStore) -> None:
    store = make_store(retain_seconds=1)
    stop(store, new_run(store))
    wait_for(lambda: store.load("r1").record is None, 10, what="the run's retention to end")
    again = new_run(store)  # before the purge has run
    wait_for(lambda: store.now() > again.created_at + 2.5, 10, what="the old expiry to pass")
    assert store.purge_expired() == 0  # the new run's entries are not the old one's
    assert [r.run_id for r in store.list_runs(RunStatus.RUNNING)] == ["r1"]
    assert store.count_runs()[RunStatus.STOPPED] == 0


def test_runs_are_listed_newest_first_filtered_and_paged(store: RunStore) -> None:
    base = store.now()
    made = [new_run(store, f"a{i}", base + i, SPEC if i % 2 else OTHER) for i in range(6)]
    made += [new_run(store, "b0", base + 2), new_run(store, "b1", base + 2)]  # ties with a2
    for rec in made[1], made[4]:
        stop(store, rec)
    newest_first = ["a5", "a4", "a3", "b1", "b0", "a2", "a1", "a0"]
    assert [r.run_id for r in store.list_runs()] == newest_first
    assert [r.run_id for r in store.list_runs(limit=3)] == newest_first[:3]

    def pages(status: RunStatus | None = None, workflow: str | None = None) -> list[str]:
        ids: list[str] = []
        cursor = None
        while True:
            page = store.page_runs(status, workflow, limit=2, cursor=cursor)
            assert len(page.records) <= 2
            ids += [r.run_id for r in page.records]
            if page.next_cursor is None:
                return ids
            cursor = page.next_cursor

    assert pages() == newest_first
    assert pages(RunStatus.STOPPED) == ["a4", "a1"]
    assert pages(workflow="V") == ["a4", "a2", "a0"]
    assert pages(RunStatus.RUNNING, "V") == ["a2", "a0"]
    assert [r.run_id for r in store.list_runs(workflow="W")] == ["a5", "a3", "b1", "b0", "a1"]
    assert [r.run_id for r in store.list_runs(RunStatus.STOPPED, "W")] == ["a1"]
    last = store.page_runs(limit=8)
    assert len(last.records) == 8 and last.next_cursor is None

    assert store.count_runs() == {**dict.fromkeys(RunStatus, 0), RunStatus.RUNNING: 6,
                                  RunStatus.STOPPED: 2}
    assert store.count_runs("V") == {**dict.fromkeys(RunStatus, 0), RunStatus.RUNNING: 2,
                                     RunStatus.STOPPED: 1}
    assert store.find_run_ids("a") == ["a0", "a1", "a2", "a3", "a4", "a5"]
    assert store.find_run_ids("a", limit=2) == ["a0", "a1"]
    assert store.find_run_ids("b1") == ["b1"] and store.find_run_ids("c") == []
    with pytest.raises(ValueError, match="cursor"):
        store.page_runs(cursor="nonsense")


def test_a_corrupt_record_is_reported_skipped_and_quarantined(store: RunStore) -> None:
    rec = new_run(store)
    gate = GateSpec(approvers=("ann",), then="B")
    d = engine.apply(rec, StepDone(1, store.now(), {}, WaitFor(gate)), SPEC)
    assert d.record is not None and store.commit(rec, 1, d.record, d.history, store.now() - 1)
    new_run(store, "r2")
    corrupt(store, "r1", '{"run_id": "r1", "status": "sideways"')
    with pytest.raises(CorruptRecord) as caught:
        store.load("r1")
    assert not isinstance(caught.value, ValueError)  # the CLI's "invalid input"
    assert caught.value.run_id == "r1" and caught.value.raw.endswith('"sideways"')
    with pytest.raises(CorruptRecord):
        store.begin_task("r1", "1", 1.0)
    assert [r.run_id for r in store.list_runs()] == ["r2"]
    assert [r.run_id for r in store.page_runs(RunStatus.WAITING).records] == []
    assert store.pending_gates() == [] and store.pending_gates("ann") == []
    raw = store.raw("r1")
    assert raw is not None and raw["doc"] == '{"run_id": "r1", "status": "sideways"'
    assert store.raw("nope") is None

    store.quarantine("r1")
    assert store.corrupt_runs() == ["r1"]
    assert store.claim_due(10, 30) == []  # its timer was due: the sweep no longer sees it
    assert store.count_runs()[RunStatus.WAITING] == 0
    assert store.find_run_ids("r") == ["r1", "r2"]  # still addressable, for `status --raw`


def test_a_run_written_before_histories_were_capped_keeps_numbering(redis_url: str) -> None:
    """Runs in flight across the upgrade have no history counters: the next append
    starts numbering after what their list holds."""
    store = RedisStore(redis_url, "old:")
    rec = new_run(store)
    key = f"old:run:{{{rec.run_id}}}"
    client = store.redis
    client.hdel(key, "hl", "hn")
    client.rpush(f"{key}:history", json.dumps({"event": "legacy"}))
    store.note(rec.run_id, {"event": "after_upgrade"})
    entries = store.history(rec.run_id)
    assert [e.get("event") for e in entries][-2:] == ["legacy", "after_upgrade"]
    assert entries[-1]["n"] == len(entries) - 1
    store.close()


def test_a_timer_reset_from_a_stale_read_changes_nothing(store: RunStore) -> None:
    """The sweep resets a timer only if the record is still what it decided from: a commit
    in between (a step that went to sleep, say) set the timer that counts."""
    rec = new_run(store)
    now = store.now()
    d = engine.apply(rec, StepDone(1, now, {}, GoTo("B")), SPEC)
    assert d.record is not None and store.commit(rec, 1, d.record, d.history, now + 1000)
    store.set_due(rec.run_id, now - 1, version=1)  # decided from version 1: refused
    assert store.claim_due(10, 30) == []  # still the commit's timer, far ahead
    store.set_due(rec.run_id, now - 1, version=2)
    assert store.claim_due(10, 30) == [rec.run_id]
