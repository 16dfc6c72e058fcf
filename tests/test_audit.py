"""The history's audit chain (orchestrator/_audit.py): sealed by every append path of the
Redis store, checked by `orchestrator audit verify`, and broken by editing Redis."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import redis

from orchestrator import RunStatus, WorkflowRunner
from orchestrator._runtime import Runtime
from orchestrator._stores import RedisStore, RunStore
from tests import flows
from tests.conftest import Cluster, wait_for
from tests.test_cli import cli

KEY = "a-test-audit-key"


def _run(local_runtimes: Callable[[RunStore], Runtime], store: RedisStore, wf: Any,
         data: dict[str, Any]) -> Any:
    handle = WorkflowRunner(wf, runtime=local_runtimes(store)).run(data)
    return handle


def _head(store: RedisStore, run_id: str) -> str:
    return store._hist(run_id)[0]


def test_every_append_path_chains_and_an_edit_is_named(
        redis_url: str, rclient: redis.Redis,
        local_runtimes: Callable[[RunStore], Runtime]) -> None:
    store = RedisStore(redis_url, "audit:", audit_key=KEY)
    fan = _run(local_runtimes, store, flows.fan_out, {"width": 3})  # branches: record_branch
    assert fan.result(timeout=60).status is RunStatus.COMPLETED
    gate = _run(local_runtimes, store, flows.gated, {"approvers": ["group:ops"]})
    wait_for(lambda: gate.status() is RunStatus.WAITING, 30, what="the gate")
    store.note(gate.run_id, {"at": 0.0, "event": "ignored", "why": "a note"})  # note.lua
    gate.approve("alice", "ship it", groups=["ops"])
    assert gate.result(timeout=60).status is RunStatus.COMPLETED
    for handle in (fan, gate):
        verdict = store.audit(handle.run_id, KEY)
        assert verdict is not None and verdict.ok, verdict
        assert verdict.checked == len(handle.history()) and all(
            "mac" in e for e in handle.history())
    assert not store.audit(gate.run_id, "another key").ok  # type: ignore[union-attr]

    # Rewrite who approved, as one LSET would.
    entries = gate.history()
    approved = next(e for e in entries if e["event"] == "gate_approved")
    forged = {**approved, "by": "mallory"}
    rclient.lset(_head(store, gate.run_id), approved["n"], json.dumps(forged))
    verdict = store.audit(gate.run_id, KEY)
    assert verdict is not None and not verdict.ok
    assert verdict.first_bad == approved["n"] and "mac" in verdict.reason


def test_a_deleted_or_reordered_entry_is_caught(
        redis_url: str, rclient: redis.Redis,
        local_runtimes: Callable[[RunStore], Runtime]) -> None:
    store = RedisStore(redis_url, "audit:", audit_key=KEY)
    runs = [_run(local_runtimes, store, flows.fan_out, {"width": 2}) for _ in range(2)]
    for r in runs:
        r.result(timeout=60)
    deleted, swapped = (r.run_id for r in runs)

    head = _head(store, deleted)
    third = rclient.lindex(head, 3)
    rclient.lrem(head, 1, third)  # type: ignore[arg-type]
    verdict = store.audit(deleted, KEY)
    assert verdict is not None and not verdict.ok and verdict.first_bad == 3

    head = _head(store, swapped)
    a, b = rclient.lindex(head, 1), rclient.lindex(head, 2)
    rclient.lset(head, 1, b)  # type: ignore[arg-type]
    rclient.lset(head, 2, a)  # type: ignore[arg-type]
    verdict = store.audit(swapped, KEY)
    assert verdict is not None and not verdict.ok and verdict.first_bad == 1


def test_a_trimmed_history_verifies_and_its_tail_is_still_guarded(
        redis_url: str, rclient: redis.Redis,
        local_runtimes: Callable[[RunStore], Runtime]) -> None:
    store = RedisStore(redis_url, "loop:", history_limit=3, audit_key=KEY)
    handle = _run(local_runtimes, store, flows.loop, {"times": 20})
    handle.result(timeout=60)
    verdict = store.audit(handle.run_id, KEY)
    assert verdict is not None and verdict.ok and verdict.dropped > 0 and verdict.checked == 6
    tail = store._hist(handle.run_id)[1]
    oldest = json.loads(rclient.lindex(tail, 0))  # type: ignore[arg-type]
    rclient.lset(tail, 0, json.dumps({**oldest, "event": "forged"}))
    verdict = store.audit(handle.run_id, KEY)
    assert verdict is not None and not verdict.ok and verdict.first_bad == oldest["n"]
    rclient.lset(tail, 0, json.dumps({**oldest, "prev": "0" * 64}))  # a forged link
    verdict = store.audit(handle.run_id, KEY)
    assert verdict is not None and verdict.first_bad == oldest["n"]


def test_racing_notes_and_commits_keep_one_chain(
        redis_url: str, local_runtimes: Callable[[RunStore], Runtime]) -> None:
    store = RedisStore(redis_url, "audit:", audit_key=KEY, history_limit=20)
    handle = _run(local_runtimes, store, flows.gated, {})
    wait_for(lambda: handle.status() is RunStatus.WAITING, 30, what="the gate")

    def notes(i: int) -> None:
        writer = RedisStore(redis_url, "audit:", audit_key=KEY)
        for j in range(15):
            writer.note(handle.run_id, {"at": 0.0, "event": "ignored", "why": f"{i}.{j}"})

    threads = [threading.Thread(target=notes, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    handle.pause(by="ann")
    handle.resume(by="ann")
    for t in threads:
        t.join()
    verdict = store.audit(handle.run_id, KEY)
    assert verdict is not None and verdict.ok, verdict
    assert verdict.total >= 60 + 4 and verdict.dropped > 0


def test_verify_from_the_cli_after_an_approval_by_a_group_member(
        cluster_factory: Callable[..., Cluster], redis_url: str, rclient: redis.Redis) -> None:
    cluster = cluster_factory(ORCHESTRATOR_AUDIT_KEY=KEY)
    cluster.worker("w1")
    env = {"ORCHESTRATOR_AUDIT_KEY": KEY}
    run_id = json.loads(cli(redis_url, "run", "Gated", "--remote", "--no-wait", "--json",
                            "--input", '{"approvers": ["group:ops"]}', **env).stdout)["run_id"]
    wait_for(lambda: json.loads(cli(redis_url, "status", run_id, "--json").stdout)["status"]
             == "waiting", 60, 0.2, what="the gate")
    from tests.test_identity import _add

    _add(redis_url, "alice", "--group", "ops")
    _add(redis_url, "bob", "--group", "dev")

    def listed_for(user: str) -> list[str]:
        rows = json.loads(cli(redis_url, "gates", "--approver", user, "--json").stdout)
        return [r["run_id"] for r in rows]

    assert listed_for("alice") == [run_id]  # by her group
    assert listed_for("bob") == []
    assert cli(redis_url, "approve", run_id, "--as", "bob", check=False,
               **env).returncode == 4
    cli(redis_url, "approve", run_id, "--as", "alice", "--comment", "ok", **env)
    assert cli(redis_url, "watch", run_id, "--timeout", "60").returncode == 0

    ok = cli(redis_url, "audit", "verify", run_id, **env)
    assert "ok" in ok.stdout
    no_key = cli(redis_url, "audit", "verify", run_id, check=False)
    assert no_key.returncode == 2 and "ORCHESTRATOR_AUDIT_KEY" in no_key.stderr

    head = f"orchestrator:run:{{{run_id}}}:history"
    entries = [json.loads(e) for e in rclient.lrange(head, 0, -1)]
    approved = next(e for e in entries if e["event"] == "gate_approved")
    assert (approved["by"], approved["source"]) == ("alice", "cli")
    rclient.lset(head, approved["n"], json.dumps({**approved, "by": "bob"}))
    bad = cli(redis_url, "audit", "verify", run_id, "--json", check=False, **env)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["first_bad"] == approved["n"]
    assert f"entry {approved['n']}" in bad.stderr
