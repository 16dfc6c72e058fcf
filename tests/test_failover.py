"""Redis Sentinel: runs in flight across a failover, and MIN_REPLICAS_ACK (WAIT).

Real processes on loopback ports: a primary, a replica and three sentinels
(tests/sentinels.py), a side-channel redis-server for the steps' side effects, and a
coordinator and workers started through the CLI with a `redis+sentinel://` URL.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import Client, RunStatus, Settings, StoreUnavailable, WorkflowRunner
from orchestrator import _engine as engine
from orchestrator._records import FlowSpec, StepPolicy, StepSpec
from orchestrator._steward import catalog_key
from orchestrator._stores import RedisStore
from tests import failover_flows as ff
from tests.conftest import Cluster, RedisServer, wait_for
from tests.failover_scenario import run_scenario
from tests.sentinels import SentinelDeployment

# bench/failover.py runs the full size and the variants; CI runs this many.
RUNS = int(os.environ.get("ORCHESTRATOR_TEST_FAILOVER_RUNS", "200"))


@pytest.fixture
def sentinel_deployment() -> Iterator[SentinelDeployment]:
    deployment = SentinelDeployment(replicas=1, sentinels=3, down_after_ms=1000,
                                    failover_timeout_ms=5000)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def side_channel() -> Iterator[RedisServer]:
    """A plain redis-server the failover does not touch, for the steps' side effects."""
    server = RedisServer()
    server.start()
    os.environ[ff.SIDE_URL] = server.url
    try:
        yield server
    finally:
        os.environ.pop(ff.SIDE_URL, None)
        server.stop()


def test_runs_in_flight_survive_a_failover(sentinel_deployment: SentinelDeployment,
                                           side_channel: RedisServer, tmp_path: Path) -> None:
    figures = run_scenario(sentinel_deployment, side_channel, tmp_path, runs=RUNS,
                           min_replicas_ack=1)
    print("\n" + "\n".join(figures.lines()))
    # run_scenario checked every run: completed with the right output, each step and
    # branch committed once, each gate decided once (none of wave A's approvals lost).
    assert figures.approved_before_kill > 0 and figures.approved_after_kill > 0
    assert figures.approvals_lost == 0  # each acknowledged by the replica that took over
    assert figures.started_at_kill < RUNS  # some runs were started across the failover
    assert figures.applied_twice == 0
    assert figures.executions == figures.tokens + figures.redelivered


def test_min_replicas_ack_settings() -> None:
    settings = Settings.from_env({"ORCHESTRATOR_MIN_REPLICAS_ACK": "2",
                                  "ORCHESTRATOR_REPLICAS_ACK_TIMEOUT": "0.5"})
    assert (settings.min_replicas_ack, settings.replicas_ack_timeout) == (2, 0.5)
    store = RedisStore.from_settings(settings, "x:")
    assert (store.min_replicas_ack, store._wait_ms) == (2, 500)
    store.close()
    with pytest.raises(ValueError, match="MIN_REPLICAS_ACK"):
        Settings(min_replicas_ack=-1)
    with pytest.raises(ValueError, match="REPLICAS_ACK_TIMEOUT"):
        Settings(replicas_ack_timeout=0)


SPEC = FlowSpec("W", "v1", {"__start__": StepSpec(StepPolicy(queue="q"))})


def test_a_write_no_replica_acknowledges_is_store_unavailable(
        redis_server: RedisServer, redis_url: str) -> None:
    """A lone primary: WAIT finds no replica. The write stands on the primary, but the
    caller is told the store is unavailable, so it sends nothing on its strength."""
    store = RedisStore(redis_url, "w:", min_replicas_ack=1, replicas_ack_timeout=0.05)
    d = engine.start(SPEC, "r1", {}, {}, store.now())
    assert d.record is not None
    began = time.monotonic()
    with pytest.raises(StoreUnavailable, match="0 of 1 replica"):
        store.create(d.record, d.history, None)
    assert time.monotonic() - began < 2
    assert store.load("r1").record is not None
    # Without the setting nothing waits.
    plain = RedisStore(redis_url, "w:")
    d2 = engine.start(SPEC, "r2", {}, {}, plain.now())
    assert d2.record is not None and plain.create(d2.record, d2.history, None)
    store.close()
    plain.close()


def test_writes_through_sentinel_wait_for_the_replica(
        sentinel_deployment: SentinelDeployment) -> None:
    store = RedisStore(sentinel_deployment.url(), "w:", min_replicas_ack=1)
    d = engine.start(SPEC, "r1", {}, {}, store.now())
    assert d.record is not None and store.create(d.record, d.history, None)
    replica = sentinel_deployment.data[1].client()
    assert replica.hget("w:run:{r1}", "v") is not None  # there when create() returned
    # One sentinel is gone for good (two still make the quorum and the majority), then the
    # primary. Clients find the promoted replica without waiting on the dead sentinel, and
    # load the scripts a promoted replica has never seen on first use.
    sentinel_deployment.sentinels[0].stop(signal.SIGKILL)
    old, _ = sentinel_deployment.kill_primary()
    new = sentinel_deployment.wait_promoted(old)
    sentinel_deployment.rejoin(old, replica_of=new)
    d2 = engine.start(SPEC, "r2", {}, {}, wait_for(lambda: _now(store), 30))
    assert d2.record is not None and store.create(d2.record, d2.history, None)
    assert store.load("r1").record is not None
    store.close()


