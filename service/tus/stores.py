"""Where a resumable upload's bytes wait until the last PATCH: a file in this replica's
data folder (embedded), or the parts of an S3 multipart upload (any replica may take the
next PATCH). The tus protocol (:mod:`service.tus`) does not know which.

On S3, as tusd's s3store does it: the upload is one multipart upload; every part but
the last must be at least 5 MiB, so a PATCH ending inside a part keeps that tail as a
small object of its own until the next PATCH completes the part. The catalog's row holds
the multipart upload id, the parts (number, size, ETag, CRC-32) and the tail's key and
length;
the offset is what they add up to. A part is recorded once uploaded, so a PATCH cut off
by a crash keeps every whole part it sent; the tail object is written under a new key
and named in the row in one step, so a reader never sees a tail that does not match.
"""

from __future__ import annotations

import os
import secrets
from functools import partial
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..catalog import Catalog
from ..datastore import DataStore, LocalStore, ObjectMissing
from ..receiver import FileAppender
from ..storage import file_blocks, read_blocks

if TYPE_CHECKING:
    from ..datastore.s3 import S3Store

READ_BLOCK = 8 << 20


def tus_key(upload_id: str) -> str:
    return f"tus/{upload_id}"


class Patch(ABC):
    """One PATCH's bytes on their way: :meth:`append` (an Appender for the Receiver),
    then :meth:`settle` with the offset to keep (the bytes that arrived, or the start
    for a PATCH whose checksum failed): the row fields that record it."""

    @abstractmethod
    def append(self, views: list[memoryview], offset: int) -> int: ...

    @abstractmethod
    def settle(self, keep: int) -> dict[str, Any]: ...

    def after_settle(self) -> None:
        """Once the row records the settled state: drop what it no longer names."""

    def unsettle(self) -> None:
        """The settled state could not be recorded: give back the room its bytes take
        where that is cheap (the row's offset stands either way)."""

    def close(self) -> None:
        """Release what the PATCH held (whatever happened)."""


class TusBytes(ABC):
    @abstractmethod
    def create(self, upload_id: str) -> dict[str, Any]:
        """Make room for a new upload; row fields to record."""

    @abstractmethod
    def open_patch(self, row: dict[str, Any], start: int, checksum: bool) -> Patch:
        """The PATCH starting at ``start``; ``checksum``: its bytes may still be
        discarded at the end (nothing is recorded before :meth:`Patch.settle`)."""

    def first_bytes(self, row: dict[str, Any], n: int) -> bytes | None:
        """The upload's first bytes, where they can be read before it is finished."""
        return None

    @abstractmethod
    def blocks(self, row: dict[str, Any]) -> Iterator[bytes]:
        """A finished upload's bytes, in order (an ingest job replays them)."""

    @abstractmethod
    def keep(self, row: dict[str, Any], store: DataStore, key: str) -> int:
        """Store a copy of a finished upload's bytes under ``key`` (the file as received,
        kept only if needed); the upload's own bytes stay until :meth:`drop`."""

    @abstractmethod
    def drop(self, row: dict[str, Any]) -> None:
        """Remove the upload's bytes (idempotent): termination, expiry, or the commit
        protocol's release step -- never anything else."""


# -- a file in the data folder -------------------------------------------------------

class LocalPatch(Patch):
    def __init__(self, path: Path, start: int):
        self.fd, self.start = os.open(path, os.O_RDWR), start
        try:
            os.ftruncate(self.fd, start)  # drop any tail a crash left past the offset
        except BaseException:
            os.close(self.fd)
            raise
        self._out = FileAppender(self.fd)

    def append(self, views: list[memoryview], offset: int) -> int:
        return self._out.append(views, offset)

    def settle(self, keep: int) -> dict[str, Any]:
        os.ftruncate(self.fd, keep)
        os.fsync(self.fd)
        return {"offset": keep}

    def unsettle(self) -> None:
        os.ftruncate(self.fd, self.start)  # on a full disk, these bytes are the room

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalTusBytes(TusBytes):
    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.tus"

    def create(self, upload_id: str) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path(upload_id).touch(exist_ok=False)
        return {}

    def open_patch(self, row: dict[str, Any], start: int, checksum: bool) -> Patch:
        return LocalPatch(self.path(row["id"]), start)

    def first_bytes(self, row: dict[str, Any], n: int) -> bytes | None:
        with open(self.path(row["id"]), "rb") as f:
            return f.read(n)

    def blocks(self, row: dict[str, Any]) -> Iterator[bytes]:
        return file_blocks(self.path(row["id"]), READ_BLOCK)

    def keep(self, row: dict[str, Any], store: DataStore, key: str) -> int:
        return store.copy_file(key, self.path(row["id"]))

    def drop(self, row: dict[str, Any]) -> None:
        self.path(row["id"]).unlink(missing_ok=True)


# -- an S3 multipart upload ----------------------------------------------------------

