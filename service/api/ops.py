"""Operations: health and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from ..metrics import CONTENT_TYPE
from ..errors import NotFound
from .deps import READ, Caller, Service
from .schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health,
            responses={503: {"model": Health, "description": "the catalog or the "
                                                             "datastore is unreachable"}},
            summary="Liveness and readiness: catalog and datastore reachable")
def healthz(service: Service) -> Any:
    """Cheap on purpose (probes call it often). 200 when this replica can serve: its
    catalog answers and its datastore is reachable; 503 with the reason otherwise."""
    ok, body = service.health()
    return body if ok else JSONResponse(body, status_code=503)


@router.get("/metrics", response_class=Response, summary="Prometheus text format",
            dependencies=[READ])
async def metrics(service: Service, caller: Caller) -> Response:
    """Facility-wide figures: a token limited to projects has none of its own (404)."""
    if caller.limited:
        raise NotFound("no metrics for a token limited to projects: they are "
                       "facility-wide")
    body = await anyio.to_thread.run_sync(service.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)
