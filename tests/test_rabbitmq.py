"""RabbitMQ as the broker, Redis still holding state: the seed example end to end."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

import pytest
from kombu import Connection

from orchestrator import RunStatus, WorkflowRunner
from orchestrator._dispatch.base import broker_queues
from tests.conftest import Cluster, wait_for
from workers.deploy import build_and_deploy

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbit_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def amqp_cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    if not _rabbit_up():
        if os.environ.get("CI"):  # .ci/run starts RabbitMQ: there, its absence is a failure
            pytest.fail("RabbitMQ is not running on 127.0.0.1:5672")
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
    c = cluster_factory(ORCHESTRATOR_BROKER_URL=AMQP_URL)
    queues = {q for wf in c.app.runtime.workflows.values() for q in broker_queues(wf)}
    with Connection(AMQP_URL) as conn:  # leftovers of an earlier run must not leak in
        for queue in [*sorted(queues), "orchestrator.coordinator"]:
            # A queue never declared has nothing to purge (and closes its channel).
            with contextlib.suppress(Exception):
                conn.channel().queue_purge(queue)
    c.coordinator("coord")
    c.worker("w1", 2)
    return c


def test_seed_example_over_rabbitmq(amqp_cluster: Cluster) -> None:
    assert amqp_cluster.app.conf.broker_url.startswith("amqp://")
    runner = WorkflowRunner(build_and_deploy, app=amqp_cluster.app)
    handle = runner.run({"repo": "acme/app", "environment": "production"})
    wait_for(lambda: handle.status() is RunStatus.WAITING, 60, what="the gate at Deploy")
    handle.approve(by="ops-lead", comment="over amqp")
    result = handle.result(timeout=60)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.state["released"] is True
    assert result.step_results["Bundle"]["contains"] == ["app-linux", "app-mac", "app-win"]
    assert result.step_results["Deploy"]["comment"] == "over amqp"
