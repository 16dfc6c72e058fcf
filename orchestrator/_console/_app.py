"""The console's ASGI app: pages at /, the JSON API at /api/v1, assets at /static."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from .._client import Client
from .._config import Settings
from .._identity import Users
from ._api import build_api
from ._auth import Auth, AuthOptions
from ._pages import build_pages
from ._service import Operations

# Everything the pages need ships in the package: no other origin is ever contacted.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


def create_console(settings: Settings | None = None,
                   auth_options: AuthOptions | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    client = Client(settings=settings)
    users = Users(client.redis, settings.key_prefix, url=settings.redis_url)
    ops = Operations(client, users)
    auth = Auth(users, auth_options or AuthOptions())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        client.close()

    app = FastAPI(title="orchestrator console", docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.ops = ops
    app.state.auth = auth
    app.mount("/api/v1", build_api(ops, auth))
    app.mount("/static", StaticFiles(packages=[("orchestrator._console", "static")]),
              name="static")
    app.include_router(build_pages(ops, auth))

    @app.middleware("http")
    async def security_headers(request: Request,
                               call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    return app
