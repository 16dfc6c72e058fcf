"""The console's server-rendered pages: sign-in, runs, a run (live), the inbox, the
catalog and the start form.

Every page reads and writes through `Operations`, like the API, so both agree on who may
do what. Jinja2 autoescapes everything; the only markup passed through unescaped is the
pages' own rendered fragments. State-changing posts carry the session's CSRF token in the
hidden field `csrf`, checked before anything else; the pages' small script (static/
console.js) posts the same forms with fetch so a run page keeps polling while one decides.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from .._records import RunStatus
from .._stores import StoreUnavailable
from . import _views
from ._auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE, SESSION_TTL, Auth
from ._service import Conflict, Forbidden, Identity, Invalid, NotFound, Operations, RunView

PAGE_SIZE = 25
MAX_COMMENT = 2000
TIMELINE_LIMIT = 300  # newest entries a run page shows; the API has them all
LOGIN_CSRF_TTL = 3600
NOTICES = {"approved": "Approved.", "rejected": "Rejected.", "pause": "Paused.",
           "resume": "Resumed.", "stop": "Stopped."}
ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (Forbidden, 403), (NotFound, 404), (Conflict, 409), (Invalid, 422), (StoreUnavailable, 503))
LIVE_PARTS = ("summary", "actions", "gate", "error", "audit", "graph", "timeline", "data")

__all__ = ["build_pages"]

INBOX_SHOWN = 200  # the longest waiting; the rest follow as those are decided


class SignInRequired(Exception):
    """Users exist and nobody is signed in: the page sends them to /login."""


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("orchestrator._console", "templates"),
                      autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["when"] = _views.when
    env.filters["pretty"] = _views.pretty
    env.filters["by_queue"] = _views.by_queue
    env.filters["step"] = _views.step_name
    env.filters["urlquote"] = lambda s: quote(str(s), safe="")
    return env


TEMPLATES = Jinja2Templates(env=_environment())


@dataclass
class Viewer:
    """Who is looking, and what every page's chrome needs to know about them."""

    identity: Identity | None
    read_only: bool  # no users configured: nobody may change anything
    csrf: str | None
    operator: bool
    inbox: int = 0
    cookies: dict[str, str] = field(default_factory=dict)  # to set on the response


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never `//evil` or `https://evil`."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def build_pages(ops: Operations, auth: Auth) -> APIRouter:
    pages = Pages(ops, auth)
    router = APIRouter(route_class=pages.route_class())
    pages.mount(router)
    return router


