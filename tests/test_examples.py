"""The Flask example, driven through Flask's test client against a real cluster."""

from __future__ import annotations

from typing import Any

from orchestrator import Client
from tests.conftest import Cluster, free_port, wait_for


def _error(response: Any, code: int) -> str:
    """A JSON error with that status (not Flask's HTML error page)."""
    assert response.status_code == code, (response.status_code, response.data)
    message: str = response.get_json()["error"]
    return message


def test_flask_app_enqueues_and_reads_status(cluster: Cluster, redis_url: str) -> None:
    from examples.flask_app import create_app

    http = create_app(Client(redis_url)).test_client()
    assert "repo" in _error(http.post("/deploys", json={"repository": "acme/app"}), 422)
    assert "JSON object" in _error(http.post("/deploys", data="not json"), 422)

    started = http.post("/deploys", json={"repo": "acme/app", "environment": "production"})
    assert started.status_code == 202
    run_id = started.get_json()["run_id"]
    waiting = wait_for(lambda: (r := http.get(f"/deploys/{run_id}").get_json())["status"]
                       == "waiting" and r, 60, what="the gate")
    assert waiting["gate"]["approvers"] == ["ops-lead"] and waiting["step"] == "Deploy"
    approve = f"/deploys/{run_id}/approve"

    def as_user(name: str) -> dict[str, Any]:
        return {"environ_overrides": {"REMOTE_USER": name}}

    # The body cannot name the approver: only the signed-in user counts.
    assert "sign in" in _error(http.post(approve, json={"as": "ops-lead"}), 401)
    assert "comment" in _error(http.post(approve, json={"comment": 7}, **as_user("ops-lead")),
                               422)
    _error(http.post(approve, json={"as": "ops-lead"}, **as_user("intern")), 403)
    assert http.post(approve, json={"comment": "ship it"},
                     **as_user("ops-lead")).status_code == 200
    done = wait_for(lambda: (r := http.get(f"/deploys/{run_id}").get_json())["status"]
                    == "completed" and r, 60, what="the deploy to finish")
    assert done["state"]["released"] is True
    approved = next(e for e in Client(redis_url).attach(run_id).history()
                    if e["event"] == "gate_approved")
    assert (approved["by"], approved["comment"]) == ("ops-lead", "ship it")
    _error(http.post(approve, json={}, **as_user("ops-lead")), 409)
    _error(http.get("/deploys/nope"), 404)
    assert "nope" in _error(http.post("/deploys/nope/approve", json={}, **as_user("ops-lead")),
                            404)


def test_flask_app_without_redis_answers_503() -> None:
    from examples.flask_app import create_app

    http = create_app(Client(f"redis://127.0.0.1:{free_port()}/0")).test_client()
    assert "unreachable" in _error(http.get("/deploys/r1"), 503)
    _error(http.post("/deploys", json={"repo": "acme/app"}), 503)
