"""PNG previews of one frame or of the frame sum."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from .deps import READ, Caller, Service
from .schemas import ErrorBody

router = APIRouter(prefix="/v1/datasets", tags=["previews"])

Size = Annotated[int, Query(ge=16, le=4096, description="longest side in pixels (block "
                                                       "means of whole-pixel bins)")]
Clip = Annotated[float, Query(ge=0, lt=50, description="percent clipped to black and to "
                                                       "white (robust contrast)")]
PNG = {200: {"content": {"image/png": {}}}, 404: {"model": ErrorBody},
       409: {"model": ErrorBody}}


def png_response(request: Request, png: bytes, etag: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": "public, max-age=86400"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(png, media_type="image/png", headers=headers)


@router.get("/{dataset_id}/frames/{k}.png", responses=PNG, response_class=Response,
            summary="Frame k (0-based; negative counts from the end) as PNG",
            dependencies=[READ])
def frame_png(dataset_id: str, k: int, request: Request, service: Service, caller: Caller,
              size: Size = 512, clip: Clip = 0.5) -> Response:
    png = service.previews.frame_png(dataset_id, k, size, clip, caller)
    return png_response(request, png, f'"{dataset_id}-f{k}-{size}-{clip}"')


@router.get("/{dataset_id}/sum.png", responses=PNG, response_class=Response,
            summary="Sum of all frames as PNG",
            dependencies=[READ])
def sum_png(dataset_id: str, request: Request, service: Service, caller: Caller,
            size: Size = 512, clip: Clip = 0.5) -> Response:
    png = service.previews.sum_png(dataset_id, size, clip, caller)
    return png_response(request, png, f'"{dataset_id}-sum-{size}-{clip}"')