class Pages:
    def __init__(self, ops: Operations, auth: Auth) -> None:
        self.ops = ops
        self.auth = auth

    # ---- plumbing -------------------------------------------------------------------------

    def route_class(self) -> type[APIRoute]:
        """Routes whose errors become pages (or JSON for the script): a router cannot
        have exception handlers of its own."""
        pages = self

        class PageRoute(APIRoute):
            def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
                handler = super().get_route_handler()

                async def guarded(request: Request) -> Response:
                    try:
                        return await handler(request)
                    except Exception as exc:  # mapped below, or raised again
                        return await pages.failure(request, exc)

                return guarded

        return PageRoute

    async def failure(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, SignInRequired):
            if _wants_json(request):
                return JSONResponse({"error": "sign in"}, status_code=401)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/login?" + urlencode({"next": target}), 303)
        status = next((code for kind, code in ERRORS if isinstance(exc, kind)), None)
        if status is None:
            raise exc
        message = str(exc) if status != 503 else f"The store is unreachable: {exc}"
        if _wants_json(request):
            return JSONResponse({"error": message}, status_code=status)
        viewer = await run_in_threadpool(self.viewer, request, False)
        return self.render(request, viewer, "error.html",
                           {"status": status, "message": message,
                            "title": {403: "Not allowed", 404: "Not found",
                                      409: "Not possible now", 422: "Invalid request",
                                      503: "Unavailable"}[status]}, status)

    def viewer(self, request: Request, required: bool = True) -> Viewer:
        """The signed-in user (or anonymous, read-only, when no users exist)."""
        anyone = self.ops.anyone_registered()
        who = self.auth.console_identity(request)
        if who is None and anyone and required:
            raise SignInRequired()
        viewer = Viewer(who, read_only=not anyone, csrf=self.auth.csrf_token(request),
                        operator=self.ops.may_operate(who))
        if who is not None and self.auth.proxied_user(request) is not None:
            self._proxy_session(request, viewer)
        if who is not None:
            viewer.inbox = self.ops.inbox_count(who)
        return viewer

    def _proxy_session(self, request: Request, viewer: Viewer) -> None:
        """A trusted proxy's user has no sign-in: give them a session, so their forms carry
        a token the proxy's own cookies cannot stand in for."""
        assert viewer.identity is not None
        session = self.auth.session(request)
        if session is not None and session.user == viewer.identity.name:
            return
        cookie, session = self.auth.open_session(viewer.identity.user)
        viewer.csrf = session.csrf
        viewer.cookies[SESSION_COOKIE] = cookie

    def render(self, request: Request, viewer: Viewer, template: str,
               context: dict[str, Any], status: int = 200) -> Response:
        response = TEMPLATES.TemplateResponse(
            request, template, {"viewer": viewer, "path": request.url.path, **context},
            status_code=status)
        for name, value in viewer.cookies.items():
            self.set_cookie(response, name, value, SESSION_TTL)
        response.headers["Cache-Control"] = "no-store"
        return response

    def set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                            samesite="lax", secure=self.auth.options.secure_cookies)

    async def writer(self, request: Request) -> tuple[Viewer, dict[str, str]]:
        """The viewer and the posted form, once the CSRF token checks out."""
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        viewer = await run_in_threadpool(self.viewer, request)
        if viewer.identity is None:
            raise Forbidden("the console is read-only: no users are configured (add one "
                            "with `orchestrator users add NAME --role operator`)")
        if not self.auth.csrf_ok(request, form.get("csrf")):
            raise Forbidden("the form's security token is missing or stale: reload the page "
                            "and try again")
        return viewer, form

    def done(self, request: Request, to: str, what: str) -> Response:
        """After a successful post: JSON for the script, else back to the page, which says
        what happened (a code, so a link cannot make the page say anything else)."""
        if _wants_json(request):
            return JSONResponse({"ok": True, "message": NOTICES[what]})
        return RedirectResponse(f"{to}?{urlencode({'done': what})}", 303)

    # ---- routes ---------------------------------------------------------------------------

    def mount(self, router: APIRouter) -> None:
        router.add_api_route("/login", self.login_form, methods=["GET"])
        router.add_api_route("/login", self.login, methods=["POST"])
        router.add_api_route("/logout", self.logout, methods=["POST"])
        router.add_api_route("/", self.runs, methods=["GET"])
        router.add_api_route("/runs", self.runs, methods=["GET"])
        router.add_api_route("/runs/{run_id}", self.run, methods=["GET"])
        router.add_api_route("/runs/{run_id}/live", self.live, methods=["GET"])
        router.add_api_route("/runs/{run_id}/approve", self.approve, methods=["POST"])
        router.add_api_route("/runs/{run_id}/reject", self.reject, methods=["POST"])
        for action in ("pause", "resume", "stop"):
            router.add_api_route(f"/runs/{{run_id}}/{action}", self.controller(action),
                                 methods=["POST"], name=action)
        router.add_api_route("/inbox", self.inbox, methods=["GET"])
        router.add_api_route("/workflows", self.workflows, methods=["GET"])
        router.add_api_route("/workflows/{name}/start", self.start_form, methods=["GET"])
        router.add_api_route("/workflows/{name}/start", self.start, methods=["POST"])

    # ---- signing in and out ---------------------------------------------------------------

    async def login_form(self, request: Request, next: str = "/") -> Response:
        viewer = await run_in_threadpool(self.viewer, request, False)
        if viewer.identity is not None:
            return RedirectResponse(_safe_next(next), 303)
        return self.login_page(request, viewer, next)

    def login_page(self, request: Request, viewer: Viewer, next: str, error: str = "",
                   name: str = "", status: int = 200) -> Response:
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
        viewer.csrf = token
        response = self.render(request, viewer, "login.html",
                               {"title": "Sign in", "next": _safe_next(next), "error": error,
                                "name": name},
                               status)
        self.set_cookie(response, LOGIN_CSRF_COOKIE, token, LOGIN_CSRF_TTL)
        return response

    async def login(self, request: Request) -> Response:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        viewer = await run_in_threadpool(self.viewer, request, False)
        name, next_page = form.get("username", "").strip(), form.get("next", "/")
        if not self.auth.csrf_ok(request, form.get("csrf")):
            return self.login_page(request, viewer, next_page, "The form expired; please "
                                   "sign in again.", name, 403)
        addr = request.client.host if request.client else "-"
        delay, locked = await run_in_threadpool(self.auth.delay_for, name, addr)
        if locked:
            return self.login_page(request, viewer, next_page, "Too many failed sign-ins; "
                                   "try again in a few minutes.", name, 429)
        user = await run_in_threadpool(self.ops.users.authenticate, name,
                                       form.get("password", ""))
        if user is None:
            await run_in_threadpool(self.auth.failed, name, addr)
            delay, _ = await run_in_threadpool(self.auth.delay_for, name, addr)
            await asyncio.sleep(delay)  # slows guessing; says nothing about the name
            return self.login_page(request, viewer, next_page, "Wrong name or password.",
                                   name, 401)
        self.auth.succeeded(name)
        self.auth.close_session(request)  # never keep a session id from before sign-in
        cookie, _ = self.auth.open_session(user)
        response = RedirectResponse(_safe_next(next_page), 303)
        self.set_cookie(response, SESSION_COOKIE, cookie, SESSION_TTL)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        return response

    async def logout(self, request: Request) -> Response:
        await self.writer(request)
        self.auth.close_session(request)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ---- runs -----------------------------------------------------------------------------

    def runs(self, request: Request, status: str | None = None, workflow: str | None = None,
             cursor: str | None = None, q: str | None = None) -> Response:
        viewer = self.viewer(request)
        chosen = _status(status)
        workflow = workflow or None
        found = self.ops.find(q.strip()) if q and q.strip() else None
        page = self.ops.runs(chosen, workflow, PAGE_SIZE, cursor or None)
        counts = self.ops.counts(workflow)
        names = sorted(e.name for e in self.ops.workflows())
        return self.render(request, viewer, "runs.html", {
            "title": "Runs", "page": page, "counts": counts, "status": chosen,
            "workflow": workflow, "workflows": names, "q": q or "", "found": found,
            "cursor": cursor, "statuses": list(RunStatus),
            "unhosted": self.ops.unhosted(page.records),
            "next_url": _query(status=chosen, workflow=workflow, cursor=page.next_cursor)
            if page.next_cursor else None,
            "filter_url": lambda s: _query(status=s, workflow=workflow)})

    def run(self, request: Request, run_id: str, done: str | None = None) -> Response:
        viewer = self.viewer(request)
        run = self.ops.look(run_id)
        record, parts = run.record, self.parts(viewer, run)
        return self.render(request, viewer, "run.html", {
            "title": f"Run {record.run_id}", "record": record, "parts": parts,
            "notice": NOTICES.get(done or "", ""), "terminal": record.status.is_terminal})

    def live(self, request: Request, run_id: str) -> Response:
        """The run page's parts, re-rendered, each with a version the script compares."""
        viewer = self.viewer(request)
        run = self.ops.look(run_id)
        record, parts = run.record, self.parts(viewer, run)
        return JSONResponse({
            "status": record.status.value, "terminal": record.status.is_terminal,
            "inbox": viewer.inbox, "parts": {name: {"html": str(p["html"]), "version": p["version"]}
                      for name, p in parts.items()}},
            headers={"Cache-Control": "no-store"})

    def parts(self, viewer: Viewer, run: RunView) -> dict[str, dict[str, Any]]:
        context = self.run_context(viewer, run)
        parts = {}
        for name in LIVE_PARTS:
            html = TEMPLATES.get_template(f"part_{name}.html").render(context)
            parts[name] = {"html": Markup(html),  # our own rendering, escaped inside
                           "version": hashlib.sha1(html.encode()).hexdigest()[:16]}
        return parts

    def run_context(self, viewer: Viewer, run: RunView) -> dict[str, Any]:
        record, history, audit = run.record, run.history, run.audit
        try:
            entry = self.ops.workflow(record.workflow)
            shape = entry.shape or {s: {"next": t} for s, t in entry.graph.items()}
        except NotFound:  # no live host publishes it any more: no graph to draw
            shape = {}
        bad = None
        if audit and not audit["ok"] and audit.get("first_bad") is not None:
            bad = next((e for e in history if e.get("n") == audit["first_bad"]), None)
        rows = _views.timeline(history)
        first = history[0] if history else {}
        return {"viewer": viewer, "record": record,
                "started_by": first.get("by") if first.get("event") == "started" else None,
                "started_via": first.get("source"),
                "unhosted": run.unhosted,
                "graph": _views.layout(shape, record, history) if shape else None,
                "rows": rows[-TIMELINE_LIMIT:], "hidden_rows": max(0, len(rows) -
                                                                  TIMELINE_LIMIT),
                "audit": audit, "bad_entry": bad,
                "may_decide": self.ops.may_decide(viewer.identity, record),
                "may_operate": self.ops.may_operate(viewer.identity)
                and not record.status.is_terminal}

    async def approve(self, request: Request, run_id: str) -> Response:
        return await self.decide(request, run_id, True)

    async def reject(self, request: Request, run_id: str) -> Response:
        return await self.decide(request, run_id, False)

    async def decide(self, request: Request, run_id: str, approve: bool) -> Response:
        viewer, form = await self.writer(request)
        comment = form.get("comment", "").strip()[:MAX_COMMENT] or None
        record = await run_in_threadpool(self.ops.decide, viewer.identity, run_id, approve,
                                         comment)
        return self.done(request, f"/runs/{quote(record.run_id, safe='')}",
                         "approved" if approve else "rejected")

    def controller(self, action: str) -> Callable[[Request, str], Awaitable[Response]]:
        async def control(request: Request, run_id: str) -> Response:
            viewer, form = await self.writer(request)
            if action == "stop" and form.get("confirm") != "yes":
                record = await run_in_threadpool(self.ops.run, run_id)
                return self.render(request, viewer, "stop.html",
                                   {"title": "Stop run", "record": record})
            record = await run_in_threadpool(self.ops.control, viewer.identity, run_id,
                                             action, form.get("reason", "").strip() or None)
            return self.done(request, f"/runs/{quote(record.run_id, safe='')}", action)

        return control

    # ---- inbox and catalog ------------------------------------------------------------------

    def inbox(self, request: Request) -> Response:
        viewer = self.viewer(request)
        page = self.ops.inbox_page(viewer.identity, INBOX_SHOWN)
        return self.render(request, viewer, "inbox.html",
                           {"title": "Inbox", "records": page.records, "total": page.total})

    def workflows(self, request: Request) -> Response:
        viewer = self.viewer(request)
        entries = self.ops.workflows()
        counts = {e.name: self.ops.counts(e.name) for e in entries}
        in_flight = {e.name: self.ops.in_flight(e.name) for e in entries}
        return self.render(request, viewer, "workflows.html",
                           {"title": "Workflows", "entries": entries, "counts": counts,
                            "in_flight": in_flight})

    def start_form(self, request: Request, name: str) -> Response:
        viewer = self.viewer(request)
        entry = self.ops.workflow(name)
        self.must_operate(viewer)
        return self.render(request, viewer, "start.html", {
            "title": f"Start {entry.name}", "entry": entry,
            "fields": _views.form_fields(entry.input_schema), "errors": []})

    async def start(self, request: Request, name: str) -> Response:
        viewer, form = await self.writer(request)
        self.must_operate(viewer)
        entry = await run_in_threadpool(self.ops.workflow, name)
        fields = _views.form_fields(entry.input_schema)
        data, errors = _views.parse_form(fields, form)
        general: list[str] = []
        if not errors:
            try:
                handle = await run_in_threadpool(self.ops.start, viewer.identity, entry.name,
                                                 data)
            except Invalid as exc:
                general = _place_errors(fields, exc.errors)
            else:
                return RedirectResponse(f"/runs/{quote(handle.run_id, safe='')}", 303)
        for f in fields:
            f.error = errors.get(f.name, f.error)
        return self.render(request, viewer, "start.html", {
            "title": f"Start {entry.name}", "entry": entry, "fields": fields,
            "errors": general}, 422)

    @staticmethod
    def must_operate(viewer: Viewer) -> None:
        if viewer.identity is None:
            raise Forbidden("the console is read-only: no users are configured")
        if not viewer.operator:
            raise Forbidden("starting a run needs the operator or admin role")


def _status(value: str | None) -> RunStatus | None:
    try:
        return RunStatus(value) if value else None
    except ValueError:
        raise Invalid(f"unknown status {value!r}", [("status", "unknown")]) from None


def _query(**params: Any) -> str:
    kept = {k: str(v) for k, v in params.items() if v}
    return "/?" + urlencode(kept) if kept else "/"


def _place_errors(fields: list[_views.FormField], errors: list[tuple[str, str]]) -> list[str]:
    """Put each (dotted field, message) beside its top-level field; the rest go on top."""
    by_name = {f.name: f for f in fields}
    general = []
    for path, message in errors:
        top, _, rest = path.partition(".")
        target = by_name.get(top)
        if target is None:
            general.append(f"{path}: {message}" if path else message)
        else:
            target.error = f"{rest}: {message}" if rest else message
    return general
