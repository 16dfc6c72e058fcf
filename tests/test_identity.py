"""Users, groups and API tokens (orchestrator/_identity.py), through the CLI against the
test Redis, and gates that list groups as approvers."""

from __future__ import annotations

import hashlib
import json

import pytest
import redis

from orchestrator import RunStatus, WorkflowRunner
from orchestrator._definition import DefinitionError, HumanApproval
from orchestrator._identity import UnknownUser, Users
from tests import flows
from tests.test_cli import cli

PASSWORD = "correct horse battery staple"


def _add(redis_url: str, name: str, *args: str, password: str = PASSWORD,
         check: bool = True) -> object:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, TEST_ENV

    env = {**os.environ, **TEST_ENV, "ORCHESTRATOR_REDIS_URL": redis_url,
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "users", "add", name,
                           "--password-stdin", *args], input=password + "\n", env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_users_add_list_remove_store_only_an_argon2_hash(redis_url: str,
                                                         rclient: redis.Redis) -> None:
    _add(redis_url, "alice", "--group", "ops", "--group", "dev", "--role", "operator")
    stored = json.loads(rclient.hget("orchestrator:users", "alice"))
    assert stored["password"].startswith("$argon2id$")
    assert PASSWORD not in json.dumps(stored)
    assert stored["groups"] == ["dev", "ops"] and stored["role"] == "operator"

    listed = json.loads(cli(redis_url, "users", "list", "--json").stdout)
    assert listed == [{"name": "alice", "role": "operator", "groups": ["dev", "ops"],
                       "created": stored["created"]}]  # no hash

    again = _add(redis_url, "alice", check=False)
    assert again.returncode == 2 and "exists" in again.stderr  # type: ignore[attr-defined]
    empty = _add(redis_url, "bob", password="", check=False)
    assert empty.returncode == 2 and "empty password" in empty.stderr  # type: ignore[attr-defined]
    bad_role = _add(redis_url, "bob", "--role", "root", check=False)
    assert bad_role.returncode == 2  # type: ignore[attr-defined]

    users = Users(rclient)
    assert users.authenticate("alice", PASSWORD) is not None
    assert users.authenticate("alice", "wrong") is None
    assert users.authenticate("nobody", PASSWORD) is None

    assert cli(redis_url, "users", "remove", "alice").returncode == 0
    gone = cli(redis_url, "users", "remove", "alice", check=False)
    assert gone.returncode == 3 and "no user 'alice'" in gone.stderr
    with pytest.raises(UnknownUser):
        users.get("alice")


def test_a_token_is_shown_once_stored_as_its_hash_and_revocable(redis_url: str,
                                                                rclient: redis.Redis) -> None:
    _add(redis_url, "carol", "--group", "ops")
    token = cli(redis_url, "tokens", "create", "carol").stdout.strip()
    assert len(token) >= 40
    digest = hashlib.sha256(token.encode()).hexdigest()
    stored = {k.decode(): v.decode() for k, v in rclient.hgetall("orchestrator:tokens").items()}
    assert list(stored) == [digest] and token not in json.dumps(stored)
    users = Users(rclient)
    user = users.user_for_token(token)
    assert user is not None and user.name == "carol" and user.groups == ("ops",)

    listed = json.loads(cli(redis_url, "tokens", "list", "--json").stdout)
    assert [(t["id"], t["user"]) for t in listed] == [(digest, "carol")]
    assert token not in cli(redis_url, "tokens", "list").stdout

    cli(redis_url, "tokens", "revoke", "--id", digest[:12])
    assert users.user_for_token(token) is None
    again = cli(redis_url, "tokens", "revoke", "--id", digest[:12], check=False)
    assert again.returncode == 3
    assert cli(redis_url, "tokens", "create", "nobody", check=False).returncode == 3

    second = users.create_token("carol")
    cli(redis_url, "users", "remove", "carol")  # takes their tokens with them
    assert users.user_for_token(second) is None


def test_a_group_approver_admits_its_members_only() -> None:
    with WorkflowRunner(flows.gated) as runner:
        handle = runner.run({"approvers": ["group:ops"]})
        flows_wait(handle)
        with pytest.raises(PermissionError):
            handle.approve("mallory", groups=["dev"])
        with pytest.raises(PermissionError):
            handle.approve("ops")  # a user named like the group is not its member
        handle.approve("alice", "fine", groups=["ops"])
        assert handle.result(timeout=30).output == "released"
    approved = [e for e in handle.history() if e["event"] == "gate_approved"]
    assert approved == [{**approved[0], "by": "alice", "source": "client"}]


def test_a_group_quorum_counts_distinct_members() -> None:
    HumanApproval(approvers=["group:ops"], min_approvals=2)  # more than listed: allowed
    with pytest.raises(DefinitionError):
        HumanApproval(approvers=["a"], min_approvals=2)
    with WorkflowRunner(flows.gated) as runner:
        handle = runner.run({"approvers": ["group:ops"], "min_approvals": 2})
        flows_wait(handle)
        handle.approve("alice", groups=["ops"], source="cli")
        handle.approve("alice", groups=["ops"])  # the same user twice counts once
        assert handle.status() is RunStatus.WAITING
        handle.approve("bob", groups=["ops"])
        assert handle.result(timeout=30).output == "released"
        handle2 = runner.run({})
        flows_wait(handle2)
        handle2.pause(by="ann", source="cli")
        handle2.stop("enough", by="ann")
    sources = [(e["event"], e.get("by"), e.get("source")) for e in handle.history()
               if e["event"] == "gate_approved"]
    assert sources == [("gate_approved", "alice", "cli"), ("gate_approved", "bob", "client")]
    controls = [(e["event"], e.get("by"), e.get("source")) for e in handle2.history()
                if e["event"] in ("paused", "stopped")]
    assert controls == [("paused", "ann", "cli"), ("stopped", "ann", "client")]


def flows_wait(handle: object) -> None:
    from tests.conftest import wait_for

    wait_for(lambda: handle.status() is RunStatus.WAITING, 30,  # type: ignore[attr-defined]
             what="the gate")
