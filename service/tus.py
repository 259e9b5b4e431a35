"""Resumable uploads, tus 1.0 (https://tus.io/protocols/resumable-upload): core, creation,
termination and checksum extensions. The protocol lives here; the router only maps HTTP.

An upload's bytes go to ``data_dir/tus/<id>.tus`` and its offset to the catalog after each
PATCH is fsynced, so offsets survive a restart. Bytes received before a dropped
connection are kept (the client resumes from the offset HEAD reports), unless the PATCH
carried an ``Upload-Checksum``, in which case a partial body is discarded. The MRC header
is checked once its 1024 bytes are in; a finished upload becomes a dataset exactly like a
``PUT`` (same commit: SHA-256, de-duplication, ingest job).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio

from .errors import BadRequest, NotMrc, ServiceError, TooLarge
from .mrc.findings import Finding
from .mrc.header import HEADER_SIZE
from .mrc.validate import check_header_bytes
from .storage import sha256_file
from .uploads import check_filename

VERSION = "1.0.0"
EXTENSIONS = "creation,termination,checksum"
CHECKSUMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "md5": hashlib.md5}


class TusError(ServiceError):
    headers = {"Tus-Resumable": VERSION}


class UnknownUpload(TusError):
    status, code = 404, "upload_not_found"


class OffsetMismatch(TusError):
    status, code = 409, "offset_mismatch"


class UploadGone(TusError):
    status, code = 410, "upload_expired"


class UnsupportedVersion(TusError):
    status, code = 412, "tus_version"
    headers = {"Tus-Version": VERSION}


class WrongContentType(TusError):
    status, code = 415, "content_type"


class ChecksumMismatch(TusError):
    status, code = 460, "checksum_mismatch"


def check_version(value: str | None) -> None:
    if value != VERSION:
        raise UnsupportedVersion(f"Tus-Resumable must be {VERSION}, got {value!r}")


def parse_metadata(header: str | None) -> dict[str, str]:
    """``Upload-Metadata: key base64,key2 base64`` (values optional; may be empty)."""
    metadata: dict[str, str] = {}
    for item in (header or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, _, encoded = item.partition(" ")
        try:
            metadata[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise BadRequest(f"Upload-Metadata value of {key!r} is not base64 UTF-8") from None
    return metadata


def parse_checksum(header: str | None) -> tuple[str, bytes] | None:
    if header is None:
        return None
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm not in CHECKSUMS:
        raise BadRequest(f"Upload-Checksum algorithm {algorithm!r} unsupported; use one of "
                         f"{sorted(CHECKSUMS)}")
    try:
        return algorithm, base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise BadRequest("Upload-Checksum value is not base64") from None


@dataclass
class Received:
    """A finished tus upload, in the shape the upload commit expects."""
    path: Path
    received: int
    sha256: str
    header_findings: list[Finding] = field(default_factory=list)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class TusUploads:
    def __init__(self, folder: Path, catalog: Any, max_bytes: int, expiry: timedelta,
                 commit: Callable[[Received, str], dict[str, Any]]):
        self.folder, self.catalog, self.max_bytes = folder, catalog, max_bytes
        self.expiry, self.commit = expiry, commit
        self._busy: set[str] = set()

    def prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for row in self.catalog.expired_tus_uploads(_now()):
            self._drop(row["id"])

    def path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.tus"

    # -- creation / termination / HEAD -------------------------------------------------

    def create(self, length_header: str | None, metadata_header: str | None) -> dict[str, Any]:
        if length_header is None:
            raise BadRequest("Upload-Length is required (Upload-Defer-Length is not "
                             "supported)")
        if not length_header.isdigit():
            raise BadRequest(f"Upload-Length {length_header!r} is not a number")
        length = int(length_header)
        if length > self.max_bytes:
            raise TooLarge(f"Upload-Length {length} exceeds Tus-Max-Size {self.max_bytes}")
        if length < HEADER_SIZE:
            raise NotMrc({"message": f"{length} bytes cannot hold the {HEADER_SIZE}-byte "
                                     "MRC header", "findings": []})
        metadata = parse_metadata(metadata_header)
        filename = check_filename(metadata.get("filename") or metadata.get("name")
                                  or "upload.mrc")
        upload_id = uuid.uuid4().hex
        self.path(upload_id).touch(exist_ok=False)
        return self.catalog.add_tus_upload(
            id=upload_id, filename=filename, length=length, offset=0, metadata=metadata,
            expires_at=(_now_dt() + self.expiry).isoformat(timespec="microseconds"))

    def get(self, upload_id: str) -> dict[str, Any]:
        row = self.catalog.get_tus_upload(upload_id)
        if row is None:
            raise UnknownUpload(f"no upload {upload_id!r}")
        if row["dataset_id"] is None and row["expires_at"] < _now():
            self._drop(upload_id)
            raise UploadGone(f"upload {upload_id} expired at {row['expires_at']}")
        return row

    def terminate(self, upload_id: str) -> None:
        self.get(upload_id)
        if upload_id in self._busy:
            raise OffsetMismatch(f"upload {upload_id} is receiving a PATCH")
        self._drop(upload_id)

    def _drop(self, upload_id: str) -> None:
        self.path(upload_id).unlink(missing_ok=True)
        self.catalog.delete_tus_upload(upload_id)

    # -- PATCH -------------------------------------------------------------------------

    async def patch(self, upload_id: str, offset_header: str | None,
                    checksum_header: str | None, chunks: AsyncIterator[bytes]
                    ) -> dict[str, Any]:
        if offset_header is None or not offset_header.isdigit():
            raise BadRequest("Upload-Offset is required and must be a number")
        checksum = parse_checksum(checksum_header)
        row = await anyio.to_thread.run_sync(self.get, upload_id)
        start = int(offset_header)
        if start != row["offset"]:
            raise OffsetMismatch(f"Upload-Offset {start} != the upload's offset "
                                 f"{row['offset']}")
        if upload_id in self._busy:
            raise OffsetMismatch(f"upload {upload_id} is already receiving a PATCH")
        self._busy.add(upload_id)
        try:
            return await self._receive(row, start, checksum, chunks)
        finally:
            self._busy.discard(upload_id)

    async def _receive(self, row: dict[str, Any], start: int,
                       checksum: tuple[str, bytes] | None,
                       chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        upload_id, length = row["id"], row["length"]
        digest = CHECKSUMS[checksum[0]]() if checksum else None
        fd = os.open(self.path(upload_id), os.O_RDWR)
        offset = start
        complete_body = False
        try:
            os.ftruncate(fd, start)  # drop any tail a crash left past the stored offset
            async for chunk in chunks:
                if offset + len(chunk) > length:
                    raise TooLarge(f"the body goes past Upload-Length {length}")
                await anyio.to_thread.run_sync(_pwrite_all, fd, chunk, offset, digest)
                offset += len(chunk)
                if start < HEADER_SIZE <= offset:
                    await anyio.to_thread.run_sync(self._check_header, upload_id, fd)
            complete_body = True
        finally:
            keep = offset if (complete_body or checksum is None) else start
            if complete_body and digest is not None and digest.digest() != checksum[1]:
                keep = start
            await anyio.to_thread.run_sync(_settle, fd, keep)
            await anyio.to_thread.run_sync(self._store_offset, upload_id, keep)
        if keep != offset:
            raise ChecksumMismatch(f"the PATCH body's {checksum[0]} differs from "
                                   "Upload-Checksum; its bytes were discarded")
        row = {**row, "offset": offset}
        if offset == length:
            row = await asyncio.to_thread(self._finish, row)
        return row

    def _store_offset(self, upload_id: str, offset: int) -> None:
        if self.catalog.get_tus_upload(upload_id) is not None:  # not dropped meanwhile
            self.catalog.update_tus_upload(upload_id, offset=offset)

    def _check_header(self, upload_id: str, fd: int) -> None:
        layout, findings = check_header_bytes(os.pread(fd, HEADER_SIZE, 0))
        if layout is None:
            self._drop(upload_id)
            raise NotMrc({"message": "the upload does not start with an MRC/MRCZ header; "
                                     "it was terminated and nothing was stored",
                          "findings": [f.to_dict() for f in findings]})

    def _finish(self, row: dict[str, Any]) -> dict[str, Any]:
        path = self.path(row["id"])
        with open(path, "rb") as f:
            _, findings = check_header_bytes(f.read(HEADER_SIZE))
        received = Received(path=path, received=row["length"], sha256=sha256_file(path),
                            header_findings=findings)
        result = self.commit(received, row["filename"])
        dataset_id = result["dataset"]["id"]
        self.catalog.update_tus_upload(row["id"], dataset_id=dataset_id)
        return {**row, "dataset_id": dataset_id, "result": result}


def _pwrite_all(fd: int, data: bytes, offset: int, digest: Any) -> None:
    if digest is not None:
        digest.update(data)
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _settle(fd: int, keep: int) -> None:
    try:
        os.ftruncate(fd, keep)
        os.fsync(fd)
    finally:
        os.close(fd)


def _now_dt() -> datetime:
    return datetime.now(timezone.utc)


def _now() -> str:
    return _now_dt().isoformat(timespec="microseconds")
