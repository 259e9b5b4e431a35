"""One streaming ingest of one movie, from its first byte to its catalog row.

Every way a movie arrives ends here: an upload while it streams (PUT, multipart, tus
PATCHes in order), a registered file read once, a tus upload replayed after a restart,
a job taken over from a worker that died. The bytes are cut into frames as they come
(:class:`~service.mrc.stream.StreamCutter`) and each frame goes once through decode ->
statistics -> sum -> compress -> proof (:class:`~service.mrc.archiver.Archiver`), so the
dataset is ready moments after the last byte (an original rebuilt at the end, below,
takes longer); then :meth:`IngestPass.finish` runs the
commit protocol (:mod:`service.arrival.protocol`): stored -> committed -> released.

The stored form is decided at the end (ARCHITECTURE.md): the archive + restore record
when every frame was proven to restore to the bytes received and the archive is
smaller; otherwise the file as received (a rejected file, an MRCZ upload, data that do
not compress, a proof that failed). ``MRC_INGEST_KEEP_ORIGINAL`` keeps the file as
received as well. A registered file stays where it is and is never touched.

Where the file as received comes from, when it is kept: a tus upload's stored bytes; for
a one-request upload (PUT, multipart), which no other copy holds, the pass itself -- its
archiver writes the file whole as it streams when that is already decided (an MRCZ
upload, no archive codec, ``KEEP_ORIGINAL``), else it is rebuilt at the end from the
proven chunks and the tail, which then hold every byte (:class:`~service.mrc.restore.
Carrier`), and those two objects go once the dataset is committed.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, Callable

from sqlalchemy import exc as sa_exc

from ..catalog import TOMBSTONE, Catalog, Fence
from ..datastore import ObjectCorrupt, ObjectWriter
from ..errors import Conflict, disk_errors
from ..failpoints import hit
from ..jobs import LeaseLost
from ..memory import give_back_free_memory
from ..mrc.archiver import FORM_ARCHIVE, ArchiveOutcome, ArchivePolicy, Archiver
from ..mrc.preview import encode_sum
from ..mrc.restore import Carrier
from ..mrc.stream import StreamCutter
from ..storage import (FORM_REGISTERED, Storage, archive_key, generation_prefix,
                       original_key, record_key, sum_key, tail_key)
from .protocol import (PassBytes, PassDeps, ReceivedBytes, Stored, commit, new_generation,
                       read_back, release)

log = logging.getLogger("mrc_ingest.ingest")

#: statuses a re-upload of the same bytes is answered from (no second copy is kept)
LIVE_STATUSES = ("receiving", "queued", "processing", "ready")
#: progress goes to the catalog at most this often (seconds)
PROGRESS_INTERVAL = 0.25
#: the pieces an original is rebuilt in (:meth:`IngestPass._rebuild_original`)
REBUILD_BLOCK = 4 << 20


def drop_receiving(catalog: Catalog, storage: Storage, dataset_id: str) -> bool:
    """Drop a dataset whose upload was cut off while it was still ``receiving``: its row
    (with its jobs), in one guarded step -- a pass committing at the same moment wins,
    or this does, never both -- then its objects (should the store be away, the sweep
    removes them: no row names them). A dataset in any other state is left alone; True
    when one was dropped."""
    if not catalog.delete_receiving(dataset_id):
        return False
    storage.remove_dataset(dataset_id)
    return True


class IngestPass:
    """Feed it the bytes in order (:meth:`feed`, on a worker thread), then
    :meth:`finish` (or :meth:`abort`). ``dataset_id``: the dataset's row, made by the
    caller (registrations, replays) or by the pass when the header arrives (uploads,
    ``create_row``). ``arrived``: where the bytes as received wait until the commit
    protocol releases them. ``fence``: the job claim under which the commit must land."""

    def __init__(self, deps: PassDeps, *, dataset_id: str, name: str, source: str,
                 normalize: bool | None, arrived: ReceivedBytes,
                 declared_size: int | None = None, create_row: bool = False,
                 phase: str = "receiving", registered_path: str = "",
                 fence: Fence | None = None, placement: dict[str, Any] | None = None):
        self.deps = deps
        self.dataset_id, self.name, self.source = dataset_id, name, source
        self.normalize = deps.settings.normalize if normalize is None else normalize
        self.arrived = arrived
        self.declared_size = declared_size
        self.create_row, self.phase = create_row, phase
        self.registered_path = registered_path
        self.fence = fence
        #: the row's session_id and project (service.sessions.place), for create_row
        self.placement = placement or {}
        #: this pass's own folder of keys (protocol.new_generation)
        self.generation = new_generation()
        #: the catalog row names this pass's objects: from here on nothing is removed
        self.committed = False
        #: the commit transaction was sent and its outcome is not known (the connection
        #: broke): it may have landed, so nothing of this pass may be removed either
        self.commit_unknown = False
        #: called (on the feeding thread) just before the dataset row is made: the
        #: upload's job goes in first, so no process can die leaving a ``receiving`` row
        #: that no job will ever clean up (a job whose row never came drops nothing)
        self.on_row: Callable[[], None] | None = None
        self.job_started = False
        #: merged into the dataset's info at the end (a registration's fingerprint)
        self.extra_info: dict[str, Any] = {}
        #: the job result the commit transaction records (set by finish)
        self.job_result: dict[str, Any] = {}
        self.received = 0  # bytes fed so far
        self.row_created = False
        settings = deps.settings
        policy = ArchivePolicy(codec=settings.archive, clevel=settings.archive_clevel,
                               normalize=self.normalize,
                               sum_side=settings.sum_preview_size,
                               keep_original=settings.keep_original)
        self._writers: dict[str, ObjectWriter] = {}
        self.archiver = Archiver(
            policy, lambda: self._writer("archive", archive_key(dataset_id, self.generation),
                                         reserve_head=1024),
            lambda: self._writer("tail", tail_key(dataset_id, self.generation)),
            open_original=(lambda: self._writer("original", original_key(
                dataset_id, name, self.generation))) if arrived.kept_by_pass else None)
        self.cutter = StreamCutter(pool=self.archiver.pool, limits=settings.frame_limits)
        self._last_progress = 0.0
        self.started = time.perf_counter()

    def _writer(self, role: str, key: str, reserve_head: int = 0) -> ObjectWriter:
        writer = self.deps.store.open_writer(key, reserve_head=reserve_head)
        self._writers[role] = writer
        return writer

    # -- bytes in -----------------------------------------------------------------

    def feed(self, chunks: list[bytes]) -> None:
        with disk_errors(), self.deps.frame_slots:
            for chunk in chunks:
                self.received += len(chunk)
                for piece in self.cutter.feed(chunk):
                    if piece.kind == "header" and self.create_row:
                        self._create_row()
                    self.archiver.add(piece)
        self._report()

    def _create_row(self) -> None:
        info: dict[str, Any] = {"header_findings": [f.to_dict()
                                                    for f in self.cutter.header_findings]}
        if self.normalize != self.deps.settings.normalize:
            info["normalize"] = self.normalize
        layout = self.cutter.layout
        assert layout is not None
        if self.on_row is not None:
            self.on_row()
            self.job_started = True
        made = self.deps.catalog.add_dataset(
            id=self.dataset_id, name=self.name, source=self.source, status="receiving",
            size_bytes=self.declared_size or 0, path=self.registered_path, info=info,
            mode=layout.mode, nx=layout.nx, ny=layout.ny, nz=layout.nz,
            dtype=str(layout.dtype), progress=self._progress(), **self.placement)
        if made is None:
            raise Conflict("the session this movie was sent to was deleted while it "
                           "arrived; nothing was stored")
        self.row_created = True

    def _progress(self) -> dict[str, Any]:
        return {"phase": self.phase, "done": self.received, "total": self.declared_size,
                "unit": "bytes"}

    def _report(self) -> None:
        moment = time.monotonic()
        if (self.row_created or not self.create_row) and \
                moment - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = moment
            try:
                exists = self.deps.catalog.update_dataset(self.dataset_id,
                                                          progress=self._progress())
            except sa_exc.DBAPIError:  # progress is best effort: a catalog hiccup is not
                log.warning("progress not recorded", exc_info=True)  # a reason to fail
                return
            if not exists:
                raise Conflict(f"dataset {self.dataset_id} was deleted while it was being "
                               "received; nothing was stored")

    # -- the end: the commit protocol (ARCHITECTURE.md) ---------------------------------

    def finish(self, sha256: str) -> dict[str, Any]:
        """All bytes are in and their digest checked: decide the stored form, then
        stored -> committed -> released. Returns ``{"dataset", "duplicate"}``."""
        with disk_errors():
            return self._finish(sha256)

    def _finish(self, sha256: str) -> dict[str, Any]:
        deps, catalog = self.deps, self.deps.catalog
        for piece in self.cutter.finish():
            self.archiver.add(piece)
        # A look without the lock first: storing what the catalog already has is waste.
        existing = self._twin(sha256)
        if existing is not None:
            return self._duplicate(existing)
        outcome = self.archiver.finish(self.received, sha256,
                                       self.cutter.header_findings + self.cutter.findings)
        give_back_free_memory()  # the pass's frame buffers went in finish()
        try:
            hit("commit.before_store")
            stored = self._store(outcome, sha256)
            read_back(deps.store, stored)
            hit("commit.after_store")
            info, fields = self._row(outcome, stored, sha256)
        except BaseException as exc:
            self._remove_objects()  # nothing names them: the commit never began
            if isinstance(exc, Exception) and self._deleted():
                raise Conflict(f"dataset {self.dataset_id} was deleted while it was being "
                               "ingested") from None
            raise
        source = self.archiver.source
        summary = (source.extended, source.header, source.layout.nz) if source is not None \
            else (None, None, None)
        try:
            with deps.commit_lock:  # the dedup check and the catalog commit, nothing else
                existing = self._twin(sha256)
                if existing is None:
                    self.commit_unknown = True
                    verdict = commit(deps, self.dataset_id, stored, info, fields,
                                     fence=self.fence, job_result=self.job_result,
                                     tus_upload_id=self.arrived.tus_upload_id,
                                     summary=summary)
                    self.commit_unknown = False
        except sa_exc.IntegrityError:
            self.commit_unknown = False  # refused by the unique index: rolled back
            # The same bytes became a dataset an instant ago, on another replica (the
            # unique index keeps one live upload per content); the transaction rolled back.
            self._remove_objects()
            existing = self._twin(sha256)
            if existing is None:
                raise
            return self._duplicate(existing)
        # Any other error of the commit itself: it may have landed before the connection
        # broke, so nothing is removed (commit_unknown makes abort() leave everything);
        # the sweep removes what no committed row names, drop_upload a receiving row.
        if existing is not None:
            self._remove_objects()
            return self._duplicate(existing)
        if verdict != "committed":
            self._remove_objects()  # the row names none of this generation's keys
            if verdict == "lease_lost":
                assert self.fence is not None
                raise LeaseLost(f"the lease of job {self.fence.job_id} went to another "
                                f"claim before dataset {self.dataset_id} was committed")
            if verdict == "gone":
                raise Conflict(f"dataset {self.dataset_id} was deleted while it was being "
                               "ingested")
            return {"dataset": catalog.get_dataset(self.dataset_id), "duplicate": False}
        self.committed = True
        hit("commit.after_commit")
        release(self.arrived, self.dataset_id)
        # its session's figures: after the commit, outside the commit and acquisition
        # locks (a recompute reads the whole session)
        catalog.dataset_changed(self.dataset_id)
        dataset = catalog.get_dataset(self.dataset_id)
        if dataset is None:
            raise Conflict(f"dataset {self.dataset_id} was deleted as it was committed")
        return {"dataset": dataset, "duplicate": False}

    def _deleted(self) -> bool:
        """Whether the dataset went (or is going) meanwhile: a DELETE removes the
        objects of a pass that is still storing them."""
        try:
            row = self.deps.catalog.get_dataset(self.dataset_id)
        except Exception:  # noqa: BLE001 - the catalog is away: the first error stands
            return False
        return row is None or row["status"] == TOMBSTONE

    def _twin(self, sha256: str) -> dict[str, Any] | None:
        """A live dataset of the same bytes in the same project (registrations are never
        deduplicated; one project's upload never answers with another's dataset)."""
        if self.source == "registration":
            return None
        # the row's project as it is now (its session may have moved since the pass began)
        project = self.deps.catalog.project_of(self.dataset_id) or \
            self.placement.get("project")
        return self.deps.catalog.find_by_sha256(sha256, LIVE_STATUSES,
                                                exclude_id=self.dataset_id, project=project)

    def _duplicate(self, existing: dict[str, Any]) -> dict[str, Any]:
        """The bytes are already a dataset: this pass's row and objects go; a tus upload
        is completed as that dataset, and then its bytes are released."""
        self.abort(delete_row=True, release_arrived=False)
        upload_id = self.arrived.tus_upload_id
        if upload_id is not None:
            self.deps.catalog.complete_as(upload_id, existing["id"])
        release(self.arrived, existing["id"])
        return {"dataset": existing, "duplicate": True}

    def _store(self, outcome: ArchiveOutcome, sha256: str) -> Stored:
        """Step "stored": everything this pass keeps is durable under its generation's
        keys (the archive and tail were committed by the archiver)."""
        deps, store, dataset_id, gen = self.deps, self.deps.store, self.dataset_id, \
            self.generation
        stored = Stored()
        if outcome.form == FORM_ARCHIVE:
            assert outcome.record is not None and outcome.archive is not None
            stored.add("archive", self._receipt("archive"))
            stored.add("record", store.put(record_key(dataset_id, gen), outcome.record))
            if outcome.tail_bytes:
                stored.add("tail", self._receipt("tail"))
        if outcome.frame_sum is not None and outcome.frame_sum.total is not None:
            stored.add("sum", store.put(sum_key(dataset_id, gen=gen),
                                        encode_sum(outcome.frame_sum.total)))
        if outcome.form != FORM_ARCHIVE or deps.settings.keep_original:
            key = original_key(dataset_id, self.name, gen)
            if outcome.original:
                kept = self._receipt("original").size
            elif outcome.carrier is not None:
                kept = self._rebuild_original(outcome.carrier, key)
            else:
                kept = self.arrived.keep(store, key)
            if kept is not None:
                stored.keys["original"], stored.sizes["original"] = key, kept
                stored.original_check = (key, sha256)
            elif self.source != "registration":
                raise Conflict(f"dataset {dataset_id}: the bytes as received could not be "
                               "stored; nothing was committed")
        return stored

    def _rebuild_original(self, carrier: Carrier, key: str) -> int:
        """The file as received, written from the proven chunks and the tail the
        archiver kept it in (its SHA-256 is checked when it is read back); its size."""
        store = self.deps.store
        chunks, tail = self._writers["archive"].key, self._writers.get("tail")
        assert isinstance(self.arrived, PassBytes)  # only a keeping pass has a carrier
        self.arrived.held_in(store, [chunks] + ([tail.key] if tail is not None else []))
        rebuilt = carrier.as_received(partial(store.read_range, chunks),
                                      partial(store.read_range, tail.key) if tail else None)
        writer = self._writer("original", key)
        try:
            for piece in rebuilt.iter_range(block=REBUILD_BLOCK):
                writer.write(piece)
            return writer.commit()
        except ValueError as exc:  # a chunk that does not decompress as it was written
            writer.abort()
            raise ObjectCorrupt(f"{chunks}: read back for the file as received, it does "
                                f"not give the bytes written ({exc})") from None
        except BaseException:
            writer.abort()
            raise

    def _receipt(self, role: str):
        receipt = self._writers[role].receipt
        assert receipt is not None, f"the {role} writer was not committed"
        return receipt

    def _row(self, outcome: ArchiveOutcome, stored: Stored, sha256: str
             ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The committed row's info and columns, and the job result that goes with it."""
        form = outcome.form
        if form != FORM_ARCHIVE and "original" not in stored.keys:
            form = FORM_REGISTERED  # the user's file, on shared storage
        stored_bytes = sum(stored.sizes.values())
        fields: dict[str, Any] = {"sha256": sha256, "size_bytes": self.received,
                                  "stored_bytes": stored_bytes, "progress": None,
                                  "frame_stats": outcome.frame_stats}
        info = self._info(outcome, form, stored.keys, stored.sizes)
        source = self.archiver.source
        if source is not None:
            layout = source.layout
            fields.update(mode=layout.mode, nx=layout.nx, ny=layout.ny, nz=layout.nz,
                          dtype=str(layout.dtype), pixel_size=outcome.described[
                              "pixel_size_angstrom"][0] if outcome.described else None)
        fields["status"] = "ready" if outcome.valid else "rejected"
        self.job_result = {"status": fields["status"], "dataset_id": self.dataset_id,
                           "duplicate": False, "findings": len(outcome.findings),
                           "bytes_written": stored_bytes}
        return info, fields

    def _info(self, outcome: ArchiveOutcome, form: str, keys: dict[str, str],
              sizes: dict[str, int]) -> dict[str, Any]:
        # What an earlier pass of the dataset recorded is replaced by this pass's own:
        # only what the caller adds (a registration's fingerprint) carries over.
        info: dict[str, Any] = {
            **self.extra_info,
            "findings": [f.to_dict() for f in outcome.findings],
            "storage": {"form": form, "keys": keys, "bytes": sizes,
                        "received_bytes": self.received},
            "timings": {**outcome.timings,
                        "total_s": round(time.perf_counter() - self.started, 3)},
        }
        if self.normalize != self.deps.settings.normalize:
            info["normalize"] = self.normalize
        if outcome.described is not None:
            info["file"] = outcome.described
            info["default_mode"] = outcome.default_mode
        if outcome.stats is not None:
            info["stats"] = outcome.stats.to_dict()
        if outcome.frame_sum is not None:
            info["sum"] = {"frames": outcome.frame_sum.frames,
                           "bin": [outcome.frame_sum.fy, outcome.frame_sum.fx]}
        archive = dict(outcome.archive or {})
        archive.update(restorable=outcome.restorable, reason=outcome.reason)
        if outcome.archive is not None:
            archive["ratio_to_original"] = round(self.received / outcome.archive["bytes"], 4)
        info["archive"] = archive
        return info

    def abort(self, delete_row: bool | None = None, release_arrived: bool = True) -> None:
        """The pass failed (or was a duplicate): what it wrote goes. The dataset row goes
        too when this pass made it (or ``delete_row``), but only once its objects are
        gone: while the store or catalog is away the row stays ``receiving`` and its
        upload job's lease lapses, so a worker finishes the cleanup later
        (:meth:`Pipeline.drop_upload`). ``release_arrived=False``: the bytes as received
        stay where they wait (a tus upload's are never dropped here: only termination,
        expiry or the protocol's release step drops them). A committed pass removes
        nothing: the objects are the dataset's; nor does one whose commit may have landed
        (:attr:`commit_unknown`)."""
        if self.committed:
            return
        if self.commit_unknown:
            log.warning("the commit's outcome is unknown: no object or row removed (the "
                        "sweep and recovery settle it)", extra={"dataset_id": self.dataset_id})
            if release_arrived:  # a one-request upload: its client is told it failed
                self.arrived.release()
            return
        try:
            if release_arrived:
                self.arrived.release()
            self._remove_objects()  # the archiver's writers too
            if self.row_created if delete_row is None else delete_row:
                self.deps.catalog.delete_dataset(self.dataset_id)
            elif self.job_started and self.fence is not None:
                # its job went in but the row never did (its session was deleted):
                # nothing is left for the job to clean up
                self.deps.catalog.complete_job(self.fence.job_id, self.fence.owner,
                                               state="cancelled", attempt=self.fence.attempt)
        except Exception:  # noqa: BLE001 - the request's own error is the one to report
            log.warning("upload cleanup deferred to its lapsed job", exc_info=True,
                        extra={"dataset_id": self.dataset_id})

    def _remove_objects(self) -> None:
        """This pass's own objects (its generation's keys, which no other pass writes
        and, uncommitted, no row names)."""
        self.archiver.abort()
        give_back_free_memory()
        self.deps.store.delete_prefix(generation_prefix(self.dataset_id, self.generation))