def _now(store: RedisStore) -> float | None:
    try:
        return store.now()
    except StoreUnavailable:
        return None


def test_a_commit_short_of_its_replicas_is_retried_and_sends_once(
        sentinel_deployment: SentinelDeployment, side_channel: RedisServer,
        tmp_path: Path) -> None:
    """The replica stops answering (SIGSTOP): every commit's WAIT falls short. An approval
    and a start raise StoreUnavailable to the app, and workers' commits fail their tasks.
    Each of those transitions stands on the primary, with its tasks recorded as sent and
    not sent; once the replica is back the sweep sends each of them once."""
    cluster = Cluster(sentinel_deployment.url(), tmp_path,
                      ORCHESTRATOR_WORKFLOWS="tests.failover_flows",
                      ORCHESTRATOR_MIN_REPLICAS_ACK="1",
                      ORCHESTRATOR_REPLICAS_ACK_TIMEOUT="0.2")
    store = RedisStore.from_settings(cluster.settings, "fo:")
    side = side_channel.client()
    replica = sentinel_deployment.data[1]
    assert replica.proc is not None
    try:
        cluster.coordinator("coord")
        worker = cluster.worker("w1", 2)
        runner = WorkflowRunner(ff.failover, app=cluster.app)
        gated = runner.run({"gated": True}, run_id="g")
        wait_for(lambda: gated.status() is RunStatus.WAITING, 60, what="the gate")
        busy = [runner.run({}, run_id=f"b{i}") for i in range(6)]
        wait_for(lambda: side.keys("exec:b*"), 30, what="workers to be busy")

        replica.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable, match="0 of 1 replica"):
                gated.approve(by=ff.APPROVER)
            with pytest.raises(StoreUnavailable):
                runner.run({}, run_id="late")
            # Workers finish steps whose commits fall short of the replica.
            wait_for(lambda: "0 of 1 replica" in worker.log.read_text(errors="replace"), 30,
                     what=f"a worker's commit to fall short\n{worker.tail()}")
        finally:
            replica.proc.send_signal(signal.SIGCONT)

        late = runner.attach("late")
        for handle in [gated, *busy, late]:
            result = handle.result(timeout=60)
            assert result.status is RunStatus.COMPLETED, (handle.run_id, cluster.logs())
            assert result.output == ff.expected_output(3)
            history = handle.history()
            completed = Counter(e["step"] for e in history if e["event"] == "step_completed")
            assert completed == {"Prep": 1, "Fan": 1, "Gather": 1, "Finish": 1}
            branches = Counter(e["branch"] for e in history
                               if e["event"] == "branch_completed")
            assert branches == {"leaf[0]": 1, "leaf[1]": 1, "leaf[2]": 1}
        decisions = [e for e in gated.history() if e["event"] == "gate_approved"]
        assert len(decisions) == 1  # the approval that raised was committed, once
        # Nothing was sent twice: each token ran once (the primary never went away, so no
        # transition was lost and no step had to run again).
        counts = [int(v) for v in side.mget(side.keys("exec:*"))]
        assert counts and max(counts) == 1, counts
        resent = sum(1 for h in [gated, *busy, late] for e in h.history()
                     if e["event"] in ("step_redispatched", "join_redriven"))
        assert resent > 0  # what the short commits did not send, the sweep sent
    finally:
        cluster.stop()
        store.close()
        side.close()


def test_clients_follow_the_failover(sentinel_deployment: SentinelDeployment,
                                     side_channel: RedisServer, tmp_path: Path) -> None:
    """A Client (catalog, start, status) and the cluster behind it keep working across a
    failover without a restart: the catalog heartbeats reach the new primary."""
    ttl = 3.0
    cluster = Cluster(sentinel_deployment.url(), tmp_path,
                      ORCHESTRATOR_WORKFLOWS="tests.failover_flows",
                      ORCHESTRATOR_CATALOG_TTL=str(ttl))
    client = Client(settings=cluster.settings)
    try:
        cluster.coordinator("coord")
        cluster.worker("w1", 1)
        assert client.start("Failover", {}).result(timeout=60).status is RunStatus.COMPLETED
        old, _ = sentinel_deployment.kill_primary()
        sentinel_deployment.wait_promoted(old)

        def started() -> str | None:
            try:
                return client.start("Failover", {}, run_id="after").run_id
            except StoreUnavailable:
                return None

        wait_for(started, 60, 0.2, what="a start on the new primary")
        assert client.attach("after").result(timeout=60).status is RunStatus.COMPLETED
        # The worker's and the coordinator's heartbeats followed: each renews its lease
        # on the new primary (a lease replicated from the old one expires within a TTL
        # of now), and the catalog lists the hosts from those leases.
        seconds, micros = client.redis.time()
        since = seconds + micros / 1e6

        def renewed() -> bool:
            leases = client.redis.zrange(f"{catalog_key()}:live", 0, -1, withscores=True)
            return len([h for h, expires in leases if expires > since + ttl]) == 2

        wait_for(renewed, 30, 0.2, what="both hosts to renew their lease on the new primary")
        assert client.workflow("Failover").hosts
    finally:
        client.close()
        cluster.stop()
