"""GET /: a small dashboard page for facility staff (plain HTML + a little JS, no build
step). It reads the API with the token typed into it, so it works with a read token."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> HTMLResponse:
    page = resources.files("service.web").joinpath("index.html").read_text("utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
