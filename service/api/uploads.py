"""Uploads (raw PUT and multipart POST) and registrations of files on shared storage."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response

from ..auth import Scope
from ..queries import own_twin
from ..sessions import Placement
from ..sidecars import SIDECAR_MAX_BYTES, SIDECAR_SUFFIXES
from ..uploads import parse_digest
from .deps import (WRITE, Caller, PlacementQuery, Service, body_chunks, declared_length,
                   json_body, multipart_body)
from .schemas import (Accepted, ErrorBody, RegistrationIn, SidecarAccepted, dataset_summary,
                      job_view)

router = APIRouter(prefix="/v1", tags=["uploads"])

UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "bad file name, digest mismatch, malformed multipart, client went away"),
        (413, "larger than the configured maximum (bytes, or multipart parts)"),
        (415, "the body does not start with an MRC/MRCZ header (nothing stored)"),
        (422, "invalid parameters; a header declaring more frames (or more tiny frames) "
              "than the limits (nothing stored)"))}

Normalize = Annotated[bool | None, Query(description="override the default normalization "
                                                     "policy (4-bit -> mode 0) for this file")]


def accepted_response(result: dict[str, Any], response: Response,
                      caller: Scope) -> dict[str, Any]:
    """201 with Location for a new dataset ingested while it streamed (ready, or
    rejected with its findings); 202 when its processing continues in a job (a
    registration); 200 when these bytes were already here (409 when another project's
    dataset holds them); 201 for a sidecar (with its movie's dataset, once that
    exists)."""
    dataset = result["dataset"]
    if result.get("duplicate"):
        own_twin(dataset, caller)
    if "sidecar" in result:
        response.status_code = 201
        if dataset is not None:
            response.headers["Location"] = f"/v1/datasets/{dataset['id']}"
        return {"sidecar": result["sidecar"],
                "dataset": dataset_summary(dataset) if dataset else None}
    response.status_code = 200 if result["duplicate"] else \
        201 if dataset["status"] in ("ready", "rejected") else 202
    response.headers["Location"] = f"/v1/datasets/{dataset['id']}"
    return {"dataset": dataset_summary(dataset),
            "job": job_view(result["job"]) if result["job"] else None,
            "duplicate": result["duplicate"], "sidecars": result.get("sidecars", [])}


@router.put("/uploads/{filename}", status_code=201,
            response_model=Accepted | SidecarAccepted,
            responses=UPLOAD_ERRORS, summary="Upload a movie as the raw body (curl -T)",
            dependencies=[WRITE])
async def put_upload(filename: str, request: Request, response: Response, service: Service,
                     caller: Caller, where: Annotated[PlacementQuery, Depends()],
                     normalize: Normalize = None) -> dict[str, Any]:
    """Ingested while it streams: the header is checked as soon as its 1024 bytes arrive,
    every frame is validated, measured and compressed into the archive as it comes, and
    the SHA-256 is taken on the way (checked against ``X-Content-SHA256`` or
    ``Content-Digest: sha-256=:…:`` if sent). The response comes when the dataset is
    ready (or rejected, with its findings). A name ending ``.mdoc`` (SerialEM) or ``_info.txt`` (Direct Electron)
    is a sidecar: attached to its movie (``movie.mrc.mdoc``, ``movie.mdoc``,
    ``<id>_info.txt`` for ``<id>_movie.mrc``), now or when the movie arrives (201)."""
    result = await service.intake.accept_upload(
        filename, body_chunks(request), parse_digest(request.headers), normalize,
        declared_length(request), where.placement, caller)
    return accepted_response(result, response, caller)


@router.post("/uploads", status_code=201, response_model=Accepted, responses=UPLOAD_ERRORS,
             summary="Upload a movie as multipart/form-data (curl -F file=@movie.mrc), "
                     "optionally with its sidecars (-F mdoc=@movie.mrc.mdoc)",
            dependencies=[WRITE])
async def post_upload(request: Request, response: Response, service: Service,
                      caller: Caller, where: Annotated[PlacementQuery, Depends()],
                      normalize: Normalize = None) -> dict[str, Any]:
    body = multipart_body(request, service.settings, extra_suffixes=SIDECAR_SUFFIXES,
                          extra_max_bytes=SIDECAR_MAX_BYTES)
    result = await service.intake.accept_upload(None, body, parse_digest(request.headers),
                                                normalize, declared_length(request),
                                                where.placement, caller)
    return accepted_response(result, response, caller)


#: the body as /docs shows it; the route reads it itself (:func:`register`)
REGISTRATION_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": RegistrationIn.model_json_schema()}}}}


@router.post("/registrations", status_code=202, response_model=Accepted,
             responses={code: {"model": ErrorBody} for code in (403, 404, 413, 422)},
             summary="Register a file already on allowed shared storage",
             dependencies=[WRITE], openapi_extra=REGISTRATION_BODY)
async def register(request: Request, response: Response, service: Service,
                   caller: Caller) -> dict[str, Any]:
    """Body: :class:`RegistrationIn` as JSON, at most ``MRC_INGEST_MAX_JSON_BYTES``. It is
    read here, after the token check (a body parameter would be read and parsed by
    FastAPI before the route's dependencies run)."""
    body = await json_body(request, RegistrationIn, service.settings.max_json_bytes)
    result = await anyio.to_thread.run_sync(
        service.intake.register, body.path, body.normalize,
        Placement.given(body.session, body.project), caller)
    return accepted_response(result, response, caller)