class S3Patch(Patch):
    """Bytes buffered into parts of ``part_bytes``; each full part is uploaded and (for a
    PATCH without a checksum) recorded at once; the rest becomes the tail object."""

    def __init__(self, owner: "S3TusBytes", row: dict[str, Any], start: int,
                 record_each_part: bool):
        self.owner, self.row, self.start = owner, row, start
        self.store = owner.store
        self.key = tus_key(row["id"])
        self.parts: list[list[Any]] = [list(p) for p in (row["parts"] or [])]
        self._parts_at_start = [list(p) for p in self.parts]
        self._old_tail = row["pending_key"]
        self.buffer = bytearray(self.store.read_range(row["pending_key"], 0,
                                                      row["pending_bytes"])
                                if row["pending_key"] else b"")
        if len(self.buffer) != row["pending_bytes"]:
            raise ObjectMissing(f"the tail of upload {row['id']} is shorter than recorded")
        self.record_each_part = record_each_part
        self._new_tail: str | None = None
        self._tail_obsolete = False

    def _committed(self) -> int:
        return sum(p[1] for p in self.parts)

    def append(self, views: list[memoryview], offset: int) -> int:
        written = 0
        for view in views:
            self.buffer += view
            written += len(view)
        part_bytes = self.store.part_bytes
        while len(self.buffer) >= part_bytes:
            number = len(self.parts) + 1
            data = bytes(self.buffer[:part_bytes])
            part = self.store.upload_part(self.key, self.row["multipart_id"], number, data)
            self.parts.append(list(part))
            del self.buffer[:part_bytes]
            self._tail_obsolete = True  # the old tail's bytes are in this part now
            if self.record_each_part:
                self.owner.catalog.update_tus_upload(
                    self.row["id"], parts=self.parts, offset=self._committed(),
                    pending_key=None, pending_bytes=0)
        return written

    def settle(self, keep: int) -> dict[str, Any]:
        if keep == self.start:  # nothing of this PATCH stays (checksum failed, no bytes)
            self._new_tail = self._old_tail  # the recorded tail still holds the bytes
            return {"parts": self._parts_at_start, "offset": self.start,
                    "pending_key": self._old_tail, "pending_bytes": self.row["pending_bytes"]}
        fields: dict[str, Any] = {"parts": self.parts, "pending_bytes": len(self.buffer)}
        if self.buffer:
            self._new_tail = f"{self.key}.tail-{len(self.parts)}-{secrets.token_hex(4)}"
            self.store.put_bytes(self._new_tail, bytes(self.buffer))
        fields["pending_key"] = self._new_tail
        fields["offset"] = self._committed() + len(self.buffer)
        return fields

    def after_settle(self) -> None:
        if self._old_tail and self._old_tail != self._new_tail:
            self.store.delete(self._old_tail)


class S3TusBytes(TusBytes):
    def __init__(self, store: "S3Store", catalog: Catalog):
        self.store, self.catalog = store, catalog

    def create(self, upload_id: str) -> dict[str, Any]:
        return {"multipart_id": self.store.create_multipart(tus_key(upload_id)),
                "parts": [], "pending_bytes": 0}

    def open_patch(self, row: dict[str, Any], start: int, checksum: bool) -> Patch:
        return S3Patch(self, row, start, record_each_part=not checksum)

    def first_bytes(self, row: dict[str, Any], n: int) -> bytes | None:
        """Before any part exists the tail holds the first bytes; after, they are in part
        1, which S3 cannot read until the upload is complete (the replay checks them)."""
        if row["parts"] or not row["pending_key"]:
            return None
        return self.store.read_range(row["pending_key"], 0, n)

    def _complete(self, row: dict[str, Any]) -> str:
        """Turn the parts and the tail into the object ``tus/<id>``."""
        key = tus_key(row["id"])
        if self.store.size(key) is not None:
            return key  # completed before (a replay that runs again)
        parts = [tuple(p) for p in (row["parts"] or [])]
        if row["pending_bytes"]:
            tail = self.store.read_range(row["pending_key"], 0, row["pending_bytes"])
            parts.append(tuple(self.store.upload_part(key, row["multipart_id"],
                                                      len(parts) + 1, tail)))
        if parts:
            self.store.complete_multipart(key, row["multipart_id"], parts)
        else:
            self.store.abort_multipart(key, row["multipart_id"])
            self.store.put_bytes(key, b"")
        if row["pending_key"]:
            self.store.delete(row["pending_key"])
        return key

    def blocks(self, row: dict[str, Any]) -> Iterator[bytes]:
        key = self._complete(row)
        return read_blocks(partial(self.store.read_range, key), 0, self.store.size(key) or 0,
                           READ_BLOCK)

    def keep(self, row: dict[str, Any], store: DataStore, key: str) -> int:
        return store.copy(self._complete(row), key)

    def drop(self, row: dict[str, Any]) -> None:
        key = tus_key(row["id"])
        if row.get("multipart_id"):
            self.store.abort_multipart(key, row["multipart_id"])
        if row.get("pending_key"):
            self.store.delete(row["pending_key"])  # the tail the row names
        self.store.delete(key)


def tus_bytes(store: DataStore, catalog: Catalog, folder: Path) -> TusBytes:
    return LocalTusBytes(folder) if isinstance(store, LocalStore) else S3TusBytes(store, catalog)

