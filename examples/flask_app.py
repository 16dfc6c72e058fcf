"""A Flask app that enqueues deploys and reads their status, without importing the
workflow code: it only knows the workflow's name from the catalog.

    ORCHESTRATOR_REDIS_URL=redis://127.0.0.1:6379/0 flask --app examples.flask_app run
    curl -XPOST localhost:5000/deploys -H 'content-type: application/json' \\
         -d '{"repo": "acme/app", "environment": "production"}'
    curl localhost:5000/deploys/<run_id>
    curl -XPOST localhost:5000/deploys/<run_id>/approve -d '{"comment": "ship it"}' ...

Who approves is the user the app authenticated (`REMOTE_USER`, as a front server or an
auth middleware sets it), never a name in the request's body: anyone can type a name.

Every error is JSON: 401 nobody signed in, 404 no such deploy, 422 a body that is not what
the endpoint takes, 403 not an approver, 409 a decision on a run no longer waiting for one,
503 no live worker or Redis unreachable.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request

from orchestrator import (
    Client,
    ControlError,
    InvalidInput,
    RunNotFound,
    StoreUnavailable,
    UnknownWorkflow,
)

WORKFLOW = "BuildAndDeploy"

class Unauthenticated(Exception):
    """No signed-in user where one must decide."""


# Flask picks the handler of the nearest class in an exception's MRO, so order is free.
ERRORS: dict[type[Exception], int] = {
    Unauthenticated: 401,
    RunNotFound: 404,
    InvalidInput: 422,
    PermissionError: 403,  # the engine's "not an approver of this gate"
    ControlError: 409,
    UnknownWorkflow: 503,  # NoLiveWorker included: nobody would run it now
    StoreUnavailable: 503,
}


def create_app(client: Client | None = None) -> Flask:
    app = Flask(__name__)
    orchestrator = client or Client()

    def error(exc: Exception) -> Any:
        return jsonify(error=str(exc)), ERRORS[next(c for c in type(exc).__mro__
                                                     if c in ERRORS)]

    for kind in ERRORS:
        app.register_error_handler(kind, error)

    def body() -> dict[str, Any]:
        data = request.get_json(force=True, silent=True)
        if not isinstance(data, dict):
            raise InvalidInput("the body must be a JSON object")
        return data

    def signed_in() -> str:
        if not request.remote_user:
            raise Unauthenticated("sign in first: the approver is the signed-in user")
        return request.remote_user

    @app.post("/deploys")
    def start() -> Any:
        run = orchestrator.start(WORKFLOW, body(), by=request.remote_user)
        return jsonify(run_id=run.run_id), 202

    @app.get("/deploys/<run_id>")
    def status(run_id: str) -> Any:
        rec = orchestrator.attach(run_id, WORKFLOW).record()
        gate = rec.gate.model_dump(include={"step", "approvers", "prompt"}) if rec.gate else None
        return jsonify(run_id=rec.run_id, status=rec.status.value, step=rec.current_step,
                       state=rec.state, gate=gate, error=str(rec.error) if rec.error else None)

    @app.post("/deploys/<run_id>/approve")
    def approve(run_id: str) -> Any:
        who = signed_in()
        comment = body().get("comment")
        if comment is not None and not isinstance(comment, str):
            raise InvalidInput("comment must be a string")
        run = orchestrator.attach(run_id, WORKFLOW)
        run.approve(by=who, comment=comment)
        return jsonify(run_id=run.run_id), 200

    return app
