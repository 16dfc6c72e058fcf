"""Redis ACL users limited to what each role needs (docs/operations.md has the same lines).

A worker, a coordinator and an app each log in as their own user, and a workflow with a
fan-out and a gate runs end to end; the app user cannot reach past its key patterns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from orchestrator import Client, RunStatus
from tests.conftest import Cluster, RedisServer, wait_for

DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
USERS = ("orch-worker", "orch-coordinator", "orch-app")


def acl_lines() -> dict[str, list[str]]:
    """The `ACL SETUSER` lines of docs/operations.md, by user: the test runs what the docs
    say, so the two cannot drift apart."""
    found: dict[str, list[str]] = {}
    for line in DOCS.read_text().splitlines():
        if line.startswith("ACL SETUSER "):
            found.setdefault(line.split()[2], []).append(line)
    return found


def _url(server: RedisServer, user: str) -> str:
    return f"redis://{user}:{user}-secret@127.0.0.1:{server.port}/0"


@pytest.fixture
def acl_users(redis_server: RedisServer, rclient: redis.Redis) -> Iterator[dict[str, str]]:
    """The role users, created as the docs say with test passwords; removed afterwards."""
    lines = acl_lines()
    assert sorted(lines) == sorted(USERS)
    for user in USERS:
        for line in lines[user]:
            args = line.split()
            # The docs say `>CHANGE-ME`; the test sets a password of its own.
            rclient.execute_command(*[f">{user}-secret" if a.startswith(">") else a
                                      for a in args])
    yield {user: _url(redis_server, user) for user in USERS}
    rclient.execute_command("ACL", "DELUSER", *USERS)


def test_roles_run_a_gated_fan_out_under_their_own_acl_users(
        cluster_factory: Callable[..., Cluster], acl_users: dict[str, str]) -> None:
    coordinators = cluster_factory(ORCHESTRATOR_WORKFLOWS="workers",
                                   ORCHESTRATOR_REDIS_URL=acl_users["orch-coordinator"])
    coordinators.coordinator("coord")
    workers = cluster_factory(ORCHESTRATOR_WORKFLOWS="workers",
                              ORCHESTRATOR_REDIS_URL=acl_users["orch-worker"])
    workers.worker("w1", 2)
    client = Client(acl_users["orch-app"])
    try:
        handle = client.start("BuildAndDeploy", {"repo": "acme/web",
                                                 "environment": "production"})
        wait_for(lambda: handle.status() is RunStatus.WAITING, 60, what="the gate")
        with client.runtime.store_for("deploy:").watch_end(handle.run_id) as watch:
            assert watch.live  # the app may hear of the run's end, not just poll for it
        assert [r.run_id for r in client.gates("ops-lead")] == [handle.run_id]
        handle.approve(by="ops-lead")
        result = handle.result(timeout=60)
        assert result.status is RunStatus.COMPLETED, workers.logs() + coordinators.logs()
        assert result.output == {"released": "out.tar", "to": "production"}
        assert sorted(result.step_results["Bundle"]["contains"]) == [
            "web-linux", "web-mac", "web-win"]  # the fan-out's three branches all ran
    finally:
        client.close()
    assert "NOPERM" not in workers.logs() + coordinators.logs()


def test_the_app_user_cannot_reach_past_its_patterns(acl_users: dict[str, str],
                                                    rclient: redis.Redis) -> None:
    rclient.set("elsewhere:secret", "x")
    app = redis.Redis.from_url(acl_users["orch-app"])
    try:
        for forbidden in (lambda: app.flushall(), lambda: app.get("elsewhere:secret"),
                          lambda: app.keys("*"), lambda: app.config_get("*"),
                          # queues are write-only for the app: it cannot take a message
                          lambda: app.rpop("orchestrator.steps"),
                          lambda: app.hgetall("unacked")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        assert app.hgetall("orchestrator:catalog") == {}  # its own keys it may read
    finally:
        app.close()
