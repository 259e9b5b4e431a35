"""Looking things up: datasets (list, detail, per-frame statistics), jobs, deletion."""

from __future__ import annotations

from typing import Any

from .catalog import JOB_STATES, TOMBSTONE, Catalog, CursorError, DatasetQuery
from .errors import BadRequest, Conflict, NotFound


class Queries:
    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def list_datasets(self, query: DatasetQuery) -> tuple[list[dict[str, Any]], str | None]:
        try:
            return self.catalog.list_datasets(query)
        except CursorError as exc:
            raise BadRequest(str(exc)) from None

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        row = self.catalog.get_dataset(dataset_id)
        if row is None or row["status"] == TOMBSTONE:
            raise NotFound(f"no dataset {dataset_id!r}")
        return row

    def ready_dataset(self, dataset_id: str) -> dict[str, Any]:
        row = self.dataset(dataset_id)
        if row["status"] != "ready":
            raise Conflict(f"dataset {dataset_id} is {row['status']}, not ready"
                           + ("; its findings say why" if row["status"] == "rejected" else ""))
        return row

    def frame_stats(self, dataset_id: str) -> dict[str, Any]:
        """Per-frame mean, standard deviation, minimum and maximum, taken at ingest."""
        exists, series = self.catalog.frame_stats(dataset_id)
        if not exists:
            raise NotFound(f"no dataset {dataset_id!r}")
        if series is None:
            raise Conflict(f"dataset {dataset_id} has no per-frame statistics (yet): they are "
                           "taken while it is ingested")
        return {"dataset_id": dataset_id, "frames": len(series["mean"]), **series}

    def job(self, job_id: str) -> dict[str, Any]:
        row = self.catalog.get_job(job_id)
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return row

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        return self.catalog.list_jobs(state, limit)

    def jobs_of(self, dataset_id: str) -> list[dict[str, Any]]:
        return self.catalog.jobs_in_states(JOB_STATES, dataset_id=dataset_id)
