"""Downloads: the file exactly as received (rebuilt from the archive on the fly; HTTP
Range decodes only the frames it touches), or a lossless conversion; and conversion
requests for curl users (upload + target in one request)."""

from __future__ import annotations

import string
import unicodedata
from typing import Annotated, Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import iterate_in_threadpool

from ..downloads import Download, parse_range
from ..queries import own_twin
from ..uploads import parse_digest
from .deps import (READ, WRITE, Caller, PlacementQuery, Service, TargetQuery,
                   declared_length, json_bytes, multipart_body)
from .schemas import ConversionAccepted, ConversionIn, ErrorBody, dataset_summary, job_view

router = APIRouter(prefix="/v1", tags=["downloads"])

FILE = {200: {"content": {"application/octet-stream": {}}},
        206: {"description": "the requested byte range"},
        **{code: {"model": ErrorBody} for code in (400, 404, 409, 416, 422)}}

#: what the ASCII fallback file name keeps; the rest becomes '_'. Not '"' or '\\' (the
#: quoted string), control characters (the header), '%' (RFC 6266 appendix D: some
#: clients percent-decode it), '?' (an RFC 2047 ``=?...?=`` that mail-minded parsers
#: decode), nor '/', ':', '*', '<', '>', '|' (not file names everywhere)
_FALLBACK_KEEPS = frozenset(string.ascii_letters + string.digits + " !#$&'()+,-.;=@[]^_`{}~")


def content_disposition(filename: str) -> str:
    """``Content-Disposition: attachment`` for a file called ``filename``, whatever the
    name: a registered file on disk may hold quotes, backslashes, CR/LF, '%', right-to-
    left marks, emoji (RFC 6266 with RFC 8187).

    ``filename="..."`` is an ASCII fallback for clients that know nothing else (curl -J):
    accents dropped (NFKD), anything unsafe ``_``. When that is not the name itself,
    ``filename*=UTF-8''<percent-encoded>`` carries the exact name, and comes first:
    RFC 6266 section 4.3 has recipients prefer ``filename*`` in either order, and parsers
    that keep the first of two same-named parameters (Python's ``email``) then get it
    too. A name that is not valid Unicode (undecodable bytes on disk, held as lone
    surrogates) has those bytes as U+FFFD. The value is plain ASCII."""
    name = filename.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    fallback = "".join(c if c in _FALLBACK_KEEPS else "_"
                       for c in unicodedata.normalize("NFKD", name)
                       if not unicodedata.combining(c)) or "download"
    if fallback == name:
        return f'attachment; filename="{name}"'
    return f"attachment; filename*=UTF-8''{quote(name, safe='')}; filename=\"{fallback}\""


def download_response(request: Request, download: Download) -> Response:
    """200 with the whole file, 206 with one byte range, 304 when the client has it.

    A plain local file goes out with sendfile (FileResponse); anything else (a file
    rebuilt from its archive, an object in S3) is streamed from a generator that runs on
    the thread pool, one frame or block at a time. The thread pool rather than aiofiles:
    the work behind each block is decompression and repacking, not just a read, and
    aiofiles would run the read on the same pool anyway."""
    headers = {"ETag": download.etag, "Accept-Ranges": "bytes",
               "Content-Disposition": content_disposition(download.filename)}
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
        return FileResponse(download.local_path, media_type="application/octet-stream",
                            headers={"ETag": download.etag,
                                     "Content-Disposition": headers["Content-Disposition"]})
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
async def download(dataset_id: str, request: Request, service: Service, caller: Caller,
                   target: Annotated[TargetQuery, Depends()]) -> Response:
    """No parameters: the bytes exactly as received (same SHA-256 and length), rebuilt
    from the archive as they stream; ``Range`` is supported and decodes only the frames
    it touches. Otherwise a lossless conversion, made on the worker pool on first
    request and kept in a cache; a conversion that would change any value is refused
    with 422 and the safe modes."""
    if not target.given:
        found = await anyio.to_thread.run_sync(service.downloads.as_received, dataset_id,
                                               caller)
    else:
        wanted = target.target(service.settings.archive)
        found = await service.downloads.converted(dataset_id, wanted, caller)
    return download_response(request, found)


@router.post("/conversions", status_code=202, response_model=ConversionAccepted,
             responses={code: {"model": ErrorBody} for code in (400, 404, 409, 413, 415, 422)},
             summary="Convert: upload (multipart) + target in one request, or a JSON "
                     "{dataset_id, format, mode, ...} for a stored dataset",
             dependencies=[WRITE])
async def create_conversion(request: Request, response: Response, service: Service,
                            caller: Caller, target: Annotated[TargetQuery, Depends()],
                            where: Annotated[PlacementQuery, Depends()]) -> dict[str, Any]:
    """``curl -F file=@movie.mrc 'http://host/v1/conversions?mode=1'`` uploads (ingesting
    while it streams; ``?session=&project=`` place it, as for an upload) and queues the
    conversion; poll ``links.self`` of the job and fetch ``links.result``."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = ConversionIn.model_validate_json(
                await json_bytes(request, service.settings.max_json_bytes))
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        query = TargetQuery(format=body.format, mode=body.mode, codec=body.codec,
                            clevel=body.clevel if body.format == "mrcz" else None,
                            endian=body.endian)
        dataset = await anyio.to_thread.run_sync(service.queries.dataset, body.dataset_id,
                                                 caller)
        duplicate = True
    else:
        upload = await service.intake.accept_upload(
            None, multipart_body(request, service.settings),
            parse_digest(request.headers), None, declared_length(request),
            where.placement, caller)
        dataset, duplicate, query = upload["dataset"], upload["duplicate"], target
        if duplicate:
            own_twin(dataset, caller)
    wanted = query.target(service.settings.archive)
    job = await anyio.to_thread.run_sync(service.downloads.request_conversion,
                                         dataset["id"], wanted)
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return {"dataset": dataset_summary(dataset), "job": job_view(job), "duplicate": duplicate}
