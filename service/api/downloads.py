"""Downloads: the file exactly as received (rebuilt from the archive on the fly; HTTP
Range decodes only the frames it touches), or a lossless conversion; and conversion
requests for curl users (upload + target in one request)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import iterate_in_threadpool

from ..downloads import Download, parse_range
from ..uploads import MultipartFile, parse_digest
from .deps import READ, WRITE, Service, TargetQuery, body_chunks, declared_length
from .schemas import ConversionAccepted, ConversionIn, ErrorBody, dataset_summary, job_view

router = APIRouter(prefix="/v1", tags=["downloads"])

FILE = {200: {"content": {"application/octet-stream": {}}},
        206: {"description": "the requested byte range"},
        **{code: {"model": ErrorBody} for code in (400, 404, 409, 416, 422)}}


def download_response(request: Request, download: Download) -> Response:
    """200 with the whole file, 206 with one byte range, 304 when the client has it.

    A plain local file goes out with sendfile (FileResponse); anything else (a file
    rebuilt from its archive, an object in S3) is streamed from a generator that runs on
    the thread pool, one frame or block at a time. The thread pool rather than aiofiles:
    the work behind each block is decompression and repacking, not just a read, and
    aiofiles would run the read on the same pool anyway."""
    headers = {"ETag": download.etag, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{download.filename}"'}
    if request.headers.get("if-none-match") == download.etag:
        download.close()
        return Response(status_code=304, headers=headers)
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range != download.etag:
        wanted = None  # the client's copy is another version: send it whole
    try:
        span = parse_range(wanted, download.size)
    except BaseException:
        download.close()
        raise
    if span is None and download.local_path is not None:
        download.close()
        return FileResponse(download.local_path, filename=download.filename,
                            media_type="application/octet-stream",
                            headers={"ETag": download.etag})
    start, stop = span if span is not None else (0, download.size)
    headers["Content-Length"] = str(stop - start)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{download.size}"

    def pieces():
        try:
            yield from download.read(start, stop)
        finally:
            download.close()
    return StreamingResponse(iterate_in_threadpool(pieces()), status_code=status,
                             headers=headers, media_type="application/octet-stream")


@router.get("/datasets/{dataset_id}/download", response_class=Response, responses=FILE,
            summary="The file as received, or converted (?format=&mode=&codec=&clevel=)",
            dependencies=[READ])
async def download(dataset_id: str, request: Request, service: Service,
                   target: Annotated[TargetQuery, Depends()]) -> Response:
    """No parameters: the bytes exactly as received (same SHA-256 and length), rebuilt
    from the archive as they stream; ``Range`` is supported and decodes only the frames
    it touches. Otherwise a lossless conversion, made on the worker pool on first
    request and kept in a cache; a conversion that would change any value is refused
    with 422 and the safe modes."""
    if not target.given:
        found = await anyio.to_thread.run_sync(service.downloads.as_received, dataset_id)
    else:
        wanted = target.target(service.settings.archive)
        found = await service.downloads.converted(dataset_id, wanted)
    return download_response(request, found)


@router.post("/conversions", status_code=202, response_model=ConversionAccepted,
             responses={code: {"model": ErrorBody} for code in (400, 404, 409, 413, 415, 422)},
             summary="Convert: upload (multipart) + target in one request, or a JSON "
                     "{dataset_id, format, mode, ...} for a stored dataset",
             dependencies=[WRITE])
async def create_conversion(request: Request, response: Response, service: Service,
                            target: Annotated[TargetQuery, Depends()]) -> dict[str, Any]:
    """``curl -F file=@movie.mrc 'http://host/v1/conversions?mode=1'`` uploads (ingesting
    while it streams) and queues the conversion; poll ``links.self`` of the job and
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
        dataset = await anyio.to_thread.run_sync(service.queries.dataset, body.dataset_id)
        duplicate = True
    else:
        upload = await service.intake.accept_upload(
            None, MultipartFile(content_type, body_chunks(request)),
            parse_digest(request.headers), None, declared_length(request))
        dataset, duplicate, query = upload["dataset"], upload["duplicate"], target
    wanted = query.target(service.settings.archive)
    job = await anyio.to_thread.run_sync(service.downloads.request_conversion,
                                         dataset["id"], wanted)
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return {"dataset": dataset_summary(dataset), "job": job_view(job), "duplicate": duplicate}
