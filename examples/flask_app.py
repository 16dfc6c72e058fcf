"""A Flask app that enqueues deploys and reads their status, without importing the
workflow code: it only knows the workflow's name from the catalog.

    ORCHESTRATOR_REDIS_URL=redis://127.0.0.1:6379/0 flask --app examples.flask_app run
    curl -XPOST localhost:5000/deploys -H 'content-type: application/json' \\
         -d '{"repo": "acme/app", "environment": "production"}'
    curl localhost:5000/deploys/<run_id>
    curl -XPOST localhost:5000/deploys/<run_id>/approve -d '{"as": "ops-lead"}' ...
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request

from orchestrator import Client, ControlError, InvalidInput, RunNotFound, UnknownWorkflow


def create_app(client: Client | None = None) -> Flask:
    app = Flask(__name__)
    orchestrator = client or Client()

    @app.post("/deploys")
    def start() -> Any:
        try:
            run = orchestrator.start("BuildAndDeploy", request.get_json(force=True))
        except InvalidInput as exc:
            return jsonify(error=str(exc)), 422
        except UnknownWorkflow as exc:
            return jsonify(error=str(exc)), 503
        return jsonify(run_id=run.run_id), 202

    @app.get("/deploys/<run_id>")
    def status(run_id: str) -> Any:
        try:
            rec = orchestrator.attach(run_id, "BuildAndDeploy").record()
        except RunNotFound:
            return jsonify(error=f"no deploy {run_id}"), 404
        gate = rec.gate.model_dump(include={"step", "approvers", "prompt"}) if rec.gate else None
        return jsonify(run_id=rec.run_id, status=rec.status.value, step=rec.current_step,
                       state=rec.state, gate=gate, error=str(rec.error) if rec.error else None)

    @app.post("/deploys/<run_id>/approve")
    def approve(run_id: str) -> Any:
        body = request.get_json(force=True)
        try:
            orchestrator.attach(run_id, "BuildAndDeploy").approve(by=body["as"],
                                                                  comment=body.get("comment"))
        except PermissionError as exc:
            return jsonify(error=str(exc)), 403
        except ControlError as exc:
            return jsonify(error=str(exc)), 409
        return jsonify(run_id=run_id), 200

    return app
