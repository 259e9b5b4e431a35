"""Errors mapped once, at the boundary: every service and format-core error, every
request-validation error and every unknown route become ``{"error", "detail"}`` JSON
with the right status. An unexpected exception is logged and answered with a JSON 500,
never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ServiceError, from_core, to_service_error
from ..mrc import MrcError

log = logging.getLogger("mrc_ingest.api")


def error_response(status: int, code: str, detail: object) -> JSONResponse:
    return JSONResponse({"error": code, "detail": _jsonable(detail)}, status_code=status)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_req: Request, exc: ServiceError) -> JSONResponse:
        response = error_response(exc.status, exc.code, exc.detail)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(MrcError)
    async def _core(_req: Request, exc: MrcError) -> JSONResponse:
        mapped = from_core(exc)
        return error_response(mapped.status, mapped.code, mapped.detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"where": ".".join(str(p) for p in e.get("loc", ())),
                   "message": e.get("msg", ""), "input": e.get("input")}
                  for e in exc.errors()]
        return error_response(422, "invalid_request", _jsonable(detail))

    @app.exception_handler(DBAPIError)
    async def _catalog(req: Request, exc: DBAPIError) -> JSONResponse:
        mapped = to_service_error(exc)  # a full disk under the catalog, an unreachable one
        if mapped is not None:
            response = error_response(mapped.status, mapped.code, mapped.detail)
            response.headers.update(mapped.headers)
            return response
        log.exception("catalog error on %s %s", req.method, req.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__}; see the "
                                                     "server log")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, code, exc.detail)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        mapped = to_service_error(exc)  # a full disk, say, raised as a plain OSError
        if mapped is not None:
            return error_response(mapped.status, mapped.code, mapped.detail)
        log.exception("unhandled error on %s %s", req.method, req.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__}; see the "
                                                     "server log")


def _jsonable(value: object) -> object:
    """``value`` as JSON can hold it; text that UTF-8 cannot (a lone surrogate a request
    sent, echoed back) with its code points written out."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value[:200].decode("utf-8", "replace")
    return str(value)
