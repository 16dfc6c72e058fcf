"""The Flask example, driven through Flask's test client against a real cluster."""

from __future__ import annotations

from orchestrator import Client
from tests.conftest import Cluster, wait_for


def test_flask_app_enqueues_and_reads_status(cluster: Cluster, redis_url: str) -> None:
    from examples.flask_app import create_app

    http = create_app(Client(redis_url)).test_client()
    bad = http.post("/deploys", json={"repository": "acme/app"})
    assert bad.status_code == 422 and "repo" in bad.get_json()["error"]

    started = http.post("/deploys", json={"repo": "acme/app", "environment": "production"})
    assert started.status_code == 202
    run_id = started.get_json()["run_id"]
    waiting = wait_for(lambda: (r := http.get(f"/deploys/{run_id}").get_json())["status"]
                       == "waiting" and r, 60, what="the gate")
    assert waiting["gate"]["approvers"] == ["ops-lead"] and waiting["step"] == "Deploy"
    assert http.post(f"/deploys/{run_id}/approve", json={"as": "intern"}).status_code == 403
    assert http.post(f"/deploys/{run_id}/approve", json={"as": "ops-lead"}).status_code == 200
    done = wait_for(lambda: (r := http.get(f"/deploys/{run_id}").get_json())["status"]
                    == "completed" and r, 60, what="the deploy to finish")
    assert done["state"]["released"] is True
    assert http.post(f"/deploys/{run_id}/approve", json={"as": "ops-lead"}).status_code == 409
    assert http.get("/deploys/nope").status_code == 404
