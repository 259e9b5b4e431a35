"""Operations: health and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Response

from .. import __version__
from ..metrics import CONTENT_TYPE
from .deps import READ, Service
from .schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness and readiness")
def healthz(service: Service) -> dict[str, Any]:
    # Cheap on purpose (probes call it often): no counting over the catalog here.
    return {"status": "ok", "version": __version__,
            "catalog": "ok" if service.catalog and service.catalog.ping() else "down",
            "workers": service.settings.workers,
            "queue_depth": service.queue.pending() if service.queue else 0,
            "data_free_bytes": service.storage.free_bytes()}


@router.get("/metrics", response_class=Response, summary="Prometheus text format",
            dependencies=[READ])
async def metrics(service: Service) -> Response:
    body = await anyio.to_thread.run_sync(service.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)
