"""Exports of a session's movies for processing: a RELION 3.1+ movies STAR file and a
CSV of the catalog columns, both streamed (the writers are :mod:`service.export`)."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from .. import export
from .deps import READ, Caller, Service
from .downloads import content_disposition
from .schemas import ErrorBody

router = APIRouter(prefix="/v1", tags=["sessions"])

STAR_MEDIA_TYPE = "text/plain; charset=utf-8"
CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
#: stands for a dataset id in the download URL template (ids are hex)
_ID_MARKER = "__dataset_id__"


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorBody} for code in codes}


@router.get("/sessions/{session_id}/movies.star", response_class=Response,
            dependencies=[READ],
            responses={200: {"content": {STAR_MEDIA_TYPE: {}}}, **_errors(404, 409, 422)},
            summary="The session's ready movies as a RELION 3.1+ movies STAR file")
async def movies_star(
        session_id: str, request: Request, service: Service, caller: Caller,
        cs_mm: Annotated[float | None, Query(ge=0, allow_inf_nan=False, description=
                         "spherical aberration, mm (default: MRC_INGEST_CS_MM)")] = None,
        amplitude_contrast: Annotated[float | None, Query(
            ge=0, le=1, allow_inf_nan=False, description="0 to 1 (default: "
            "MRC_INGEST_AMPLITUDE_CONTRAST)")] = None,
        prefix: Annotated[str | None, Query(max_length=1000, description=
                          "where the store is mounted: movie names are files RELION reads "
                          "(a registered movie's own path; an upload's kept original as "
                          "<prefix><key>) instead of download URLs")] = None,
        skip_incomplete: Annotated[bool, Query(description="leave out ready movies "
                                   "without a pixel size or voltage instead of refusing")]
        = False) -> Response:
    """``data_optics``: one optics group per distinct pixel size, voltage, frame size and
    MRC mode (``opticsGroup1..n`` in order of first appearance); ``data_movies``: each
    ready movie, oldest first, by its absolute download URL (or path under ``prefix``).
    Rejected, failed and in-flight movies are left out and counted in a comment. A
    missing Cs or amplitude contrast, or a ready movie without a pixel size or voltage
    (or, with ``prefix``, without a file RELION reads), is a 422 that says which; a
    session with no ready movie is a 409."""
    session = await anyio.to_thread.run_sync(service.queries.session, session_id, caller)
    settings = service.settings
    optics = export.resolve_optics(cs_mm, amplitude_contrast, settings.cs_mm,
                                   settings.amplitude_contrast)
    if prefix is not None:
        movie_name = export.movie_path(prefix)
    else:
        template = str(request.url_for("download", dataset_id=_ID_MARKER))
        movie_name = export.movie_url(template, _ID_MARKER)
    rows = partial(service.catalog.session_movies, session_id,
                   export.STAR_COLUMNS if prefix is None else export.PATH_COLUMNS)
    text = await anyio.to_thread.run_sync(partial(
        export.movies_star, rows, optics, movie_name, session,
        skip_incomplete=skip_incomplete))
    return StreamingResponse(
        iterate_in_threadpool(export.utf8(text)), media_type=STAR_MEDIA_TYPE,
        headers={"Content-Disposition": content_disposition(
            f"{session['name']}_movies.star")})


@router.get("/sessions/{session_id}/movies.csv", response_class=Response,
            dependencies=[READ],
            responses={200: {"content": {CSV_MEDIA_TYPE: {}}}, **_errors(404)},
            summary="Every movie of the session, one CSV row each, every catalog column")
async def movies_csv(session_id: str, service: Service, caller: Caller) -> Response:
    """All statuses, oldest first; the dataset columns but the large JSON ones (info,
    frame_stats, progress), plus ``session_name``; values as stored (empty: null)."""
    session = await anyio.to_thread.run_sync(service.queries.session, session_id, caller)
    rows = service.catalog.session_movies(session_id, export.CSV_DATASET_COLUMNS)
    return StreamingResponse(
        iterate_in_threadpool(export.utf8(export.movies_csv(rows, session))),
        media_type=CSV_MEDIA_TYPE,
        headers={"Content-Disposition": content_disposition(
            f"{session['name']}_movies.csv")})
