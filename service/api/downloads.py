"""Downloads: the file as received (with HTTP Range), or a lossless conversion; and
conversion requests for curl users (upload + target in one request)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import ValidationError

from ..ingest import download_name
from ..uploads import MultipartFile, parse_digest
from .deps import READ, WRITE, Service, TargetQuery, body_chunks, declared_length
from .schemas import ConversionAccepted, ConversionIn, ErrorBody, dataset_summary, job_view

router = APIRouter(prefix="/v1", tags=["downloads"])

FILE = {200: {"content": {"application/octet-stream": {}}},
        **{code: {"model": ErrorBody} for code in (400, 404, 409, 422)}}


def file_response(path: Path, filename: str) -> FileResponse:
    # FileResponse streams in chunks and answers Range requests (206 / 416) itself.
    return FileResponse(path, filename=filename, media_type="application/octet-stream")


@router.get("/datasets/{dataset_id}/download", response_class=FileResponse, responses=FILE,
            summary="The file as received, or converted (?format=&mode=&codec=&clevel=)",
            dependencies=[READ])
async def download(dataset_id: str, service: Service,
                   target: Annotated[TargetQuery, Depends()]) -> FileResponse:
    """No parameters: the bytes exactly as received (``Range`` supported). Otherwise a
    lossless conversion, made on the worker pool on first request and kept in a cache; a
    conversion that would change any value is refused with 422 and the safe modes."""
    if not target.given:
        path, name = await anyio.to_thread.run_sync(service.original_file, dataset_id)
        return file_response(path, name)
    wanted = target.target(service.settings.archive)
    path = await service.converted_file(dataset_id, wanted)
    dataset = await anyio.to_thread.run_sync(service.dataset, dataset_id)
    return file_response(path, download_name(dataset["name"], wanted))


@router.post("/conversions", status_code=202, response_model=ConversionAccepted,
             responses={code: {"model": ErrorBody} for code in (400, 404, 409, 413, 415, 422)},
             summary="Convert: upload (multipart) + target in one request, or a JSON "
                     "{dataset_id, format, mode, ...} for a stored dataset",
            dependencies=[WRITE])
async def create_conversion(request: Request, response: Response, service: Service,
                            target: Annotated[TargetQuery, Depends()]) -> dict[str, Any]:
    """``curl -F file=@movie.mrc 'http://host/v1/conversions?mode=1'`` uploads and queues
    the conversion (it runs once the ingest is done); poll ``links.self`` of the job and
    fetch ``links.result``."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = ConversionIn.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        query = TargetQuery(format=body.format, mode=body.mode, codec=body.codec,
                            clevel=body.clevel if body.format == "mrcz" else None,
                            endian=body.endian)
        dataset = await anyio.to_thread.run_sync(service.dataset, body.dataset_id)
        duplicate = True
    else:
        upload = await service.accept_upload(
            None, MultipartFile(content_type, body_chunks(request)),
            parse_digest(request.headers), None, declared_length(request))
        dataset, duplicate, query = upload["dataset"], upload["duplicate"], target
    wanted = query.target(service.settings.archive)
    job = await anyio.to_thread.run_sync(service.request_conversion, dataset["id"], wanted)
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return {"dataset": dataset_summary(dataset), "job": job_view(job), "duplicate": duplicate}
