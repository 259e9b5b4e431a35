"""The catalog: list, detail, delete."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request

from ..catalog import DatasetQuery
from ..errors import Unprocessable
from .deps import ADMIN, READ, WRITE, Caller, Service
from .schemas import (DatasetDetail, DatasetPage, ErrorBody, FrameStatsSeries, Job,
                      dataset_detail, dataset_summary, job_view)

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

NOT_FOUND = {404: {"model": ErrorBody}}


def utc_text(moment: datetime | None, where: str) -> str | None:
    """Catalog timestamps are UTC ISO text; a naive time is taken as UTC. One that is
    no time in UTC (year 1 at +14:00, year 9999 at -14:00) is a 422 naming ``where``."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")
    except OverflowError:
        raise Unprocessable({"message": f"{moment.isoformat()} is out of range in UTC",
                             "where": where}) from None


@router.get("", response_model=DatasetPage, summary="List datasets (filter, sort, paginate)",
            dependencies=[READ])
def list_datasets(
        service: Service,
        request: Request,
        caller: Caller,
        session: Annotated[str | None, Query(max_length=32, description="a session's id "
                                             "(GET /v1/sessions)")] = None,
        status: Annotated[Literal["receiving", "queued", "processing", "ready", "rejected",
                                  "failed"] | None,
                          Query()] = None,
        mode: Annotated[int | None, Query(description="MRC mode as received")] = None,
        source: Annotated[Literal["upload", "registration"] | None, Query()] = None,
        sha256: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$",
                                            description="content hash (lower-case hex)")]
        = None,
        voltage_kv: Annotated[float | None, Query(gt=0, description="e.g. 300")] = None,
        min_dose: Annotated[float | None, Query(ge=0, description="total e-/Å², at least")]
        = None,
        max_dose: Annotated[float | None, Query(ge=0, description="total e-/Å², at most")]
        = None,
        camera: Annotated[str | None, Query(max_length=64, description="camera model, "
                                            "exactly as listed")] = None,
        min_pixel_size: Annotated[float | None, Query(ge=0, description="Å, at least")]
        = None,
        max_pixel_size: Annotated[float | None, Query(ge=0, description="Å, at most")]
        = None,
        min_exposure: Annotated[float | None, Query(ge=0, description="s, at least")] = None,
        max_exposure: Annotated[float | None, Query(ge=0, description="s, at most")] = None,
        min_frames: Annotated[int | None, Query(ge=0, description="frames, at least")] = None,
        max_frames: Annotated[int | None, Query(ge=0, description="frames, at most")] = None,
        name: Annotated[str | None, Query(max_length=200,
                                          description="substring, case-insensitive")] = None,
        created_after: Annotated[datetime | None, Query()] = None,
        created_before: Annotated[datetime | None, Query()] = None,
        sort: Annotated[Literal["created_at", "name", "size_bytes"], Query()] = "created_at",
        order: Annotated[Literal["asc", "desc"], Query()] = "desc",
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        cursor: Annotated[str | None, Query(max_length=1000,
                                            description="next_cursor of the previous page")]
        = None) -> dict[str, Any]:
    query = DatasetQuery(status=status, mode=mode, source=source, name=name,
                         sha256=sha256, voltage_kv=voltage_kv, min_dose=min_dose,
                         max_dose=max_dose, camera=camera, min_pixel_size=min_pixel_size,
                         max_pixel_size=max_pixel_size, min_exposure=min_exposure,
                         max_exposure=max_exposure, min_frames=min_frames,
                         max_frames=max_frames,
                         created_after=utc_text(created_after, "query.created_after"),
                         created_before=utc_text(created_before, "query.created_before"),
                         sort=sort,
                         session_id=session, projects=caller.projects,
                         descending=order == "desc", limit=limit, cursor=cursor)
    rows, next_cursor = service.queries.list_datasets(query)
    links = {}
    if next_cursor:  # the same query (filters, sort, limit), one page on
        following = request.url.include_query_params(cursor=next_cursor)
        links["next"] = f"{following.path}?{following.query}"
    return {"items": [dataset_summary(r) for r in rows], "next_cursor": next_cursor,
            "links": links}


@router.get("/{dataset_id}", response_model=DatasetDetail, responses=NOT_FOUND,
            summary="Metadata, statistics, findings and jobs of one dataset",
            dependencies=[READ])
def get_dataset(dataset_id: str, service: Service, caller: Caller) -> dict[str, Any]:
    return dataset_detail(service.queries.dataset(dataset_id, caller),
                          service.queries.jobs_of(dataset_id))


@router.get("/{dataset_id}/frames/stats", response_model=FrameStatsSeries,
            responses={**NOT_FOUND, 409: {"model": ErrorBody}},
            summary="Exact per-frame mean, standard deviation, minimum and maximum",
            dependencies=[READ])
def frame_stats(dataset_id: str, service: Service, caller: Caller) -> dict[str, Any]:
    """Taken at ingest from every pixel of every frame (no sampling). Plotted over the
    movie, the mean shows dose fall-off and blanked or dropped frames at a glance."""
    return service.queries.frame_stats(dataset_id, caller)


@router.post("/{dataset_id}/verify", status_code=202, response_model=Job,
             responses=NOT_FOUND, dependencies=[WRITE],
             summary="Rebuild the file as received from what is stored and check its SHA-256")
def verify(dataset_id: str, service: Service, caller: Caller) -> dict[str, Any]:
    """A job: the bytes as received are rebuilt from the archive and restore record (or
    read from the kept original) and their SHA-256 compared with the digest taken on
    receipt; the job's result says whether they match."""
    service.queries.dataset(dataset_id, caller)
    return job_view(service.submit_job("verify", dataset_id, dedup_key="verify"))


@router.delete("/{dataset_id}", responses=NOT_FOUND,
               summary="Delete a dataset, its jobs and its files", dependencies=[ADMIN])
def delete_dataset(dataset_id: str, service: Service) -> dict[str, Any]:
    service.delete(dataset_id)
    return {"deleted": dataset_id}
