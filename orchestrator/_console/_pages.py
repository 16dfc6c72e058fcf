"""The console's server-rendered pages (placeholder until the pages land)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from ._auth import Auth
from ._service import Operations


def build_pages(ops: Operations, auth: Auth) -> APIRouter:
    router = APIRouter()

    @router.get("/", response_class=PlainTextResponse)
    def index() -> str:
        return "orchestrator console"

    return router
