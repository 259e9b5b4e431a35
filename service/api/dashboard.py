"""GET /: the dashboard page for facility staff (plain HTML, CSS and JS modules from
``service/web/``, no build step, nothing from a CDN), and GET /web/<file>: its scripts and
style sheet. The page reads the API with the token typed into it, so it works with a read
token; the files themselves hold no data and are open, like the page."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from ..errors import NotFound

router = APIRouter(tags=["dashboard"])

#: what /web/ serves, by suffix: only these, and only plain names (no folders, no dots)
MEDIA_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}
ASSET_NAME = re.compile(r"[a-z][a-z0-9_-]*\.(%s)" % "|".join(MEDIA_TYPES))


def web_file(name: str) -> bytes:
    """A file of the page, as packaged."""
    return resources.files("service.web").joinpath(name).read_bytes()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> HTMLResponse:
    return HTMLResponse(web_file("index.html"), headers={"Cache-Control": "no-cache"})


@router.get("/web/{name}", include_in_schema=False)
def asset(name: str, request: Request) -> Response:
    match = ASSET_NAME.fullmatch(name)
    try:
        body = web_file(name) if match else None
    except FileNotFoundError:
        body = None
    if body is None:
        raise NotFound(f"no dashboard file {name!r}")
    # Revalidated on every load (an upgraded server serves new files at once), answered
    # with 304 when unchanged.
    etag = f'"{hashlib.sha256(body).hexdigest()[:20]}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=MEDIA_TYPES[match.group(1)], headers=headers)
