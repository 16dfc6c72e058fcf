"""Redis restarted while workers are busy: every worker lives on and consumes again.

Workers used to die here (`Unrecoverable error: AttributeError("'NoneType' object has no
attribute 'hostname'")`, see orchestrator/_kombu_fixes.py). The first test drives kombu into
that exact sequence against a real Redis, so it fails without the fix every time; the
second restarts Redis under a busy cluster, where the crash is a race.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import kombu
import pytest
import redis

from orchestrator import RunStatus, WorkflowRunner, _kombu_fixes
from tests import outage_flows
from tests.conftest import Cluster, Process, RedisServer, wait_for

WORKERS = 4
CONCURRENCY = 2
RUNS = 40


@pytest.fixture
def restarts_redis(redis_server: RedisServer, redis_url: str) -> Iterator[RedisServer]:
    """The session's redis-server, up again after the test whatever happened."""
    yield redis_server
    if redis_server.proc is None:
        redis_server.start()


def test_channel_closed_after_its_connection_raises_a_connection_error(
        restarts_redis: RedisServer, rclient: redis.Redis) -> None:
    _kombu_fixes.install()
    server = restarts_redis
    conn = kombu.Connection(server.url)
    tasks = kombu.Queue("outage.tasks", kombu.Exchange("outage.tasks", "direct"),
                        routing_key="outage.tasks")
    with conn.Producer() as producer:
        producer.publish({"i": 0}, exchange=tasks.exchange, routing_key="outage.tasks",
                         declare=[tasks])
    received: list[kombu.Message] = []
    channel = conn.default_channel
    kombu.Consumer(channel, [tasks], callbacks=[lambda body, m: received.append(m)]).consume()
    # A second channel with an auto-delete fanout queue, as celery's pidbox and gossip have:
    # deleting it fails while Redis is down, which ends close_connection early.
    broadcast = kombu.Queue("outage.broadcast", kombu.Exchange("outage.bx", "fanout"),
                            auto_delete=True)
    kombu.Consumer(conn.channel(), [broadcast], callbacks=[lambda body, m: None],
                   no_ack=True).consume()
    wait_for(lambda: conn.drain_events(timeout=1) or received, 10, what="a delivery")
    assert len(received) == 1  # delivered and unacked, as a busy worker holds its tasks
    # The next BRPOP in flight on the empty queue, as a worker with a free slot waits.
    channel._brpop_start()

    server.stop()
    # What celery's consumer does when the broker link drops (consumer.py:476-487). The
    # close used to raise AttributeError, which stopped the worker.
    conn.collect()
    conn.close()

    server.start()
    # Nothing lost: the unacked delivery is still in Redis, and the visibility sweep any
    # worker runs puts it back on the queue.
    assert rclient.hlen("unacked") == 1 and rclient.llen("outage.tasks") == 0
    with kombu.Connection(server.url, transport_options={"visibility_timeout": 0}) as sweep:
        sweep.default_channel.qos.restore_visible(num=10, interval=1)
    assert rclient.hlen("unacked") == 0 and rclient.llen("outage.tasks") == 1


def _production_worker(c: Cluster, name: str) -> Process:
    """A worker started as docker-compose starts one: mingle, gossip and events on, so its
    connection carries the pidbox and gossip fanout channels the crash went through."""
    argv = [sys.executable, "-m", "orchestrator.cli", "worker", "-l", "INFO", "-n",
            f"{name}@%h", "-c", str(CONCURRENCY)]
    proc = Process(name, argv, c.env, c.tmp / f"{name}.log")
    c.procs.append(proc)
    c.wait_ready(proc)
    return proc


def test_redis_restart_under_load_every_worker_survives(
        cluster_factory: Callable[..., Cluster], restarts_redis: RedisServer,
        tmp_path: Path) -> None:
    effects_dir = tmp_path / "effects"
    effects_dir.mkdir()
    c = cluster_factory(ORCHESTRATOR_WORKFLOWS="tests.outage_flows",
                        ORCHESTRATOR_TEST_EFFECTS_DIR=str(effects_dir),
                        ORCHESTRATOR_TASK_EVENTS="1")
    c.coordinator("coord")
    workers = [_production_worker(c, f"w{i}") for i in range(WORKERS)]
    runner = WorkflowRunner(outage_flows.busy, app=c.app)
    handles = [runner.run(run_id=f"busy{i}") for i in range(RUNS)]
    wait_for(lambda: len(outage_flows.effects(effects_dir)) >= RUNS // 2, 120,
             what="the workers to be busy")

    restarts_redis.stop()  # SIGTERM: the AOF (appendfsync always) keeps what was written
    restarts_redis.start()

    results = [h.result(timeout=180) for h in handles]
    assert [w.name for w in workers if w.proc.poll() is not None] == [], c.logs()
    assert "Unrecoverable error" not in c.logs()
    # Every run finished, and each step's state change was applied exactly once.
    assert [r.status for r in results] == [RunStatus.COMPLETED] * RUNS, c.logs()
    assert [r.output for r in results] == [outage_flows.STEPS] * RUNS
    for h in handles:
        completed = Counter(e["step"] for e in h.history() if e["event"] == "step_completed")
        assert completed == {f"S{i}": 1 for i in range(1, outage_flows.STEPS + 1)}, h.run_id
    # At least once: every dispatched step ran. Twice only for what a worker held when Redis
    # went away (at most its prefetch, one per pool process).
    ran = Counter(e.key for e in outage_flows.effects(effects_dir))
    assert len(ran) == RUNS * outage_flows.STEPS
    assert max(ran.values()) <= 2
    assert sum(n - 1 for n in ran.values()) <= WORKERS * CONCURRENCY

    # Every worker consumes again: idle workers wait in BRPOP, and Redis serves blocked
    # clients in order, so a new batch reaches each of them.
    after = [runner.run(run_id=f"after{i}") for i in range(WORKERS * CONCURRENCY * 2)]
    assert all(h.result(timeout=120).status is RunStatus.COMPLETED for h in after)
    consumed = {e.worker_pid for e in outage_flows.effects(effects_dir)
                if e.key.startswith("after")}
    assert consumed == {w.pid for w in workers}, c.logs()
