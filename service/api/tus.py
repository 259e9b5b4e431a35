"""tus 1.0 resumable uploads under /v1/tus/ (core, creation, termination, checksum,
expiration). Protocol rules live in :mod:`service.tus`; this maps HTTP to them."""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import Scope as AuthScope
from ..tus import CHECKSUMS, EXTENSIONS, VERSION, TusUploads, WrongContentType, check_version
from .deps import WRITE, Caller, Service, body_chunks

router = APIRouter(prefix="/v1/tus", tags=["resumable uploads (tus)"])
PREFIX = "/v1/tus"


class TusResumableHeader:
    """Pure ASGI middleware: every /v1/tus response but OPTIONS carries Tus-Resumable,
    errors included (they are made far from the router)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX) \
                or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return

        async def with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"tus-resumable" for k, _ in headers):
                    headers.append((b"tus-resumable", VERSION.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_header)


def uploads(service) -> TusUploads:
    assert service.tus is not None
    return service.tus


def expires_header(row: dict[str, Any]) -> dict[str, str]:
    """``Upload-Expires`` (RFC 7231 date) while the upload is unfinished (tus 1.0,
    expiration extension)."""
    if row.get("completed_at") is not None or not row.get("expires_at"):
        return {}
    return {"Upload-Expires": format_datetime(datetime.fromisoformat(row["expires_at"]),
                                              usegmt=True)}


def offset_headers(tus: TusUploads, row: dict[str, Any], caller: AuthScope
                   ) -> dict[str, str]:
    """HEAD's and PATCH's answer headers; ``Mrc-Ingest-Dataset`` only once the dataset
    exists (and only a dataset the caller reaches)."""
    headers = {"Upload-Offset": str(row["offset"]), "Upload-Length": str(row["length"]),
               "Cache-Control": "no-store", **expires_header(row)}
    dataset = tus.dataset_url(row, caller)
    if dataset is not None:
        headers["Mrc-Ingest-Dataset"] = dataset
    return headers


@router.options("/", status_code=204, summary="tus discovery")
@router.options("/{upload_id}", status_code=204, include_in_schema=False)
def discover(service: Service, upload_id: str | None = None) -> Response:
    return Response(status_code=204, headers={
        "Tus-Version": VERSION, "Tus-Extension": EXTENSIONS,
        "Tus-Max-Size": str(service.settings.max_upload_bytes),
        "Tus-Checksum-Algorithm": ",".join(sorted(CHECKSUMS))})


@router.post("/", status_code=201, dependencies=[WRITE],
             summary="Create an upload (Upload-Length, Upload-Metadata: filename <base64>)")
def create(request: Request, service: Service, caller: Caller) -> Response:
    """``Upload-Metadata`` keys: ``filename``, and where the movie goes: ``session``,
    ``project`` (as ``?session=&project=`` on PUT)."""
    check_version(request.headers.get("tus-resumable"))
    row = uploads(service).create(request.headers.get("upload-length"),
                                  request.headers.get("upload-metadata"), caller)
    return Response(status_code=201, headers={"Location": f"{PREFIX}/{row['id']}",
                                              "Upload-Offset": "0", **expires_header(row)})


@router.head("/{upload_id}", dependencies=[WRITE], summary="Where to resume")
def head(upload_id: str, request: Request, service: Service, caller: Caller) -> Response:
    check_version(request.headers.get("tus-resumable"))
    tus = uploads(service)
    return Response(status_code=200, headers=offset_headers(tus, tus.get(upload_id, caller),
                                                            caller))


@router.patch("/{upload_id}", status_code=204, dependencies=[WRITE],
              summary="Append bytes at Upload-Offset (application/offset+octet-stream)")
async def patch(upload_id: str, request: Request, service: Service,
                caller: Caller) -> Response:
    check_version(request.headers.get("tus-resumable"))
    if request.headers.get("content-type") != "application/offset+octet-stream":
        raise WrongContentType("PATCH needs Content-Type: application/offset+octet-stream")
    tus = uploads(service)
    row = await tus.patch(upload_id, request.headers.get("upload-offset"),
                          request.headers.get("upload-checksum"), body_chunks(request),
                          caller)
    row = await anyio.to_thread.run_sync(tus.get, upload_id)  # as committed, with expiry
    return Response(status_code=204, headers=await anyio.to_thread.run_sync(
        offset_headers, tus, row, caller))


@router.delete("/{upload_id}", status_code=204, dependencies=[WRITE],
               summary="Terminate an upload")
async def terminate(upload_id: str, request: Request, service: Service,
                    caller: Caller) -> Response:
    check_version(request.headers.get("tus-resumable"))
    await anyio.to_thread.run_sync(uploads(service).terminate, upload_id, caller)
    return Response(status_code=204)
