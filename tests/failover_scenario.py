"""Runs in flight across a Sentinel failover: the driver tests/test_failover.py and
bench/failover.py share.

A coordinator and workers (real `orchestrator` processes) run `failover_flows.failover`
through a `redis+sentinel://` URL. Half the runs stop at a gate. Once part of the work is
done, every run waiting at its gate is approved (wave A, each approval acknowledged by the
store), and the primary is SIGKILLed at once. The sentinels promote the replica; the killed
node comes back as a replica of the new primary (with MIN_REPLICAS_ACK=1 and one replica,
nothing can commit until a replica is back). Gates reached after that are approved as they
open (wave B). Then every run must complete, with each step's state change committed once.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from orchestrator import ControlError, RunStatus, StoreUnavailable, WorkflowRunner
from orchestrator._stores import RedisStore
from tests import failover_flows as ff
from tests.conftest import Cluster, RedisServer, wait_for
from tests.sentinels import SentinelDeployment

WIDTH = 3
STEPS_PER_RUN = 4 + WIDTH  # Prep, Fan, the leaves, Gather, Finish


@dataclasses.dataclass
class Figures:
    runs: int
    gated: int
    replicas: int
    min_replicas_ack: int
    workers: int
    concurrency: int
    rejoin: str  # how the killed primary came back: replica, sentinel, none
    approved_before_kill: int = 0
    approved_after_kill: int = 0
    approvals_lost: int = 0  # approved before the kill, at the gate again after it
    started_at_kill: int = 0  # runs started when the primary died
    done_at_kill: float = 0.0  # share of the work executed then
    promoted_after: float = 0.0  # seconds from the SIGKILL to a promoted primary
    replica_back_after: float = 0.0  # ... to the killed node replicating the new primary
    #                                   (with one replica and MIN_REPLICAS_ACK=1 nothing
    #                                   commits before that)
    first_commit_after: float = 0.0  # ... to the first commit acknowledged as the cluster's
    #                                   are (a probe commits every 20 ms from the kill on)
    last_start_after: float = 0.0  # ... to the last run started (runs start across it)
    all_done_after: float = 0.0  # ... to every run completed
    executions: int = 0  # step and branch executions (side channel)
    tokens: int = 0  # distinct idempotency keys executed
    redelivered: int = 0  # executions beyond the first, per key
    applied_twice: int = 0  # must be 0: effects are SET NX per key
    wall: float = 0.0  # seconds for the whole scenario, cluster start to checks done

    def lines(self) -> list[str]:
        return [f"{f.name}: {getattr(self, f.name):.2f}" if isinstance(getattr(self, f.name),
                float) else f"{f.name}: {getattr(self, f.name)}"
                for f in dataclasses.fields(self)]


def _retry(fn: Any, deadline: float) -> Any:
    """`fn()`, again while Redis is away (as an app would retry)."""
    while True:
        try:
            return fn()
        except (StoreUnavailable, redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _probe(cluster: Cluster, killed: float, figures: Figures, deadline: float) -> None:
    """From the kill on, commit a small record (a run of its own, in a key prefix no
    coordinator sweeps) every 20 ms, with the cluster's settings, until one succeeds."""
    from orchestrator import _engine as engine
    from orchestrator._records import FlowSpec, StepPolicy, StepSpec

    spec = FlowSpec("Probe", "v1", {"__start__": StepSpec(StepPolicy(queue="none"))})
    store = RedisStore.from_settings(cluster.settings, "probe:")
    try:
        for n in range(1_000_000):
            try:
                d = engine.start(spec, f"p{n}", {}, {}, store.now())
                assert d.record is not None
                if store.create(d.record, d.history, None):
                    figures.first_commit_after = time.monotonic() - killed
                    return
            except StoreUnavailable:
                pass
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
    finally:
        store.close()


