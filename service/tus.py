"""Resumable uploads, tus 1.0 (https://tus.io/protocols/resumable-upload): core, creation,
termination and checksum extensions. The protocol lives here; the router only maps HTTP.

An upload's bytes go to ``data_dir/tus/<id>.tus`` (through the same :class:`Receiver`
every upload uses) and its offset to the catalog after each PATCH is fsynced, so offsets
survive a restart. Bytes received before a dropped connection are kept (the client
resumes from the offset HEAD reports), unless the PATCH carried an ``Upload-Checksum``,
in which case a partial body is discarded.

PATCH bodies are ingested as they arrive, in order: the upload's streaming pass (hash,
frames, archive) lives in memory from PATCH to PATCH, so the dataset is ready when the
last PATCH ends. When that state is lost (the service restarted mid-upload, or a PATCH
was discarded for its checksum), the upload still completes: its file is then read once
by an ingest job after the last PATCH. The MRC header is checked once its 1024 bytes are
in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator

import anyio

from .catalog import Catalog, now
from .errors import BadRequest, NotMrc, ServiceError, TooLarge
from .ingest_pass import IngestPass, LocalOriginal, PassDeps
from .intake import Intake, new_id, refuse_non_mrc
from .metrics import Metrics
from .mrc.header import HEADER_SIZE
from .mrc.sink import fsync_directory
from .mrc.stream import HeaderRefused
from .receiver import Receiver, pump
from .storage import Storage
from .uploads import check_filename

log = logging.getLogger("mrc_ingest.tus")

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
class _Stream:
    """An upload's ingest while its PATCHes arrive (in this process's memory)."""

    receiver: Receiver
    ingest: IngestPass | None        # None: the ingest runs after the last PATCH
    lock: threading.Lock = field(default_factory=threading.Lock)


class TusUploads:
    def __init__(self, storage: Storage, catalog: Catalog, max_bytes: int,
                 expiry: timedelta, deps: PassDeps, intake: Intake, metrics: Metrics):
        self.folder = storage.tus
        self.storage, self.catalog, self.max_bytes = storage, catalog, max_bytes
        self.expiry, self.deps, self.intake, self.metrics = expiry, deps, intake, metrics
        self._streams: dict[str, _Stream] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for row in self.catalog.expired_tus_uploads(_now()):
            self._drop(row)

    def path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.tus"

    def file_of(self, dataset: dict[str, Any]) -> Path | None:
        """The file of the finished upload behind ``dataset`` (for its ingest job)."""
        row = self.catalog.tus_upload_of(dataset["id"])
        if row is None:
            return None
        path = self.path(row["id"])
        return path if path.exists() else None

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
            dataset_id=new_id(),
            expires_at=(_now_dt() + self.expiry).isoformat(timespec="microseconds"))

    def get(self, upload_id: str) -> dict[str, Any]:
        row = self.catalog.get_tus_upload(upload_id)
        if row is None:
            raise UnknownUpload(f"no upload {upload_id!r}")
        if row["completed_at"] is None and row["expires_at"] < _now():
            self._drop(row)
            raise UploadGone(f"upload {upload_id} expired at {row['expires_at']}")
        return row

    def terminate(self, upload_id: str) -> None:
        row = self.get(upload_id)
        if upload_id in self._busy:
            raise OffsetMismatch(f"upload {upload_id} is receiving a PATCH")
        self._drop(row)

    def _drop(self, row: dict[str, Any]) -> None:
        """An unfinished upload goes: its file, its stream, its receiving dataset."""
        stream = self._streams.pop(row["id"], None)
        if stream is not None:
            stream.receiver.close()
            if stream.ingest is not None:
                stream.ingest.abort(delete_row=False)
        dataset = self.catalog.get_dataset(row["dataset_id"]) if row["dataset_id"] else None
        if row["completed_at"] is None and dataset is not None and \
                dataset["status"] == "receiving":
            self.catalog.delete_dataset(dataset["id"])
            self.storage.remove_dataset(dataset["id"])
        self.path(row["id"]).unlink(missing_ok=True)
        self.catalog.delete_tus_upload(row["id"])

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
        if row["completed_at"] is not None:
            raise OffsetMismatch(f"upload {upload_id} is complete")
        with self._lock:
            if upload_id in self._busy:
                raise OffsetMismatch(f"upload {upload_id} is already receiving a PATCH")
            self._busy.add(upload_id)
        try:
            return await self._receive(row, start, checksum, chunks)
        finally:
            self._busy.discard(upload_id)

    def _stream(self, row: dict[str, Any], start: int) -> _Stream:
        stream = self._streams.get(row["id"])
        if stream is None:
            if start == 0:
                self._forget_receiving(row["dataset_id"])  # an earlier attempt at byte 0
                ingest = IngestPass(
                    self.deps, dataset_id=row["dataset_id"], name=row["filename"],
                    source="upload", normalize=None, declared_size=row["length"],
                    create_row=True,
                    original=LocalOriginal(lambda: self._finished_file(row["id"]),
                                           lambda: self.path(row["id"]).unlink(
                                               missing_ok=True)))
                stream = _Stream(Receiver(-1, 0, row["length"]), ingest)
            else:  # the state of the bytes before is gone: ingest after the last PATCH
                stream = _Stream(Receiver(-1, start, row["length"]), None)
                stream.receiver.received = start
            self._streams[row["id"]] = stream
        return stream

    def _forget_receiving(self, dataset_id: str) -> None:
        dataset = self.catalog.get_dataset(dataset_id)
        if dataset is not None and dataset["status"] == "receiving":
            self.catalog.delete_dataset(dataset_id)
            self.storage.remove_dataset(dataset_id)

    def _finished_file(self, upload_id: str) -> Path:
        path = self.path(upload_id)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return path

    async def _receive(self, row: dict[str, Any], start: int,
                       checksum: tuple[str, bytes] | None,
                       chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        upload_id, length = row["id"], row["length"]
        stream = self._stream(row, start)
        digest = CHECKSUMS[checksum[0]]() if checksum else None
        fd = os.open(self.path(upload_id), os.O_RDWR)
        receiver = stream.receiver
        receiver.fd, receiver.offset, receiver.side_digest = fd, start, digest

        def consume(batch: list[bytes]) -> None:
            if stream.ingest is not None:  # the header check happens in feed, at 1024 bytes
                receiver.write_beside(batch, stream.ingest.feed)
            else:
                receiver.write(batch)

        complete_body = refused = False
        try:
            os.ftruncate(fd, start)  # drop any tail a crash left past the stored offset
            await pump(chunks, receiver, consume, keep_partial=checksum is None)
            complete_body = True
            if stream.ingest is None and start < HEADER_SIZE <= receiver.offset:
                refuse_non_mrc(os.pread(fd, HEADER_SIZE, 0))
        except (NotMrc, HeaderRefused) as exc:
            refused = True
            findings = [f.to_dict() for f in exc.findings] if isinstance(exc, HeaderRefused) \
                else exc.detail.get("findings", [])
            raise NotMrc({"message": "the upload does not start with an MRC/MRCZ header; "
                                     "it was terminated and nothing was stored",
                          "findings": findings}) from None
        except BaseException:
            if stream.ingest is not None and checksum is not None:
                self._lose_stream(upload_id)  # its bytes are about to be discarded
            raise
        finally:
            receiver.side_digest = None
            offset = receiver.offset
            keep = offset if (complete_body or checksum is None) else start
            if complete_body and digest is not None and digest.digest() != checksum[1]:
                keep = start
                self._lose_stream(upload_id)
            if refused:
                os.close(fd)
                await anyio.to_thread.run_sync(self._drop, row)
            else:
                await anyio.to_thread.run_sync(self._settle, upload_id, fd, start, keep)
        if keep != offset:
            raise ChecksumMismatch(f"the PATCH body's {checksum[0]} differs from "
                                   "Upload-Checksum; its bytes were discarded")
        if offset > length:
            raise TooLarge(f"the body goes past Upload-Length {length}")
        row = {**row, "offset": offset}
        if offset == length:
            row = await anyio.to_thread.run_sync(self._finish, row)
        return row

    def _lose_stream(self, upload_id: str) -> None:
        stream = self._streams.pop(upload_id, None)
        if stream is not None:
            stream.receiver.close()
            if stream.ingest is not None:
                stream.ingest.archiver.abort()

    def _settle(self, upload_id: str, fd: int, start: int, keep: int) -> None:
        """Make ``keep`` bytes durable, then record the offset; if the offset cannot be
        recorded (the catalog's disk is full, say), the file goes back to ``start`` so
        that file and catalog agree on where to resume."""
        try:
            os.ftruncate(fd, keep)
            os.fsync(fd)
            if self.catalog.get_tus_upload(upload_id) is not None:  # not dropped meanwhile
                self.catalog.update_tus_upload(upload_id, offset=keep)
        except BaseException:
            os.ftruncate(fd, start)
            self._lose_stream(upload_id)
            raise
        finally:
            os.close(fd)
        stream = self._streams.get(upload_id)
        if stream is not None:
            stream.receiver.received = keep
            if stream.ingest is not None and stream.ingest.received != keep:
                # the pass saw bytes that were not kept (a write that failed part-way):
                # its state no longer matches the file, so the file is read at the end
                self._lose_stream(upload_id)

    def _finish(self, row: dict[str, Any]) -> dict[str, Any]:
        stream = self._streams.pop(row["id"], None)
        dataset_id = row["dataset_id"]
        if stream is not None:
            stream.receiver.close()
        if stream is not None and stream.ingest is not None:
            ingest = stream.ingest
            try:
                result = ingest.finish(stream.receiver.digest())
            except BaseException:
                ingest.abort(delete_row=True)
                raise
            dataset_id = result["dataset"]["id"]
            if not result["duplicate"]:
                self.catalog.add_job(id=new_id(), kind="upload", dataset_id=dataset_id,
                                     state="done", started_at=row["created_at"],
                                     finished_at=now(), result={
                                         "status": result["dataset"]["status"],
                                         "bytes_written":
                                             result["dataset"]["stored_bytes"] or 0})
                self.intake.attach_pending_sidecars(dataset_id, row["filename"])
                self.metrics.uploads.labels("accepted").inc()
                self.metrics.upload_bytes.inc(row["length"])
            else:
                self.metrics.uploads.labels("duplicate").inc()
                self.path(row["id"]).unlink(missing_ok=True)
        else:
            self._replay_later(row)
        self.catalog.update_tus_upload(row["id"], dataset_id=dataset_id, completed_at=now())
        return {**row, "dataset_id": dataset_id}

    def _replay_later(self, row: dict[str, Any]) -> None:
        """The bytes are all in but were not ingested on the way: an ingest job reads the
        upload's file once."""
        fsync_directory(self.folder)
        dataset = self.catalog.get_dataset(row["dataset_id"])
        if dataset is None:
            self.catalog.add_dataset(id=row["dataset_id"], name=row["filename"],
                                     source="upload", status="queued",
                                     size_bytes=row["length"], path="", info={})
        else:
            self.catalog.update_dataset(row["dataset_id"], status="queued", progress=None)
        self.intake.queue_job("ingest", row["dataset_id"])


def _now_dt() -> datetime:
    return datetime.now(timezone.utc)


def _now() -> str:
    return _now_dt().isoformat(timespec="microseconds")
