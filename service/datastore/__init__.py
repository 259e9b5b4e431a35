"""Where the service keeps what it stores: one interface, a local-folder and an
S3-compatible implementation, chosen by settings (``MRC_INGEST_STORAGE_URL``)."""

from .base import (DataStore, ObjectInfo, ObjectMissing, ObjectWriter, StoreError,
                   StoreUnavailable, check_key)
from .local import LocalStore, sweep_abandoned

__all__ = ["DataStore", "LocalStore", "ObjectInfo", "ObjectMissing", "ObjectWriter",
           "StoreError", "StoreUnavailable", "check_key", "sweep_abandoned"]
