"""Jobs: one job's state and progress, a conversion's result file, and (admin) all jobs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from .deps import ADMIN, READ, Service
from .downloads import FILE, file_response
from .schemas import ErrorBody, Job, JobPage, job_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", response_model=JobPage, summary="All jobs, newest first (admin)",
            dependencies=[ADMIN])
def list_jobs(service: Service,
              state: Annotated[Literal["queued", "running", "done", "failed", "cancelled"]
                               | None, Query()] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    return {"items": [job_view(j) for j in service.list_jobs(state, limit)]}


@router.get("/{job_id}", response_model=Job, responses={404: {"model": ErrorBody}},
            summary="State and progress of a job", dependencies=[READ])
def get_job(job_id: str, service: Service) -> dict[str, Any]:
    return job_view(service.job(job_id))


@router.get("/{job_id}/result", response_class=FileResponse, responses=FILE,
            summary="The file a finished conversion job produced", dependencies=[READ])
def job_result(job_id: str, service: Service) -> FileResponse:
    return file_response(*service.job_result_file(job_id))