def run_scenario(deployment: SentinelDeployment, side: RedisServer, tmp: Path, *,
                 runs: int, workers: int = 2, concurrency: int = 2, min_replicas_ack: int = 1,
                 kill_at: float = 0.5, feed_seconds: float | None = None,
                 rejoin: str = "replica", timeout: float = 240) -> Figures:
    started = time.monotonic()
    feed_seconds = runs * 0.04 if feed_seconds is None else feed_seconds
    deadline = started + timeout
    side_client = side.client()
    side_client.flushall()
    env = {"ORCHESTRATOR_WORKFLOWS": "tests.failover_flows", ff.SIDE_URL: side.url,
           "ORCHESTRATOR_MIN_REPLICAS_ACK": str(min_replicas_ack)}
    os.environ[ff.SIDE_URL] = side.url
    figures = Figures(runs, (runs + 1) // 2, len(deployment.data) - 1, min_replicas_ack, workers,
                      concurrency, rejoin)
    cluster = Cluster(deployment.url(), tmp, **env)
    store = RedisStore.from_settings(cluster.settings, ff.failover.persistence_options.key_prefix)
    try:
        cluster.coordinator("coord")
        for i in range(workers):
            cluster.worker(f"w{i + 1}", concurrency)
        runner = WorkflowRunner(ff.failover, app=cluster.app)
        gated = {f"fo{i}" for i in range(0, runs, 2)}
        total_work = runs * STEPS_PER_RUN
        started_runs: list[str] = []

        def feed() -> None:
            # Runs start one by one over `feed_seconds`, so the kill finds them at every
            # stage: queued, running a step, forked, at a gate; the later ones start while
            # the primary is down (start() retried, as an app would).
            for i in range(runs):
                run_id = f"fo{i}"
                _retry(lambda r=run_id: runner.run({"gated": r in gated, "width": WIDTH},
                                                   run_id=r), deadline)
                started_runs.append(run_id)
                time.sleep(feed_seconds / runs)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()

        def executed() -> int:
            return sum(int(v) for v in side_client.mget(
                side_client.keys("exec:*") or ["-"]) if v is not None)

        wait_for(lambda: len(started_runs) >= kill_at * runs and store.pending_gates(),
                 deadline - time.monotonic(), 0.05, what="runs under way and gates open")
        approved: set[str] = set()
        # Wave A: every gate open now is approved, each approval acknowledged by the store
        # (and by min_replicas_ack replicas); the primary dies right after the last one.
        for rec in store.pending_gates(ff.APPROVER):
            runner.attach(rec.run_id).approve(by=ff.APPROVER, comment="before the kill")
            approved.add(rec.run_id)
        figures.approved_before_kill = len(approved)
        figures.started_at_kill = len(started_runs)
        figures.done_at_kill = executed() / total_work
        old, killed = deployment.kill_primary()
        probe = threading.Thread(target=_probe, args=(cluster, killed, figures, deadline),
                                 daemon=True)
        probe.start()
        new = deployment.wait_promoted(old, deadline - time.monotonic())
        figures.promoted_after = time.monotonic() - killed
        if rejoin != "none":
            # "replica": restarted with the current topology; "sentinel": restarted as it
            # was, and left to the sentinels to turn into a replica.
            deployment.rejoin(old, replica_of=new if rejoin == "replica" else None)
            figures.replica_back_after = time.monotonic() - killed

        # Wave B: gates that open from now on, approved as they open (retried while Redis
        # is away; an approval that raised may have been committed: a second one then
        # finds no gate, which is fine).
        stop = threading.Event()

        def approve_late() -> None:
            while not stop.is_set():
                try:
                    waiting = [r.run_id for r in store.pending_gates(ff.APPROVER)]
                except StoreUnavailable:
                    waiting = []
                for run_id in waiting:
                    if run_id in approved:
                        # Approved before the kill, and at its gate again: that approval
                        # was lost with the primary. Counted, then approved again.
                        lost.add(run_id)
                    try:
                        runner.attach(run_id).approve(by=ff.APPROVER, comment="after")
                        late.add(run_id)
                    except ControlError:
                        pass  # an earlier attempt that raised was committed after all
                    except Exception:  # Redis or the broker away: the app tries again
                        pass
                stop.wait(0.1)

        late: set[str] = set()
        lost: set[str] = set()
        approver = threading.Thread(target=approve_late, daemon=True)
        approver.start()

        def all_completed() -> bool:
            counts = _retry(lambda: store.count_runs(ff.failover.name), deadline)
            return counts[RunStatus.COMPLETED] == runs

        try:
            wait_for(lambda: len(started_runs) == runs, deadline - time.monotonic(), 0.1,
                     what="every run to be started")
            figures.last_start_after = time.monotonic() - killed
            wait_for(all_completed, deadline - time.monotonic(), 0.2,
                     what=f"all {runs} runs to complete")
        except AssertionError:
            counts = store.count_runs(ff.failover.name)
            raise AssertionError(f"not all runs completed: {counts}\n"
                                 f"{cluster.logs()}") from None
        finally:
            stop.set()
            approver.join(10)
        figures.all_done_after = time.monotonic() - killed
        feeder.join(10)
        probe.join(10)
        assert figures.first_commit_after > 0
        figures.approved_after_kill = len(late - approved)
        figures.approvals_lost = len(lost)
        assert approved | late == gated

        for i in range(runs):
            handle = runner.attach(f"fo{i}")
            result = handle.result(timeout=30)
            assert result.status is RunStatus.COMPLETED, (handle.run_id, result)
            assert result.output == ff.expected_output(WIDTH), (handle.run_id, result.output)
            history = handle.history()
            completed = Counter(e["step"] for e in history if e["event"] == "step_completed")
            want = {"Prep": 1, "Fan": 1, "Gather": 1, "Finish": 1}
            assert completed == want, (handle.run_id, completed)
            branches = Counter(e["branch"] for e in history
                               if e["event"] == "branch_completed")
            assert branches == {f"leaf[{j}]": 1 for j in range(WIDTH)}, (handle.run_id,
                                                                          branches)
            decisions = [e for e in history if e["event"] == "gate_approved"]
            assert len(decisions) == (handle.run_id in gated), (handle.run_id, decisions)
            if handle.run_id in approved and handle.run_id not in lost:
                assert decisions[0]["comment"] == "before the kill", decisions

        keys = [k.decode() for k in side_client.keys("exec:*")]
        counts = [int(v) for v in side_client.mget(keys)]
        figures.executions = sum(counts)
        figures.tokens = len(keys)
        figures.redelivered = sum(n - 1 for n in counts)
        applied = side_client.keys("applied:*")
        figures.applied_twice = len(keys) - len(applied)
        # Every committed token's effect was applied, once: one key per token.
        assert len(applied) == len(keys)
        figures.wall = time.monotonic() - started
        return figures
    finally:
        cluster.stop()
        store.close()
        side_client.close()

