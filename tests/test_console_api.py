"""The JSON API (/api/v1) and `orchestrator console`, called over HTTP as an outside app
would: httpx against a real console process, over a real cluster (a coordinator and two
workers) sharing one Redis database.

One cluster serves the whole module (its runs are told apart by their ids), with the audit
key set so the audit endpoint has something to check. The tests that need a database with
no users, or refusals of the command line, use databases and processes of their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from orchestrator._identity import Users
from tests.conftest import ROOT, Cluster, RedisServer, free_port, wait_for

KEY = "a-test-audit-key"
API = "/api/v1"
# name -> (role, groups)
PEOPLE = {
    "ops-lead": ("operator", ()),  # BuildAndDeploy's approver, by name
    "alice": ("operator", ("ops",)),  # decides group:ops gates
    "bob": ("operator", ("dev",)),  # an operator listed on none of alice's gates
    "vera": ("viewer", ("ops",)),  # in group ops, but a viewer: reads only
    "root": ("admin", ()),
}


@dataclass
class Env:
    cluster: Cluster
    url: str
    tokens: dict[str, str]
    users: Users
    redis: redis.Redis

    def as_(self, name: str | None) -> httpx.Client:
        """An API client presenting `name`'s token (none for None)."""
        headers = {"Authorization": f"Bearer {self.tokens[name]}"} if name else {}
        return httpx.Client(base_url=self.url + API, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A cluster, its users with a token each, and a console over them. Module-scoped: this
    module uses no per-test `redis_url` (that would flush the cluster's database)."""
    client = redis_server.client()
    client.flushdb()
    cluster = Cluster(redis_server.url, tmp_path_factory.mktemp("console-api"),
                      ORCHESTRATOR_AUDIT_KEY=KEY)
    try:
        cluster.coordinator("coord")
        cluster.worker("w1")
        cluster.worker("w2")
        users = Users(client, cluster.settings.key_prefix)
        tokens = {}
        for name, (role, groups) in PEOPLE.items():
            users.add(name, f"pw-{name}", role=role, groups=groups)
            tokens[name] = users.create_token(name)
        _, url = cluster.console()
        yield Env(cluster, url, tokens, users, client)
    finally:
        cluster.stop()
        client.close()


def _start(api: httpx.Client, workflow: str, data: dict[str, Any],
           run_id: str | None = None) -> str:
    response = api.post("/runs", json={"workflow": workflow, "input": data, "run_id": run_id})
    assert response.status_code == 201, response.text
    return str(response.json()["run_id"])


def _wait_status(api: httpx.Client, run_id: str, status: str, timeout: float = 60) -> Any:
    def reached() -> Any:
        doc = api.get(f"/runs/{run_id}").json()
        return doc if doc["status"] == status else None

    return wait_for(reached, timeout, 0.1, what=f"run {run_id} to be {status}")


def _gated(api: httpx.Client, approvers: list[str], run_id: str | None = None) -> str:
    """A Gated run, once it waits at its gate."""
    run_id = _start(api, "Gated", {"approvers": approvers}, run_id)
    doc = _wait_status(api, run_id, "waiting")
    assert doc["gate"]["approvers"] == approvers
    return run_id


def _all_run_ids(api: httpx.Client, **params: Any) -> list[str]:
    """Every run id the list shows, following next_cursor page by page."""
    ids: list[str] = []
    cursor = None
    while True:
        page = api.get("/runs", params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        ids += [r["run_id"] for r in page.json()["runs"]]
        cursor = page.json()["next_cursor"]
        if not cursor:
            return ids


def _events(api: httpx.Client, run_id: str, event: str) -> list[dict[str, Any]]:
    history = api.get(f"/runs/{run_id}/history").json()["history"]
    return [e for e in history if e["event"] == event]


# ---- starting runs -----------------------------------------------------------------------


def test_start_by_name_is_idempotent_and_names_the_token_user(env: Env) -> None:
    with env.as_("ops-lead") as api:
        first = api.post("/runs", json={"workflow": "BuildAndDeploy", "run_id": "deploy-once",
                                        "input": {"repo": "acme/app"}})
        assert first.status_code == 201, first.text
        assert first.json()["run_id"] == "deploy-once"
        assert first.json()["workflow"] == "BuildAndDeploy"
        again = api.post("/runs", json={"workflow": "BuildAndDeploy", "run_id": "deploy-once",
                                        "input": {"repo": "acme/app"}})
        assert again.status_code in (200, 201) and again.json()["run_id"] == "deploy-once"
        _wait_status(api, "deploy-once", "completed")
        listed = _all_run_ids(api, workflow="BuildAndDeploy")
        assert listed.count("deploy-once") == 1
        started = _events(api, "deploy-once", "started")
        assert len(started) == 1, started
        assert started[0]["by"] == "ops-lead" and started[0]["source"] == "api"


def test_bad_input_is_refused_with_its_field_and_enqueues_nothing(env: Env) -> None:
    with env.as_("ops-lead") as api:
        before = sorted(_all_run_ids(api))
        missing = api.post("/runs", json={"workflow": "BuildAndDeploy", "input": {}})
        assert missing.status_code == 422, missing.text
        assert "repo" in [e["field"] for e in missing.json()["errors"]], missing.json()
        wrong = api.post("/runs", json={"workflow": "BuildAndDeploy", "input": {"repo": 5}})
        assert wrong.status_code == 422, wrong.text
        assert "repo" in [e["field"] for e in wrong.json()["errors"]], wrong.json()
        malformed = api.post("/runs", content=b'{"workflow": "BuildAndDeploy", ',
                             headers={"Content-Type": "application/json"})
        assert malformed.status_code == 422, malformed.text
        assert malformed.json()["error"]
        no_name = api.post("/runs", json={"input": {"repo": "acme/app"}})
        assert no_name.status_code == 422
        assert "workflow" in [e["field"] for e in no_name.json()["errors"]]
        unknown = api.post("/runs", json={"workflow": "NoSuchFlow", "input": {}})
        assert unknown.status_code == 404, unknown.text
        bad_id = api.post("/runs", json={"workflow": "BuildAndDeploy", "run_id": "a b/c",
                                         "input": {"repo": "acme/app"}})
        assert bad_id.status_code == 422, bad_id.text
        assert sorted(_all_run_ids(api)) == before  # nothing enqueued
        for path in ("/runs/no-such-run", "/runs/no-such-run/history"):
            assert api.get(path).status_code == 404
        gone = api.post("/runs/no-such-run/approve", json={"comment": "?"})
        assert gone.status_code == 404 and "no-such-run" in gone.json()["error"]
        assert api.get("/runs", params={"status": "sleeping"}).status_code == 422
        assert api.get("/runs", params={"cursor": "garbage"}).status_code == 422


def test_credentials_missing_bad_or_revoked_are_401(env: Env) -> None:
    with env.as_(None) as anonymous:
        for path in ("/runs", "/gates", "/workflows"):
            response = anonymous.get(path)
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.post("/runs", json={"workflow": "Gated"}).status_code == 401
    bad = httpx.Client(base_url=env.url + API, timeout=30,
                       headers={"Authorization": "Bearer not-a-token"})
    with bad:
        assert bad.get("/runs").status_code == 401
        assert bad.post("/runs", json={"workflow": "Gated"}).status_code == 401
    token = env.users.create_token("bob")
    with httpx.Client(base_url=env.url + API, timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as api:
        assert api.get("/me").json()["user"]["name"] == "bob"
        env.users.revoke(token)
        assert api.get("/me").status_code == 401
        assert api.post("/runs", json={"workflow": "Gated"}).status_code == 401


# ---- gates --------------------------------------------------------------------------------


def test_only_the_approver_decides_and_the_decision_is_recorded(env: Env) -> None:
    with env.as_("ops-lead") as lead:
        run_id = _start(lead, "BuildAndDeploy",
                        {"repo": "acme/app", "environment": "production"}, "deploy-prod")
        waiting = _wait_status(lead, run_id, "waiting")
        assert waiting["gate"]["approvers"] == ["ops-lead"]
        assert waiting["allowed"]["decide"] is True
    for name in ("bob", "vera"):  # an operator not listed; a viewer
        with env.as_(name) as api:
            refused = api.post(f"/runs/{run_id}/approve", json={"comment": "me too"})
            assert refused.status_code == 403, refused.text
            assert api.get(f"/runs/{run_id}").json()["allowed"]["decide"] is False
    with env.as_("ops-lead") as lead:
        still = lead.get(f"/runs/{run_id}").json()
        assert still["status"] == "waiting" and still["gate"]["approvals"] == []
        assert _events(lead, run_id, "gate_approved") == []
        # A start of the id reads the run, but a decision must name it whole.
        assert lead.get(f"/runs/{run_id[:-2]}").json()["run_id"] == run_id
        short = lead.post(f"/runs/{run_id[:-2]}/approve", json={"comment": "ship it"})
        assert short.status_code == 404 and "whole id" in short.json()["error"]

        approved = lead.post(f"/runs/{run_id}/approve", json={"comment": "ship it"})
        assert approved.status_code == 200, approved.text
        done = _wait_status(lead, run_id, "completed")
        assert done["output"] == {"released": "out.tar", "to": "production"}
        [entry] = _events(lead, run_id, "gate_approved")
        assert (entry["by"], entry["source"], entry["comment"]) == ("ops-lead", "api",
                                                                    "ship it")
        again = lead.post(f"/runs/{run_id}/approve")
        assert again.status_code == 409, again.text
        assert "no gate" in again.json()["error"]


def test_group_approvers_and_each_callers_gates_oldest_first(env: Env) -> None:
    with env.as_("root") as admin:
        g1 = _gated(admin, ["group:ops"], "inbox-1")
        g2 = _gated(admin, ["ops-lead"], "inbox-2")
        g3 = _gated(admin, ["alice", "someone"], "inbox-3")
        g4 = _gated(admin, ["group:dev"], "inbox-4")
        g5 = _gated(admin, ["group:ops"], "inbox-5")

    def inbox(name: str) -> list[str]:
        with env.as_(name) as api:
            response = api.get("/gates")
            assert response.status_code == 200, response.text
            return [g["run_id"] for g in response.json()["gates"]
                    if g["run_id"].startswith("inbox-")]

    assert inbox("alice") == [g1, g3, g5]
    with env.as_("alice") as alice:
        first = alice.get("/gates", params={"limit": 1}).json()
        assert [g["run_id"] for g in first["gates"]] == [g1]
        assert first["total"] == 3
        assert alice.get("/gates", params={"limit": 0}).status_code == 422
    assert inbox("ops-lead") == [g2]
    assert inbox("bob") == [g4]
    assert inbox("vera") == []  # in group ops, but viewers decide nothing
    assert inbox("root") == []  # admins decide only the gates they are listed on
    with env.as_("alice") as alice:
        gate = alice.get("/gates").json()["gates"][0]
        assert gate["gate"]["approvers"] == ["group:ops"] and gate["gate"]["prompt"]
        response = alice.post(f"/runs/{g5}/approve", json={"comment": "as ops"})
        assert response.status_code == 200, response.text
        _wait_status(alice, g5, "completed")
        [entry] = _events(alice, g5, "gate_approved")
        assert (entry["by"], entry["source"]) == ("alice", "api")
        assert alice.post(f"/runs/{g4}/approve").status_code == 403
        rejected = alice.post(f"/runs/{g1}/reject", json={"comment": "not today"})
        assert rejected.status_code == 200, rejected.text
        _wait_status(alice, g1, "failed")
    assert inbox("alice") == [g3]


# ---- pause, resume, stop ------------------------------------------------------------------


def test_pause_resume_stop_by_an_operator_and_not_by_a_viewer(env: Env) -> None:
    with env.as_("bob") as bob:
        run_id = _gated(bob, ["nobody"], "controls-1")
        with env.as_("vera") as viewer:
            for action in ("pause", "resume", "stop"):
                response = viewer.post(f"/runs/{run_id}/{action}")
                assert response.status_code == 403, (action, response.text)
            assert viewer.get(f"/runs/{run_id}").json()["allowed"]["operate"] is False
        assert bob.get(f"/runs/{run_id}").json()["allowed"]["operate"] is True
        paused = bob.post(f"/runs/{run_id}/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True, paused.text
        resumed = bob.post(f"/runs/{run_id}/resume")
        assert resumed.status_code == 200 and resumed.json()["paused"] is False
        stopped = bob.post(f"/runs/{run_id}/stop", json={"reason": "wrong branch"})
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
        assert bob.post(f"/runs/{run_id}/stop").status_code == 409  # over already
        for event in ("paused", "resumed", "stopped"):
            [entry] = _events(bob, run_id, event)
            assert (entry["by"], entry["source"]) == ("bob", "api"), entry
        assert _events(bob, run_id, "stopped")[0]["reason"] == "wrong branch"


# ---- listing -------------------------------------------------------------------------------


def test_list_filters_pages_and_prefix_search(env: Env) -> None:
    with env.as_("bob") as api:
        waiting = [_gated(api, ["nobody"], f"list-g-{i}") for i in range(6)]
        done = [_start(api, "BuildAndDeploy", {"repo": f"acme/r{i}"}, f"list-d-{i}")
                for i in range(4)]
        for run_id in done:
            _wait_status(api, run_id, "completed")

        page = api.get("/runs", params={"status": "waiting", "limit": 500}).json()
        assert {r["status"] for r in page["runs"]} == {"waiting"}
        listed = [r["run_id"] for r in page["runs"]]
        assert set(waiting) <= set(listed) and not set(done) & set(listed)
        assert page["counts"]["waiting"] == len(listed)

        both = api.get("/runs", params={"workflow": "BuildAndDeploy", "status": "completed",
                                        "limit": 500}).json()["runs"]
        assert {(r["workflow"], r["status"]) for r in both} == {("BuildAndDeploy",
                                                                 "completed")}
        assert set(done) <= {r["run_id"] for r in both}
        gated = _all_run_ids(api, workflow="Gated", limit=2)
        assert set(waiting) <= set(gated) and not set(done) & set(gated)

        # Paging across both stores (Gated's and BuildAndDeploy's deploy: prefix).
        everything = api.get("/runs", params={"limit": 500}).json()["runs"]
        paged = _all_run_ids(api, limit=3)
        assert len(paged) == len(set(paged)) == len(everything)
        assert paged == [r["run_id"] for r in everything]  # newest first, one order
        created = [r["created_at"] for r in everything]
        assert created == sorted(created, reverse=True)
        assert paged[:10] == [*reversed(done), *reversed(waiting)]

        assert api.get("/runs", params={"prefix": "list-d"}).json()["run_ids"] == done
        assert api.get("/runs", params={"prefix": "list-", "limit": 3}).json()["run_ids"] \
            == sorted(done + waiting)[:3]
        assert api.get("/runs", params={"prefix": "zzz"}).json()["run_ids"] == []
        # A unique start of an id finds the run, as on the command line.
        assert api.get("/runs/list-d-3").json()["run_id"] == "list-d-3"


# ---- sessions and trusted proxies ----------------------------------------------------------


def test_a_session_write_needs_its_csrf_token(env: Env) -> None:
    from orchestrator._console._auth import SESSION_COOKIE, Auth, AuthOptions

    auth = Auth(env.users, AuthOptions())
    cookie, session = auth.open_session(env.users.get("bob"))
    with httpx.Client(base_url=env.url + API, timeout=30,
                      cookies={SESSION_COOKIE: cookie}) as browser:
        me = browser.get("/me").json()
        assert me == {"user": env.users.get("bob").public(), "source": "console"}
        with env.as_("bob") as bob:
            run_id = _gated(bob, ["nobody"], "csrf-1")
        refused = browser.post(f"/runs/{run_id}/pause")
        assert refused.status_code == 403 and "X-CSRF-Token" in refused.json()["error"]
        wrong = browser.post(f"/runs/{run_id}/pause", headers={"X-CSRF-Token": "guess"})
        assert wrong.status_code == 403
        assert browser.get(f"/runs/{run_id}").json()["paused"] is False
        ok = browser.post(f"/runs/{run_id}/pause", headers={"X-CSRF-Token": session.csrf})
        assert ok.status_code == 200 and ok.json()["paused"] is True, ok.text
        [entry] = _events(browser, run_id, "paused")
        assert (entry["by"], entry["source"]) == ("bob", "console")


def test_trusted_header_only_from_a_trusted_proxy(env: Env) -> None:
    header = {"X-Forwarded-User": "alice"}
    trusting, url = env.cluster.console("--trust-header", "X-Forwarded-User",
                                        "--trusted-proxy", "127.0.0.1/32")
    try:
        me = httpx.get(url + API + "/me", headers=header, timeout=30)
        assert me.status_code == 200 and me.json()["user"]["name"] == "alice", me.text
        assert me.json()["source"] == "console"
        unknown = httpx.get(url + API + "/me", headers={"X-Forwarded-User": "mallory"},
                            timeout=30)
        assert unknown.status_code == 401
    finally:
        trusting.terminate()
    elsewhere, url = env.cluster.console("--trust-header", "X-Forwarded-User",
                                         "--trusted-proxy", "10.0.0.0/8", "--insecure-http")
    try:
        ignored = httpx.get(url + API + "/me", headers=header, timeout=30)
        assert ignored.status_code == 401, ignored.text
    finally:
        elsewhere.terminate()


# ---- audit ---------------------------------------------------------------------------------


def test_audit_reports_ok_then_the_first_edited_entry(env: Env) -> None:
    from orchestrator._stores import RedisStore

    with env.as_("alice") as alice:
        run_id = _gated(alice, ["group:ops"], "audit-1")
        assert alice.post(f"/runs/{run_id}/approve", json={"comment": "fine"}).status_code \
            == 200
        _wait_status(alice, run_id, "completed")
        verdict = alice.get(f"/runs/{run_id}/audit").json()["audit"]
        assert verdict["ok"] is True, verdict
        approved = _events(alice, run_id, "gate_approved")[0]
        store = RedisStore(env.cluster.redis_url, env.cluster.settings.key_prefix)
        head = store._hist(run_id)[0]
        env.redis.lset(head, approved["n"], json.dumps({**approved, "by": "mallory"}))
        verdict = alice.get(f"/runs/{run_id}/audit").json()["audit"]
        assert verdict["ok"] is False and verdict["first_bad"] == approved["n"], verdict
        assert alice.get("/runs/no-such-run/audit").status_code == 404


# ---- a database with no users -----------------------------------------------------------------


@pytest.fixture
def bare(redis_server: RedisServer,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """No users, no workers: database 1 of the same server (`env` stays on database 0)."""
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    client = redis.Redis.from_url(url)
    client.flushdb()
    cluster = Cluster(url, tmp_path_factory.mktemp("bare"))
    yield cluster
    cluster.stop()
    client.flushdb()
    client.close()


def test_with_no_users_reads_are_open_and_writes_say_how_to_add_one(bare: Cluster) -> None:
    _, url = bare.console()
    with httpx.Client(base_url=url + API, timeout=30) as anonymous:
        assert anonymous.get("/me").json() == {"user": None, "source": None}
        runs = anonymous.get("/runs")
        assert runs.status_code == 200 and runs.json()["runs"] == []
        assert anonymous.get("/workflows").status_code == 200
        assert anonymous.get("/gates").json() == {"gates": [], "total": 0}
        for path, body in (("/runs", {"workflow": "Gated"}), ("/runs/x/approve", {}),
                           ("/runs/x/stop", {})):
            response = anonymous.post(path, json=body)
            assert response.status_code == 401, (path, response.text)
            assert "orchestrator users add" in response.json()["error"]
        schema = anonymous.get("/openapi.json").json()
        assert "/runs/{run_id}/approve" in schema["paths"]


# ---- the command line -------------------------------------------------------------------------


def _console(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "console",
                           "--port", str(free_port()), *args], env=cluster.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_console_refuses_plain_http_off_loopback_and_a_header_without_a_proxy(
        bare: Cluster) -> None:
    refused = _console(bare, "--host", "0.0.0.0")
    assert refused.returncode != 0
    assert "refusing to serve plain HTTP on 0.0.0.0" in refused.stderr, refused.stderr
    assert "--insecure-http" in refused.stderr
    header_alone = _console(bare, "--trust-header", "X-Forwarded-User")
    assert header_alone.returncode != 0
    assert "--trust-header needs --trusted-proxy" in header_alone.stderr
    bad_net = _console(bare, "--trust-header", "X-Forwarded-User",
                       "--trusted-proxy", "not-a-net")
    assert bad_net.returncode != 0 and "--trusted-proxy" in bad_net.stderr
    half_tls = _console(bare, "--certfile", str(ROOT / "pyproject.toml"))
    assert half_tls.returncode != 0 and "--keyfile" in half_tls.stderr

    served, url = bare.console("--host", "0.0.0.0", "--insecure-http")
    try:
        assert httpx.get(url + API + "/me", timeout=30).status_code == 200
    finally:
        served.terminate()
