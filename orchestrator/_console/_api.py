"""The JSON API, mounted at /api/v1 (its OpenAPI schema at /api/v1/openapi.json).

Callers present `Authorization: Bearer <token>` (`orchestrator tokens create NAME`). The
console's own pages may read it with their session cookie; a write made with the cookie
must also carry the session's CSRF token in `X-CSRF-Token`. Errors are JSON
`{"error": message, "errors": [{"field", "message"}]}` with 400/422 for bad input, 401 no
credentials, 403 not allowed, 404 no such run or workflow, 409 not possible in the run's
state (e.g. no gate waits).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .._records import RunRecord, RunStatus
from .._stores import StoreUnavailable
from ._auth import Auth
from ._service import Conflict, Forbidden, Identity, Invalid, NotFound, Operations

MAX_COMMENT = 2000


class Unauthenticated(Exception):
    """No (valid) credentials (HTTP 401)."""


class StartRun(BaseModel):
    workflow: str = Field(description="the workflow's name in the catalog")
    input: dict[str, Any] = Field(default_factory=dict,
                                  description="checked against the workflow's input schema")
    run_id: str | None = Field(None, description="for idempotent starts: the same id starts "
                                                 "one run")


class DecisionBody(BaseModel):
    comment: str | None = Field(None, max_length=MAX_COMMENT)


class StopBody(BaseModel):
    reason: str | None = Field(None, max_length=MAX_COMMENT)


def summary(record: RunRecord) -> dict[str, Any]:
    """A run as a list shows it."""
    return {"run_id": record.run_id, "workflow": record.workflow, "version": record.version,
            "status": record.status.value, "current_step": record.current_step,
            "created_at": record.created_at, "updated_at": record.updated_at,
            "waiting_for": record.waiting_for()}


def detail(ops: Operations, who: Identity | None, record: RunRecord) -> dict[str, Any]:
    """A run in full, with what the caller may do to it."""
    doc = record.model_dump(mode="json")
    doc["allowed"] = {"decide": ops.may_decide(who, record),
                      "operate": ops.may_operate(who) and not record.status.is_terminal}
    return doc


def _error(status: int, message: str, errors: list[tuple[str, str]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": message,
            "errors": [{"field": f, "message": m} for f, m in (errors or [])]}
    return JSONResponse(body, status_code=status, headers=headers)


def _parts(request: Request) -> tuple[Operations, Auth]:
    return request.app.state.ops, request.app.state.auth


def reader(request: Request) -> Identity | None:
    ops, auth = _parts(request)
    who = auth.api_identity(request)
    if who is None and (auth.presented_token(request) or ops.anyone_registered()):
        raise Unauthenticated("sign in: send 'Authorization: Bearer <token>' "
                              "(orchestrator tokens create NAME)")
    return who


def writer(request: Request) -> Identity:
    ops, auth = _parts(request)
    who = auth.api_identity(request)
    if who is None:
        if not ops.anyone_registered():
            raise Unauthenticated("no users are configured, so nothing may be changed: "
                                  "add one with `orchestrator users add NAME --role "
                                  "operator`, then `orchestrator tokens create NAME`")
        raise Unauthenticated("send 'Authorization: Bearer <token>' "
                              "(orchestrator tokens create NAME)")
    if who.source == "console" and not auth.csrf_ok(
            request, request.headers.get("x-csrf-token")):
        raise Forbidden("a write with the console's session needs its X-CSRF-Token")
    return who


Reader = Annotated[Identity | None, Depends(reader)]
Writer = Annotated[Identity, Depends(writer)]


def build_api(ops: Operations, auth: Auth) -> FastAPI:
    api = FastAPI(title="orchestrator", version="1",
                  description="Start and follow workflow runs; decide their gates.",
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  servers=[{"url": "/api/v1"}])
    api.state.ops = ops
    api.state.auth = auth

    @api.exception_handler(Unauthenticated)
    def _401(request: Request, exc: Unauthenticated) -> JSONResponse:
        return _error(401, str(exc), headers={"WWW-Authenticate": "Bearer"})

    @api.exception_handler(Forbidden)
    def _403(request: Request, exc: Forbidden) -> JSONResponse:
        return _error(403, str(exc))

    @api.exception_handler(NotFound)
    def _404(request: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc))

    @api.exception_handler(Conflict)
    def _409(request: Request, exc: Conflict) -> JSONResponse:
        return _error(409, str(exc))

    @api.exception_handler(Invalid)
    def _422(request: Request, exc: Invalid) -> JSONResponse:
        return _error(422, str(exc), exc.errors)

    @api.exception_handler(RequestValidationError)
    def _422_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [(".".join(str(p) for p in e["loc"] if p != "body"), e["msg"])
                  for e in exc.errors()]
        return _error(422, "invalid request: " + "; ".join(f"{f}: {m}" for f, m in errors),
                      errors)

    @api.exception_handler(StoreUnavailable)
    def _503(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return _error(503, f"the store is unreachable: {exc}")


    @api.get("/me")
    def me(who: Reader) -> dict[str, Any]:
        """The caller, as the API sees them."""
        return {"user": who.user.public() if who else None,
                "source": who.source if who else None}

    @api.get("/workflows")
    def workflows(who: Reader) -> dict[str, Any]:
        """The catalog: every published workflow with its schemas, queues and live hosts."""
        return {"workflows": [e.model_dump(mode="json") for e in ops.workflows()]}

    @api.get("/workflows/{name}")
    def workflow(name: str, who: Reader) -> dict[str, Any]:
        entry = ops.workflow(name)
        doc = entry.model_dump(mode="json")
        doc["runs"] = {s.value: n for s, n in ops.counts(name).by_status.items()}
        doc["in_flight"] = ops.in_flight(name)  # per version: when 0, its workers can go
        return doc

    @api.post("/runs", status_code=201)
    def start(body: StartRun, who: Writer) -> dict[str, Any]:
        """Start a run by workflow name; the same `run_id` starts one run."""
        handle = ops.start(who, body.workflow, body.input, body.run_id)
        return detail(ops, who, handle.record())

    @api.get("/runs")
    def runs(who: Reader, status: RunStatus | None = None, workflow: str | None = None,
             limit: Annotated[int, Query(ge=1, le=500)] = 50, cursor: str | None = None,
             prefix: Annotated[str | None, Query(max_length=200)] = None,
             ) -> dict[str, Any]:
        """Runs newest first; pass `next_cursor` back as `cursor` for the next page.
        `prefix` lists the run ids starting with it instead."""
        if prefix:
            return {"run_ids": ops.find(prefix, limit)}
        page = ops.runs(status, workflow, limit, cursor)
        return {"runs": [summary(r) for r in page.records], "next_cursor": page.next_cursor,
                "counts": {s.value: n for s, n in ops.counts(workflow).by_status.items()}}

    @api.get("/runs/{run_id}")
    def run(run_id: str, who: Reader) -> dict[str, Any]:
        return detail(ops, who, ops.run(run_id))

    @api.get("/runs/{run_id}/history")
    def history(run_id: str, who: Reader,
                start: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        return {"history": ops.history(run_id, start)}

    @api.get("/runs/{run_id}/audit")
    def audit(run_id: str, who: Reader) -> dict[str, Any]:
        """The audit chain's verdict (null when this server holds no audit key)."""
        ops.run(run_id)
        return {"audit": ops.audit(run_id)}

    @api.post("/runs/{run_id}/approve")
    def approve(run_id: str, who: Writer, body: DecisionBody | None = None) -> dict[str, Any]:
        record = ops.decide(who, run_id, True, body.comment if body else None)
        return detail(ops, who, record)

    @api.post("/runs/{run_id}/reject")
    def reject(run_id: str, who: Writer, body: DecisionBody | None = None) -> dict[str, Any]:
        record = ops.decide(who, run_id, False, body.comment if body else None)
        return detail(ops, who, record)

    @api.post("/runs/{run_id}/pause")
    def pause(run_id: str, who: Writer) -> dict[str, Any]:
        return detail(ops, who, ops.control(who, run_id, "pause"))

    @api.post("/runs/{run_id}/resume")
    def resume(run_id: str, who: Writer) -> dict[str, Any]:
        return detail(ops, who, ops.control(who, run_id, "resume"))

    @api.post("/runs/{run_id}/stop")
    def stop(run_id: str, who: Writer, body: StopBody | None = None) -> dict[str, Any]:
        return detail(ops, who, ops.control(who, run_id, "stop", body.reason if body else None))

    @api.get("/gates")
    def gates(who: Reader,
              limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
        """The gates the caller may decide, the longest waiting first: the first `limit`,
        and `total`, how many there are."""
        inbox = ops.inbox_page(who, limit)
        return {"gates": [summary(r) | {"gate": r.gate.model_dump(mode="json") if r.gate
                                        else None} for r in inbox.records],
                "total": inbox.total}

    return api
