"""Named dependencies and request helpers shared by the routers."""

from __future__ import annotations

import json
from typing import Annotated, AsyncIterator, Literal, TypeVar

from fastapi import Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from ..auth import Role, Scope
from ..config import Settings
from ..errors import BadRequest, ClientGone, TooLarge
from ..ingest import IngestService
from ..mrc import Codec, Target
from ..sessions import PROJECT_NAME_MAX, SESSION_NAME_MAX, Placement
from ..uploads import MultipartFile

Model = TypeVar("Model", bound=BaseModel)


def get_service(request: Request) -> IngestService:
    return request.app.state.service


Service = Annotated[IngestService, Depends(get_service)]

_bearer = HTTPBearer(auto_error=False, description="an API token (mrc-ingest token)")


def _allow(role: Role):
    async def check(request: Request, _credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        spec = request.app.state.service.auth.check(request.headers.get("authorization"),
                                                    role)
        request.state.scope = spec.scope if spec is not None else Scope.ALL
    return Depends(check)


#: Route dependencies: the least role a route needs (read < write < admin).
READ, WRITE, ADMIN = _allow(Role.READ), _allow(Role.WRITE), _allow(Role.ADMIN)


def caller_scope(request: Request) -> Scope:
    """The projects the caller's token reaches (set by the route's role check, which
    runs first). A route without one reaches nothing: failing closed."""
    scope = getattr(request.state, "scope", None)
    if scope is None:
        raise RuntimeError(f"route {request.url.path} reads the caller's scope without a "
                           "role check")
    return scope


#: the caller's projects (:class:`~service.auth.Scope`), for routes that look rows up
Caller = Annotated[Scope, Depends(caller_scope)]


class PlacementQuery:
    """``?session=NAME&project=NAME``: where an arriving movie goes
    (:mod:`service.sessions`)."""

    def __init__(self,
                 session: Annotated[str | None, Query(
                     max_length=SESSION_NAME_MAX, description="the session the movie "
                     "belongs to (default: <source>-<UTC date>)")] = None,
                 project: Annotated[str | None, Query(
                     max_length=PROJECT_NAME_MAX, description="the session's project "
                     "(default: 'default', or the token's only project)")] = None):
        self.placement = Placement.given(session, project)


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client that hangs up becomes a typed error."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise ClientGone("the client disconnected before the upload completed; nothing "
                         "was stored") from None


def declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest(f"Content-Length {value!r} is not a number")
    return int(value)


def multipart_body(request: Request, settings: Settings, **extras) -> MultipartFile:
    """The request's multipart body, bounded by the settings: counted whole against
    ``max_upload_bytes``, at most ``max_multipart_parts`` parts. ``extras``: the
    companion parts to keep (:class:`MultipartFile`)."""
    return MultipartFile(request.headers.get("content-type", ""), body_chunks(request),
                         max_bytes=settings.max_upload_bytes,
                         max_parts=settings.max_multipart_parts, **extras)


async def json_bytes(request: Request, limit: int) -> bytes:
    """A JSON request body of at most ``limit`` bytes (``MRC_INGEST_MAX_JSON_BYTES``),
    read as it arrives: a larger one is refused (413) as soon as its Content-Length or
    its bytes so far say so, and never held whole."""
    why = (f"the JSON body is over the limit of {limit} bytes (MRC_INGEST_MAX_JSON_BYTES)")
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise TooLarge(f"{why}: Content-Length is {declared}")
    parts, size = [], 0
    async for chunk in body_chunks(request):
        size += len(chunk)
        if size > limit:
            raise TooLarge(why)
        parts.append(chunk)
    return b"".join(parts)


async def json_body(request: Request, model: type[Model], limit: int) -> Model:
    """The request body as ``model``, read after the route's dependencies (the token
    check) and bounded (:func:`json_bytes`); malformed JSON and invalid fields are the
    same 422 ``invalid_request`` FastAPI gives for a body parameter (``where``:
    ``body.<field>``)."""
    raw = await json_bytes(request, limit)
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are no Unicode at all
        raise RequestValidationError([{
            "type": "json_invalid", "loc": ("body", getattr(exc, "pos", 0)),
            "msg": "JSON decode error", "input": {}, "ctx": {"error": str(exc)}}]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                      for e in exc.errors(include_url=False)]) from None


class TargetQuery:
    """``?format=mrc|mrcz&mode=&codec=&clevel=&endian=``: what to convert to. With no
    parameter at all, :attr:`given` is False (the file as stored is wanted)."""

    def __init__(self,
                 format: Annotated[Literal["mrc", "mrcz"] | None, Query(
                     description="mrc (plain) or mrcz (blosc-compressed)")] = None,
                 mode: Annotated[int | None, Query(description="target MRC mode; default: "
                                                   "the natural lossless one (4-bit -> 0)")]
                 = None,
                 codec: Annotated[str | None, Query(description="MRCZ codec (zstd, lz4, "
                                                    "lz4hc, zlib, blosclz); implies mrcz")]
                 = None,
                 clevel: Annotated[int | None, Query(ge=0, le=9)] = None,
                 endian: Annotated[Literal["little", "big"] | None, Query()] = None):
        self.given = any(v is not None for v in (format, mode, codec, clevel, endian))
        self.format, self.mode, self.codec = format, mode, codec
        self.clevel, self.endian = clevel, endian

    def target(self, default_codec: Codec) -> Target:
        if self.format == "mrc" and self.codec is not None:
            raise BadRequest("codec applies to format=mrcz only")
        mrcz = self.format == "mrcz" or (self.format is None and self.codec is not None)
        codec = Codec.NONE
        if mrcz:
            try:
                codec = Codec.from_name(self.codec) if self.codec else (
                    default_codec if default_codec is not Codec.NONE else Codec.ZSTD)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        elif self.clevel is not None:
            raise BadRequest("clevel applies to format=mrcz only")
        return Target(mode=self.mode, codec=codec,
                      clevel=1 if self.clevel is None else self.clevel,
                      byte_order=">" if self.endian == "big" else "<")
