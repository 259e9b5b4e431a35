"""Resumable uploads, tus 1.0 (https://tus.io/protocols/resumable-upload): core, creation,
termination and checksum extensions. The protocol lives here (the handler); the router
only maps HTTP; where the bytes wait is :mod:`.stores` (a local file, or S3 multipart
parts); two PATCHes of one upload are kept apart by :mod:`.locker`. As tusd, the handler
never deletes an upload's bytes as a side effect of finishing it: termination and expiry
do, and the commit protocol's release step (ARCHITECTURE.md), once the upload's dataset
is committed.

An upload's bytes go through the same :class:`Receiver` every upload uses, and its
offset to the catalog once each PATCH's bytes are durable, so offsets survive a restart
and any replica can take the next PATCH. Bytes received before a dropped connection are kept (the client
resumes from the offset HEAD reports), unless the PATCH carried an ``Upload-Checksum``,
in which case a partial body is discarded.

PATCH bodies are ingested as they arrive, in order: the upload's streaming pass (hash,
frames, archive) lives in memory from PATCH to PATCH, so the dataset is ready when the
last PATCH ends. When that state is lost (the service restarted mid-upload, or a PATCH
was discarded for its checksum), or the end of the last PATCH fails, the upload still
completes: its bytes are read once by an ingest job (queued by the last PATCH, or by
recovery within seconds). The MRC header is checked once its 1024 bytes are in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, AsyncIterator, Iterator

import anyio

from ..auth import Scope
from ..arrival import IngestPass, PassDeps, ReceivedBytes, drop_receiving
from ..catalog import TOMBSTONE, Catalog
from ..datastore import DataStore
from ..errors import BadRequest, NotMrc, ServiceError, TooLarge
from ..failpoints import hit
from ..intake import Intake, new_id, refuse_non_mrc
from ..metrics import Metrics
from ..queries import own_twin
from ..mrc.header import HEADER_SIZE
from ..mrc.stream import HeaderOverLimit, HeaderRefused
from ..receiver import Receiver, pump
from ..sessions import Placement, place
from ..storage import Storage
from ..uploads import check_filename
from .locker import Locker
from .stores import Patch, TusBytes, tus_bytes

log = logging.getLogger("mrc_ingest.tus")

VERSION = "1.0.0"
EXTENSIONS = "creation,termination,checksum,expiration"
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


class UploadLocked(TusError):
    """Another PATCH of the same upload is running (tus allows 423 or 409 here)."""
    status, code = 423, "upload_locked"


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
    """An upload's ingest while its PATCHes arrive in this process, in order."""

    receiver: Receiver
    ingest: IngestPass | None        # None: the ingest runs after the last PATCH


