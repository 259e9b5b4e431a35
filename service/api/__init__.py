"""The HTTP API: :func:`create_app` builds a FastAPI app around one
:class:`~service.ingest.IngestService`. Nothing happens at import time."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import Settings
from ..ingest import IngestService
from ..metrics import Metrics
from . import (dashboard, datasets, downloads, errors, exports, jobs, ops, particles,
               previews, sessions, tus, uploads)

__all__ = ["create_app"]

access = logging.getLogger("mrc_ingest.http")
#: path parameters worth a field of their own in the request log line
ID_PARAMS = ("dataset_id", "job_id", "set_id", "upload_id", "session_id")


class RequestTimer:
    """Pure ASGI middleware: time to the response start, by route template (so the
    label set stays small), and one log line per request; it does not wrap or buffer
    bodies."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seconds = time.perf_counter() - started
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.request_seconds.labels(
                    scope["method"], route, str(message["status"])).observe(seconds)
                params = scope.get("path_params", {})
                access.info("request", extra={
                    "method": scope["method"], "path": scope["path"], "route": route,
                    "status": message["status"], "ms": round(seconds * 1000, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                    **{k: v for k, v in params.items() if k in ID_PARAMS}})
            await send(message)

        await self.app(scope, receive, timed_send)


class RefuseNul:
    """Pure ASGI middleware: a URL holding a NUL byte (``%00`` in its path or query) is a
    400 before any route sees it. No id, name or parameter of this API holds one, and
    PostgreSQL text cannot: passed on, it would surface as a database error."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in
                                        scope.get("query_string", b"")):
            response = errors.error_response(400, "bad_request", {
                "message": "the URL holds a NUL byte (%00)", "where": "url"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    service = IngestService(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="mrc-ingest", version=__version__, lifespan=lifespan,
                  description="Ingest, validate, normalize, compress and serve cryo-EM "
                              "MRC/MRCZ movies.")
    app.state.service = service
    errors.install(app)
    for module in (uploads, tus, sessions, exports, datasets, previews, downloads, jobs,
                   particles, ops, dashboard):
        app.include_router(module.router)
    app.add_middleware(tus.TusResumableHeader)
    app.add_middleware(RefuseNul)
    app.add_middleware(RequestTimer, metrics=service.metrics)
    return app
