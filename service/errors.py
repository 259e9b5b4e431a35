"""Typed errors of the service layer. Each carries its HTTP status and a stable error
code; the API maps them (and the format core's errors) to ``{"error", "detail"}`` in one
place (:mod:`service.api.errors`). Nothing below the routers raises HTTPException."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy import exc as sa_exc

from .datastore import ObjectCorrupt, StoreUnavailable
from .mrc import ConversionError, FormatError, FrameIndexError, LossyConversionError, MrcError
from .mrc.particles import ParticleSetError


class RefusedFile(PermissionError):
    """A file on shared storage that the service will not read (a link out of the roots,
    several hard links, not a regular file: :mod:`service.roots`); the message says why.
    An OSError, so format-core code reports it as an unreadable file."""


class NotRegularFile(RefusedFile):
    """A folder, FIFO, device or socket where a file was expected."""


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"
    headers: dict[str, str] = {}

    def __init__(self, detail: Any):
        self.detail = detail
        super().__init__(detail if isinstance(detail, str) else repr(detail))


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class DigestMismatch(ServiceError):
    status, code = 400, "digest_mismatch"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="mrc-ingest"'}


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class PathNotAllowed(ServiceError):
    status, code = 403, "path_not_allowed"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class TooLarge(ServiceError):
    status, code = 413, "too_large"


class NotMrc(ServiceError):
    """The body does not start with an MRC/MRCZ header; nothing was stored."""
    status, code = 415, "not_mrc"


class InsufficientStorage(ServiceError):
    """The disk filled up; what was being written is removed, nothing stored is harmed."""
    status, code = 507, "insufficient_storage"


class Unprocessable(ServiceError):
    status, code = 422, "unprocessable"


class ClientGone(ServiceError):
    """The client closed the connection mid-upload; nothing was stored."""
    status, code = 400, "upload_incomplete"


class InvalidMrc(ServiceError):
    status, code = 422, "invalid_mrc"


class ConversionRefused(ServiceError):
    status, code = 422, "conversion_refused"


class LossyConversion(ServiceError):
    status, code = 422, "lossy_conversion"


class RangeNotSatisfiable(ServiceError):
    status, code = 416, "range_not_satisfiable"

    def __init__(self, size: int, detail: Any):
        super().__init__(detail)
        self.headers = {"Content-Range": f"bytes */{size}"}


class ServiceUnavailable(ServiceError):
    """The catalog or the object store cannot be reached right now."""
    status, code = 503, "unavailable"
    headers = {"Retry-After": "5"}


class FrameNotFound(ServiceError):
    status, code = 404, "frame_not_found"


def first_line(exc: BaseException) -> str:
    """One line for a log about ``exc`` (a database error's message runs on for lines)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def from_core(exc: MrcError) -> ServiceError:
    """The service error for a format-core error: the one place that maps them."""
    if isinstance(exc, FrameIndexError):
        return FrameNotFound(str(exc))
    if isinstance(exc, LossyConversionError):
        return LossyConversion({"message": str(exc), "lossless_targets": exc.lossless_targets})
    if isinstance(exc, ConversionError):
        return ConversionRefused(str(exc))
    if isinstance(exc, ParticleSetError):
        return Unprocessable(str(exc))
    if isinstance(exc, FormatError):
        return InvalidMrc({"message": str(exc),
                           "findings": [f.to_dict() for f in exc.findings]})
    return InvalidMrc(str(exc))


@contextmanager
def disk_errors() -> Iterator[None]:
    """An OS error a client should see with its reason (a full disk) leaves this block
    as the typed error (:func:`to_service_error`), where it happened, rather than as a
    plain ``OSError`` that only the last-resort handler would recognize."""
    try:
        yield
    except OSError as exc:
        mapped = to_service_error(exc)
        if mapped is None:
            raise
        raise mapped from None


def to_service_error(exc: BaseException) -> ServiceError | None:
    """The typed error for ``exc`` when it is one a client should see as 4xx/5xx with a
    reason (ours, the core's, a full disk); None for a bug."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, MrcError):
        return from_core(exc)
    if isinstance(exc, RefusedFile):
        return Conflict(f"a file on shared storage can no longer be read safely: {exc}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"the disk is full ({exc.strerror}); what was being "
                                   "written was removed, nothing stored before was touched")
    if _catalog_disk_full(exc):
        return InsufficientStorage("the catalog's disk is full; the change was rolled back, "
                                   "nothing stored before was touched")
    if isinstance(exc, StoreUnavailable):
        return ServiceUnavailable(f"the object store is unavailable: {exc}")
    if isinstance(exc, ObjectCorrupt):
        return ServiceUnavailable(f"what was stored did not read back as written ({exc}); "
                                  "nothing was committed: try again")
    if _catalog_unreachable(exc):
        return ServiceUnavailable("the catalog database is unavailable; try again shortly")
    return None


def _catalog_unreachable(exc: BaseException) -> bool:
    """A connection that could not be made or was lost (PostgreSQL restarting, say)."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


def from_body(body: dict[str, Any]) -> ServiceError:
    """The typed error a recorded ``{"error", "detail"}`` body stands for (a job's error,
    answered to the request that waited for it)."""
    kind = _classes_by_code().get(body.get("error", ""), ServiceError)
    error = kind.__new__(kind)
    ServiceError.__init__(error, body.get("detail"))
    if kind is ServiceError:
        error.code = body.get("error", "internal_error")
    return error


def _classes_by_code() -> dict[str, type[ServiceError]]:
    """code -> class, derived from the classes themselves (no hand-kept map)."""
    found: dict[str, type[ServiceError]] = {}
    pending = list(ServiceError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        found.setdefault(cls.code, cls)
    return found


def _catalog_disk_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full") or PostgreSQL's 53100
    (disk_full), as the database driver reports them through SQLAlchemy."""
    cause = getattr(exc, "orig", None) or exc
    if getattr(cause, "sqlite_errorname", None) == "SQLITE_FULL":
        return True
    if getattr(cause, "sqlstate", None) == "53100":
        return True
    return "database or disk is full" in str(cause)


def error_body(exc: BaseException) -> dict[str, Any]:
    """``{"error": code, "detail": ...}`` for any exception (jobs record the same shape
    the API returns)."""
    mapped = to_service_error(exc)
    if mapped is not None:
        return {"error": mapped.code, "detail": mapped.detail}
    return {"error": "internal_error", "detail": f"{type(exc).__name__}: {exc}"}