class TusUploads:
    """The protocol over a :class:`~service.tus_bytes.TusBytes` backend. A PATCH holds
    the upload's lock in the catalog (PostgreSQL: an advisory lock), so two PATCHes of
    one upload never interleave, whichever replicas they reach; the offset is the
    catalog's. The streaming ingest state lives in the process that took the previous
    PATCH; a PATCH elsewhere, or after a restart, finds none and the upload is ingested
    from its bytes after the last PATCH instead."""

    def __init__(self, storage: Storage, catalog: Catalog, max_bytes: int,
                 expiry: timedelta, deps: PassDeps, intake: Intake, metrics: Metrics):
        self.storage, self.catalog, self.max_bytes = storage, catalog, max_bytes
        self.expiry, self.deps, self.intake, self.metrics = expiry, deps, intake, metrics
        self.bytes: TusBytes = tus_bytes(storage.store, catalog, storage.tus)
        self.locks = Locker(catalog)
        self._streams: dict[str, _Stream] = {}

    # -- recovery steps (service.arrival.recovery runs them, on any replica) ------------

    def expire(self) -> int:
        """Expired unfinished uploads go (their bytes, their receiving dataset). One a
        client was told is complete never expires while it belongs to a dataset."""
        def drop(row: dict[str, Any]) -> int:
            with self.locks.hold(row["id"]) as taken:
                if taken:
                    self._drop(row)
            return int(taken)
        return each(self.catalog.expired_tus_uploads(), drop, "expire")

    def finish_complete(self) -> int:
        """Uploads that hold every byte (the client was told so) but whose dataset was
        never committed -- the end of the last PATCH failed, or the process died in it --
        are ingested after all; returns how many were (re)queued."""
        def replay(row: dict[str, Any]) -> int:
            with self.locks.hold(row["id"]) as taken:
                row = self.catalog.get_tus_upload(row["id"]) if taken else None
                if row is not None and row["completed_at"] is None and \
                        row["offset"] == row["length"] and row["id"] not in self._streams:
                    return self._replay_later(row)
            return 0
        return each(self.catalog.complete_unfinished_tus_uploads(), replay, "replay")

    def release_committed(self) -> int:
        """Uploads whose dataset is committed but whose bytes are still kept (the
        process died between the commit and the release): release them now."""
        def release(row: dict[str, Any]) -> int:
            TusArrived(self, row["id"]).release()
            return 1
        return each(self.catalog.committed_unreleased_tus_uploads(), release, "release")

    def forget_streams(self) -> None:
        """Streams of uploads finished (or dropped) elsewhere release what they hold."""
        for upload_id in list(self._streams):
            row = self.catalog.get_tus_upload(upload_id)
            if row is None or row["completed_at"] is not None:
                with self.locks.hold(upload_id) as taken:
                    if taken:
                        self._lose_stream(upload_id)

    def terminate_for_dataset(self, dataset_id: str) -> None:
        """The dataset is being deleted: an unfinished upload of it is terminated (its
        next PATCH is a 404), so it cannot come back as a replay."""
        row = self.catalog.tus_upload_of(dataset_id)
        if row is None or row["completed_at"] is not None:
            return
        with self.locks.hold(row["id"]) as taken:
            if taken:
                self._drop(row)
            else:  # a PATCH is streaming: it stops at the tombstone; the upload, detached
                # from the dataset (never replayed into it), expires at the next tick
                self.catalog.update_tus_upload(row["id"], dataset_id=None,
                                               expires_at=self.catalog.now(-1))

    def blocks_of(self, dataset: dict[str, Any]) -> Iterator[bytes] | None:
        """The bytes of the finished upload behind ``dataset`` (for its ingest job)."""
        row = self.catalog.tus_upload_of(dataset["id"])
        if row is None or row["released_at"] is not None:
            return None
        return self.bytes.blocks(row)

    def arrived_of(self, dataset: dict[str, Any]) -> ReceivedBytes:
        """Where the bytes of the upload behind ``dataset`` wait (a replay's)."""
        row = self.catalog.tus_upload_of(dataset["id"])
        return TusArrived(self, row["id"]) if row is not None else ReceivedBytes()

    # -- creation / termination / HEAD -------------------------------------------------

    def create(self, length_header: str | None, metadata_header: str | None,
               scope: Scope = Scope.ALL) -> dict[str, Any]:
        """A new upload; its metadata's ``session`` and ``project`` place its movie
        (:mod:`service.sessions`): the session is made now, the dataset at the header."""
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
        columns = place(self.catalog, Placement.from_metadata(metadata), scope, "upload")
        upload_id = uuid.uuid4().hex
        fields = self.bytes.create(upload_id)
        return self.catalog.add_tus_upload(
            id=upload_id, filename=filename, length=length, offset=0, metadata=metadata,
            dataset_id=new_id(), expires_at=self.catalog.now(self.expiry.total_seconds()),
            **columns, **fields)

    def get(self, upload_id: str, scope: Scope = Scope.ALL) -> dict[str, Any]:
        """The upload (404 when there is none, or it is another project's than the
        caller's; 410 once expired)."""
        row = self.catalog.get_tus_upload(upload_id)
        if row is None or not scope.sees(row.get("project")):
            raise UnknownUpload(f"no upload {upload_id!r}")
        owed = row["offset"] == row["length"] and row["dataset_id"] is not None
        if row["completed_at"] is None and not owed and self.catalog.tus_expired(row):
            with self.locks.hold(upload_id) as taken:
                if taken:  # never under a PATCH that is streaming: expiry drops it later
                    self._drop(row)
            raise UploadGone(f"upload {upload_id} expired at {row['expires_at']}")
        return row

    def dataset_url(self, row: dict[str, Any], scope: Scope = Scope.ALL) -> str | None:
        """The upload's dataset, once there is one (its row exists and is not being
        deleted); None before its header arrived, or after the dataset went. An upload
        completed as the twin of another project's dataset (the same bytes) names
        nothing of it: 409 (:func:`~service.queries.own_twin`)."""
        dataset = self.catalog.get_dataset(row["dataset_id"]) if row["dataset_id"] else None
        if dataset is None or dataset["status"] == TOMBSTONE:
            return None
        return f"/v1/datasets/{own_twin(dataset, scope)['id']}"

    def terminate(self, upload_id: str, scope: Scope = Scope.ALL) -> None:
        row = self.get(upload_id, scope)
        with self.locks.hold(upload_id) as taken:
            if not taken:
                raise UploadLocked(f"upload {upload_id} is receiving a PATCH")
            self._drop(row)

    def _drop(self, row: dict[str, Any]) -> None:
        """An unfinished upload goes: its bytes, its stream, its receiving dataset."""
        self._lose_stream(row["id"])
        if row["completed_at"] is None and row["dataset_id"]:
            drop_receiving(self.catalog, self.storage, row["dataset_id"])
        if row["released_at"] is None:
            self.bytes.drop(row)
        self.catalog.delete_tus_upload(row["id"])

    # -- PATCH -------------------------------------------------------------------------

    async def patch(self, upload_id: str, offset_header: str | None,
                    checksum_header: str | None, chunks: AsyncIterator[bytes],
                    scope: Scope = Scope.ALL) -> dict[str, Any]:
        if offset_header is None or not offset_header.isdigit():
            raise BadRequest("Upload-Offset is required and must be a number")
        checksum = parse_checksum(checksum_header)
        handle = await anyio.to_thread.run_sync(self.locks.take, upload_id)
        if handle is None:
            await anyio.to_thread.run_sync(self.get, upload_id, scope)  # 404/410 before 423
            raise UploadLocked(f"upload {upload_id} is already receiving a PATCH")
        try:
            row = await anyio.to_thread.run_sync(self.get, upload_id, scope)
            start = int(offset_header)
            if start != row["offset"]:
                raise OffsetMismatch(f"Upload-Offset {start} != the upload's offset "
                                     f"{row['offset']}")
            if row["completed_at"] is not None:
                raise OffsetMismatch(f"upload {upload_id} is complete")
            return await self._receive(row, start, checksum, chunks)
        finally:
            await anyio.to_thread.run_sync(self.locks.give_back, handle)

    def _stream(self, row: dict[str, Any], start: int) -> _Stream:
        stream = self._streams.get(row["id"])
        if stream is not None and stream.receiver.received != start:
            self._lose_stream(row["id"])  # PATCHes went elsewhere meanwhile
            stream = None
        if stream is None:
            if start == 0:
                # an earlier attempt at byte 0
                drop_receiving(self.catalog, self.storage, row["dataset_id"])
                ingest = IngestPass(
                    self.deps, dataset_id=row["dataset_id"], name=row["filename"],
                    source="upload", normalize=None, declared_size=row["length"],
                    create_row=True, arrived=TusArrived(self, row["id"]),
                    placement=placement_of(row))
                stream = _Stream(Receiver(None, 0, row["length"]), ingest)
            else:  # the state of the bytes before is not here: ingest after the last PATCH
                stream = _Stream(Receiver(None, start, row["length"]), None)
                stream.receiver.received = start
            self._streams[row["id"]] = stream
        return stream

    async def _receive(self, row: dict[str, Any], start: int,
                       checksum: tuple[str, bytes] | None,
                       chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        upload_id, length = row["id"], row["length"]
        # may drop an earlier attempt (catalog and store calls): off the event loop
        stream = await anyio.to_thread.run_sync(self._stream, row, start)
        digest = CHECKSUMS[checksum[0]]() if checksum else None
        patch = await anyio.to_thread.run_sync(self.bytes.open_patch, row, start,
                                               checksum is not None)
        receiver = stream.receiver
        receiver.out, receiver.offset, receiver.side_digest = patch, start, digest

        def consume(batch: list[bytes]) -> None:
            if stream.ingest is not None:  # the header check happens in feed, at 1024 bytes
                receiver.write_beside(batch, stream.ingest.feed)
            else:
                receiver.write(batch)

        complete_body = refused = False
        try:
            await pump(chunks, receiver, self.deps.work.wrap(consume),
                       keep_partial=checksum is None)
            complete_body = True
            if stream.ingest is None and start < HEADER_SIZE <= receiver.offset:
                first = await anyio.to_thread.run_sync(self.bytes.first_bytes, row,
                                                       HEADER_SIZE)
                if first is not None:
                    refuse_non_mrc(first, self.deps.settings.frame_limits)
        except HeaderOverLimit:
            refused = True  # terminated like a header that is not MRC; answered 422
            raise
        except (NotMrc, HeaderRefused) as exc:
            refused = True
            findings = [f.to_dict() for f in exc.findings] if isinstance(exc, HeaderRefused) \
                else exc.detail.get("findings", [])
            raise NotMrc({"message": "the upload does not start with an MRC/MRCZ header; "
                                     "it was terminated and nothing was stored",
                          "findings": findings}) from None
        except BaseException:
            if stream.ingest is not None and checksum is not None:
                # its bytes are about to be discarded; dropping the stream may wait for
                # an S3 abort: off the event loop
                await anyio.to_thread.run_sync(self._lose_stream, upload_id)
            raise
        finally:
            receiver.side_digest = None
            offset = receiver.offset
            keep = offset if (complete_body or checksum is None) else start
            if complete_body and digest is not None and digest.digest() != checksum[1]:
                keep = start
                await anyio.to_thread.run_sync(self._lose_stream, upload_id)
            if refused:
                patch.close()
                await anyio.to_thread.run_sync(self._drop, row)
            else:
                await anyio.to_thread.run_sync(self._settle, upload_id, patch, keep)
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

    def _settle(self, upload_id: str, patch: Patch, keep: int) -> None:
        """Make ``keep`` bytes durable and record them; if they cannot be recorded (the
        catalog's disk is full, say), the stream is dropped and the catalog's offset
        stands: the next PATCH starts there and overwrites whatever lies beyond."""
        try:
            fields = patch.settle(keep)
            try:
                if self.catalog.get_tus_upload(upload_id) is not None:  # not dropped
                    # expiration counts from the last PATCH, not from the creation
                    self.catalog.update_tus_upload(upload_id, **fields,
                                                   expires_at=self.catalog.now(
                                                       self.expiry.total_seconds()))
            except BaseException:
                patch.unsettle()
                raise
            patch.after_settle()
            hit("tus.after_settle")
        except BaseException:
            self._lose_stream(upload_id)
            raise
        finally:
            patch.close()
        stream = self._streams.get(upload_id)
        if stream is not None:
            stream.receiver.received = fields["offset"]
            if stream.ingest is not None and stream.ingest.received != fields["offset"]:
                # the pass saw bytes that were not kept (a write that failed part-way):
                # its state no longer matches the bytes, so they are read at the end
                self._lose_stream(upload_id)

    def _finish(self, row: dict[str, Any]) -> dict[str, Any]:
        """Every byte is in and durable: commit the streamed pass (the commit protocol
        marks the upload completed and then releases its bytes), or queue the replay
        that will. A failure of the streamed commit keeps every byte: recovery replays
        the upload within seconds."""
        stream = self._streams.pop(row["id"], None)
        dataset_id = row["dataset_id"]
        if stream is not None:
            stream.receiver.close()
        if stream is None or stream.ingest is None:
            self._replay_later(row)
            return row
        ingest = stream.ingest
        try:
            result = ingest.finish(stream.receiver.digest())
        except BaseException:
            ingest.abort(delete_row=True, release_arrived=False)
            raise
        dataset_id = result["dataset"]["id"]
        try:  # bookkeeping after the commit: a failure of it loses nothing
            if result["duplicate"]:
                self.metrics.uploads.labels("duplicate").inc()
            else:
                self.catalog.add_job(id=new_id(), kind="upload", dataset_id=dataset_id,
                                     state="done", started_at=row["created_at"],
                                     finished_at=self.catalog.now(),
                                     result=ingest.job_result)
                self.intake.attach_pending_sidecars(dataset_id, row["filename"],
                                                    row.get("project"))
                self.metrics.uploads.labels("accepted").inc()
                self.metrics.upload_bytes.inc(row["length"])
        except Exception:  # noqa: BLE001
            log.warning("bookkeeping after the commit of upload %s failed", row["id"],
                        exc_info=True)
        return {**row, "dataset_id": dataset_id}

    def _replay_later(self, row: dict[str, Any]) -> int:
        """The bytes are all in but were not committed on the way: an ingest job reads
        them once (on any replica). A committed dataset is never queued again; one
        that failed for good stays failed (its error says why), one that failed while
        the catalog or store was away is tried again; an upload detached from a deleted
        dataset is not replayed. Returns 1 when a job was queued."""
        row = self.catalog.get_tus_upload(row["id"]) or {"dataset_id": None}
        if row["dataset_id"] is None:
            return 0
        dataset = self.catalog.get_dataset(row["dataset_id"])
        if dataset is not None and (dataset["status"] in ("ready", "rejected", TOMBSTONE) or (
                dataset["status"] == "failed"
                and (dataset["info"].get("error") or {}).get("error") != "unavailable")):
            return 0
        if dataset is None:
            if self.catalog.add_dataset(
                    id=row["dataset_id"], name=row["filename"], source="upload",
                    status="queued", size_bytes=row["length"], path="", info={},
                    **placement_of(row)) is None:
                # its session was deleted: the upload expires with it, nothing to replay
                self.catalog.update_tus_upload(row["id"], dataset_id=None,
                                               expires_at=self.catalog.now(-1))
                return 0
        elif dataset["status"] in ("receiving", "failed"):
            self.catalog.update_dataset(row["dataset_id"], status="queued", progress=None)
        # one unfinished replay per dataset, however often recovery asks
        self.intake.submit_job("ingest", row["dataset_id"], dedup_key="replay")
        return 1


class TusArrived(ReceivedBytes):
    """A tus upload's bytes as the bytes as received: kept by copying them into the
    store (they stay until released), released -- once the dataset is committed -- by
    dropping them and recording so."""

    def __init__(self, uploads: TusUploads, upload_id: str):
        self.uploads, self.tus_upload_id = uploads, upload_id

    def _row(self) -> dict[str, Any] | None:
        return self.uploads.catalog.get_tus_upload(self.tus_upload_id)

    def keep(self, store: DataStore, key: str) -> int | None:
        row = self._row()
        return self.uploads.bytes.keep(row, store, key) if row else None

    def release(self) -> None:
        row = self._row()
        if row is None or row["released_at"] is not None:
            return
        self.uploads.bytes.drop(row)
        self.uploads.catalog.update_tus_upload(self.tus_upload_id,
                                               released_at=self.uploads.catalog.now())


def each(rows: list[dict[str, Any]], action, what: str) -> int:
    """``action(row)`` for every row, summed; one row that fails (a permanent store
    error, say) is logged and skipped, so it never stops recovery of the others."""
    done = 0
    for row in rows:
        try:
            done += action(row)
        except Exception:  # noqa: BLE001 - the next tick tries it again
            log.warning("recovery step %s failed for upload %s", what, row.get("id"),
                        exc_info=True)
    return done


def placement_of(row: dict[str, Any]) -> dict[str, Any]:
    """The dataset columns that place an upload's movie (chosen when it was created)."""
    return {"session_id": row.get("session_id"), "project": row.get("project")}
