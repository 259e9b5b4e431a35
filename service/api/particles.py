"""cryoSPARC particle sets: upload a .cs with the folder of its stacks, list particles,
preview one, export rows as one MRC stack."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, Response

from ..particle_sets import ParticleSets
from ..previews import encode_png
from ..sessions import PROJECT_NAME_MAX, Placement, project_for
from .deps import ADMIN, READ, WRITE, Caller, Service, body_chunks, multipart_body
from .downloads import FILE, download_response
from .previews import PNG, Clip, Size, png_response
from .schemas import ErrorBody

router = APIRouter(prefix="/v1/particle-sets", tags=["particle sets"])
ERRORS = {code: {"model": ErrorBody} for code in (400, 403, 404, 413, 422)}


def sets(service) -> ParticleSets:
    assert service.particle_sets is not None
    return service.particle_sets


def view(row: dict[str, Any]) -> dict[str, Any]:
    base = f"/v1/particle-sets/{row['id']}"
    return {"id": row["id"], "name": row["name"], "folder": row["folder"], "rows": row["rows"],
            "created_at": row["created_at"], **row["info"],
            "links": {"self": base, "particles": f"{base}/particles",
                      "particle0": f"{base}/particles/0.png", "export": f"{base}/export"}}


@router.post("", status_code=201, responses=ERRORS, dependencies=[WRITE],
             summary="Upload a cryoSPARC .cs; its stacks are looked up in ?folder=")
async def create(request: Request, response: Response, service: Service,
                 folder: Annotated[str, Query(description="absolute folder inside an "
                                                          "allowed root holding the stacks")],
                 caller: Caller,
                 name: Annotated[str | None, Query(description="file name for a raw body "
                                                               "(multipart: the part's)")]
                 = None,
                 project: Annotated[str | None, Query(
                     max_length=PROJECT_NAME_MAX, description="the set's project (default: "
                     "'default', or the token's only project)")] = None) -> dict[str, Any]:
    """``curl -F file=@P3_J12_particles.cs '$S/v1/particle-sets?folder=/shared/P3/J12'``.
    Every stack and index is checked now; bad rows are findings (with row numbers)."""
    owner = project_for(Placement.given(None, project), caller)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/"):
        body = multipart_body(request, service.settings)
        row = await sets(service).create_from_part(body, folder, owner)
    else:
        row = await sets(service).create(name or "particles.cs", body_chunks(request), folder,
                                         owner)
    response.headers["Location"] = f"/v1/particle-sets/{row['id']}"
    return view(row)


@router.get("/{set_id}", responses=ERRORS, dependencies=[READ],
            summary="A particle set: rows, stacks, fields, findings")
def get(set_id: str, service: Service, caller: Caller) -> dict[str, Any]:
    return view(sets(service).get(set_id, caller))


@router.get("/{set_id}/particles", responses=ERRORS, dependencies=[READ],
            summary="Particles with their per-row fields, in row order")
def particles(set_id: str, service: Service, caller: Caller,
              offset: Annotated[int, Query(ge=0)] = 0,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    sets(service).get(set_id, caller)
    return sets(service).particles(set_id, offset, limit)


@router.get("/{set_id}/particles/{n}.png", responses=PNG, response_class=Response,
            dependencies=[READ], summary="Particle n (row order) as PNG")
def particle_png(set_id: str, n: int, request: Request, service: Service, caller: Caller,
                 size: Size = 256, clip: Clip = 0.5) -> Response:
    sets(service).get(set_id, caller)
    png = sets(service).image_png(set_id, n, size, clip, encode_png)
    return png_response(request, png, f'"{set_id}-p{n}-{size}-{clip}"')


@router.get("/{set_id}/export", response_class=Response, responses=FILE,
            dependencies=[READ], summary="Rows a:b (default all) as one MRC stack")
async def export(set_id: str, request: Request, service: Service, caller: Caller,
                 rows: Annotated[str | None, Query(description="a:b, 0-based, b exclusive")]
                 = None) -> Response:
    await anyio.to_thread.run_sync(sets(service).get, set_id, caller)
    key, filename = await anyio.to_thread.run_sync(sets(service).export, set_id, rows)
    found = await anyio.to_thread.run_sync(service.downloads.object_download, key, filename,
                                           f'"{set_id}-{rows or "all"}"')
    return download_response(request, found)


@router.delete("/{set_id}", responses=ERRORS, dependencies=[ADMIN],
               summary="Delete a particle set (the stacks are never touched)")
def delete(set_id: str, service: Service) -> dict[str, Any]:
    sets(service).delete(set_id)
    return {"deleted": set_id}
