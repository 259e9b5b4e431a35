"""Where the service keeps what it stores: one interface, a local-folder and an
S3-compatible implementation, chosen by settings (``MRC_INGEST_STORAGE_URL``).

``S3Store`` is imported on first use: boto3 adds ~25 MB to every process, and the
embedded default never needs it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .base import (DataStore, ObjectCorrupt, ObjectInfo, ObjectMissing, ObjectWriter,
                   Receipt, StoreError, StoreUnavailable, check_key)
from .local import LocalStore, sweep_abandoned

if TYPE_CHECKING:
    from .s3 import S3Store

__all__ = ["DataStore", "LocalStore", "ObjectCorrupt", "ObjectInfo", "ObjectMissing",
           "ObjectWriter", "Receipt", "S3Store", "StoreError", "StoreUnavailable", "check_key", "open_store",
           "sweep_abandoned"]


def open_store(storage_url: str | None, data_dir: Path, endpoint_url: str | None = None,
               part_bytes: int = 8 << 20) -> DataStore:
    """The store a storage URL names: none or ``file:`` is the data folder itself,
    ``s3://bucket/prefix`` a bucket (at ``endpoint_url``, or AWS when None)."""
    scheme = urlsplit(storage_url).scheme if storage_url else "file"
    if scheme == "file":
        return LocalStore(data_dir)
    if scheme == "s3":
        from .s3 import S3Store

        return S3Store(storage_url, endpoint_url=endpoint_url, part_bytes=part_bytes)
    raise ValueError(f"unsupported storage URL {storage_url!r}: leave it unset (or use "
                     f"file:) for the data folder, or give s3://bucket/prefix with an "
                     f"endpoint URL for an S3-compatible store")


def __getattr__(name: str) -> Any:
    if name == "S3Store":
        from .s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
