"""Jobs: one job's state and progress, a conversion's result file, and (admin) all jobs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request, Response

from .deps import ADMIN, READ, Caller, Service
from .downloads import FILE, download_response
from .schemas import ErrorBody, Job, JobPage, job_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", response_model=JobPage, summary="All jobs, newest first (admin)",
            dependencies=[ADMIN])
def list_jobs(service: Service,
              state: Annotated[Literal["queued", "running", "done", "failed", "cancelled"]
                               | None, Query()] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    return {"items": [job_view(j) for j in service.queries.list_jobs(state, limit)]}


@router.get("/{job_id}", response_model=Job, responses={404: {"model": ErrorBody}},
            summary="State and progress of a job", dependencies=[READ])
def get_job(job_id: str, service: Service, caller: Caller) -> dict[str, Any]:
    return job_view(service.queries.job(job_id, caller))


@router.get("/{job_id}/result", response_class=Response, responses=FILE,
            summary="The file a finished conversion job produced", dependencies=[READ])
async def job_result(job_id: str, request: Request, service: Service,
                     caller: Caller) -> Response:
    found = await anyio.to_thread.run_sync(service.downloads.job_result, job_id, caller)
    return download_response(request, found)
