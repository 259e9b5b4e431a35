"""Sessions: list and detail with their figures (kept up to date as movies land), and
(admin) rename, move to another project, delete with their datasets."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request

from ..catalog import SessionQuery
from ..errors import BadRequest, Conflict, NotFound
from ..sessions import PROJECT_NAME_MAX, SESSION_NAME_MAX, check_label
from .datasets import utc_text
from .deps import ADMIN, READ, Caller, Service, json_body
from .schemas import (ErrorBody, SessionChange, SessionDetail, SessionPage, session_detail,
                      session_summary)

router = APIRouter(prefix="/v1", tags=["sessions"])

NOT_FOUND = {404: {"model": ErrorBody}}


@router.get("/sessions", response_model=SessionPage, dependencies=[READ],
            summary="List sessions (filter, sort, paginate), each with its figures")
def list_sessions(
        service: Service, request: Request, caller: Caller,
        project: Annotated[str | None, Query(max_length=PROJECT_NAME_MAX)] = None,
        microscope: Annotated[str | None, Query(max_length=64, description="camera model "
                                                "of most of its movies, exactly")] = None,
        source: Annotated[Literal["upload", "registration"] | None, Query()] = None,
        started_after: Annotated[datetime | None, Query(description="first movie after")]
        = None,
        started_before: Annotated[datetime | None, Query(description="first movie before")]
        = None,
        sort: Annotated[Literal["last_movie_at", "first_movie_at", "name", "movies"],
                        Query()] = "last_movie_at",
        order: Annotated[Literal["asc", "desc"], Query()] = "desc",
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        cursor: Annotated[str | None, Query(max_length=1000)] = None) -> dict[str, Any]:
    """A session is listed once its first movie arrived. Its figures are read from its
    row (updated as each movie lands), never added up per request."""
    if project is not None and not caller.sees(project):
        return {"items": [], "next_cursor": None, "links": {}}
    query = SessionQuery(projects=caller.projects, project=project, microscope=microscope,
                         source=source,
                         started_after=utc_text(started_after, "query.started_after"),
                         started_before=utc_text(started_before, "query.started_before"),
                         sort=sort,
                         descending=order == "desc", limit=limit, cursor=cursor)
    rows, next_cursor = service.queries.list_sessions(query)
    links = {}
    if next_cursor:
        following = request.url.include_query_params(cursor=next_cursor)
        links["next"] = f"{following.path}?{following.query}"
    return {"items": [session_summary(r) for r in rows], "next_cursor": next_cursor,
            "links": links}


@router.get("/sessions/{session_id}", response_model=SessionDetail, responses=NOT_FOUND,
            dependencies=[READ],
            summary="One session: figures, acquisition ranges, rate timeline, problems")
def get_session(session_id: str, service: Service, caller: Caller) -> dict[str, Any]:
    return session_detail(service.queries.session(session_id, caller))


@router.get("/projects", dependencies=[READ],
            summary="The projects this token sees that hold a session")
def list_projects(service: Service, caller: Caller) -> dict[str, Any]:
    return {"items": service.queries.projects(caller),
            "limited": caller.limited}


@router.patch("/sessions/{session_id}", response_model=SessionDetail,
              responses={code: {"model": ErrorBody} for code in (404, 409, 422)},
              dependencies=[ADMIN], summary="Rename a session and/or move it (with its "
                                            "datasets) to another project (admin)")
async def change_session(session_id: str, request: Request, service: Service
                         ) -> dict[str, Any]:
    body = await json_body(request, SessionChange, service.settings.max_json_bytes)
    name = None if body.name is None else check_label(body.name, "session", SESSION_NAME_MAX)
    project = None if body.project is None else check_label(body.project, "project",
                                                             PROJECT_NAME_MAX)
    if name is None and project is None:
        raise BadRequest({"message": "send 'name' and/or 'project'", "where": "body"})
    verdict = await anyio.to_thread.run_sync(
        lambda: service.catalog.change_session(session_id, name=name, project=project))
    if verdict == "missing":
        raise NotFound(f"no session {session_id!r}")
    if verdict == "taken":
        raise Conflict({"message": "the target project has a session of that name already",
                        "where": "body", "name": name, "project": project})
    if verdict == "duplicate":
        raise Conflict({"message": "the target project holds the same bytes as a movie of "
                                   "this session (a project keeps one copy of an upload); "
                                   "nothing was changed",
                        "where": "project", "project": project})
    return session_detail(await anyio.to_thread.run_sync(service.queries.session,
                                                         session_id))


@router.delete("/sessions/{session_id}", responses=NOT_FOUND, dependencies=[ADMIN],
               summary="Delete a session with its datasets and their stored objects (admin)")
def delete_session(session_id: str, service: Service) -> dict[str, Any]:
    """The datasets are hidden at once and their objects removed right after (files
    registered on shared storage are never touched)."""
    return {"deleted": session_id, "datasets": service.delete_session(session_id)}
