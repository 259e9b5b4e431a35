"""Looking things up: datasets (list, detail, per-frame statistics), jobs, deletion."""

from __future__ import annotations

from typing import Any

from .auth import Scope
from .catalog import (JOB_STATES, TOMBSTONE, Catalog, CursorError, DatasetQuery,
                      SessionQuery)
from .errors import BadRequest, Conflict, NotFound


def own_twin(dataset: dict[str, Any], scope: Scope) -> dict[str, Any]:
    """The dataset an arrival turned out to duplicate, when the caller's ``scope`` reaches
    its project. Uploads are deduplicated within a project, so this holds for every
    duplicate the catalog answers; it stays as the boundary's own check that no other
    project's dataset is ever the answer (409, naming nothing of it)."""
    if not scope.sees(dataset.get("project")):
        raise Conflict("the same bytes are already stored in a project this token does not "
                       "reach; nothing was stored")
    return dataset


class Queries:
    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def list_datasets(self, query: DatasetQuery) -> tuple[list[dict[str, Any]], str | None]:
        try:
            return self.catalog.list_datasets(query)
        except CursorError as exc:
            raise BadRequest(str(exc)) from None

    def dataset(self, dataset_id: str, scope: Scope = Scope.ALL) -> dict[str, Any]:
        """The dataset, if the caller's ``scope`` reaches its project (else 404, as for
        one that does not exist)."""
        row = self.catalog.get_dataset(dataset_id)
        if row is None or row["status"] == TOMBSTONE or not scope.sees(row.get("project")):
            raise NotFound(f"no dataset {dataset_id!r}")
        return row

    def ready_dataset(self, dataset_id: str, scope: Scope = Scope.ALL) -> dict[str, Any]:
        row = self.dataset(dataset_id, scope)
        if row["status"] != "ready":
            raise Conflict(f"dataset {dataset_id} is {row['status']}, not ready"
                           + ("; its findings say why" if row["status"] == "rejected" else ""))
        return row

    def frame_stats(self, dataset_id: str, scope: Scope = Scope.ALL) -> dict[str, Any]:
        """Per-frame mean, standard deviation, minimum and maximum, taken at ingest."""
        exists, series = self.catalog.frame_stats(dataset_id, scope.projects)
        if not exists:
            raise NotFound(f"no dataset {dataset_id!r}")
        if series is None:
            raise Conflict(f"dataset {dataset_id} has no per-frame statistics (yet): they are "
                           "taken while it is ingested")
        return {"dataset_id": dataset_id, "frames": len(series["mean"]), **series}

    def job(self, job_id: str, scope: Scope = Scope.ALL) -> dict[str, Any]:
        """The job, if the caller's ``scope`` reaches its dataset's project."""
        row = self.catalog.get_job(job_id)
        if row is None or (scope.limited and not scope.sees(
                self.catalog.project_of(row["dataset_id"]))):
            raise NotFound(f"no job {job_id!r}")
        return row

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        return self.catalog.list_jobs(state, limit)

    def list_sessions(self, query: SessionQuery) -> tuple[list[dict[str, Any]], str | None]:
        try:
            return self.catalog.list_sessions(query)
        except CursorError as exc:
            raise BadRequest(str(exc)) from None

    def session(self, session_id: str, scope: Scope = Scope.ALL) -> dict[str, Any]:
        """The session, if the caller's ``scope`` reaches its project (else 404)."""
        row = self.catalog.get_session(session_id)
        if row is None or not scope.sees(row["project"]):
            raise NotFound(f"no session {session_id!r}")
        return row

    def projects(self, scope: Scope = Scope.ALL) -> list[str]:
        """The projects the caller sees that hold a session."""
        return [p for p in self.catalog.projects() if scope.sees(p)]

    def jobs_of(self, dataset_id: str) -> list[dict[str, Any]]:
        return self.catalog.jobs_in_states(JOB_STATES, dataset_id=dataset_id)
