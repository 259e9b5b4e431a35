"""One streaming ingest of one movie, from its first byte to its catalog row.

Every way a movie arrives ends here: an upload while it streams (PUT, multipart, tus
PATCHes in order), a registered file read once, a tus upload replayed after a restart.
The bytes are cut into frames as they come (:class:`~service.mrc.stream.StreamCutter`)
and each frame goes once through decode -> statistics -> sum -> compress -> proof
(:class:`~service.mrc.archiver.Archiver`), so the dataset is ready moments after the
last byte.

The stored form is decided at the end (DESIGN section 9): the archive + restore record
when every frame was proven to restore to the bytes received and the archive is
smaller; otherwise the file as received (a rejected file, an MRCZ upload, data that do
not compress, a proof that failed). ``MRC_INGEST_KEEP_ORIGINAL`` keeps the file as
received as well. A registered file stays where it is and is never touched.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import exc as sa_exc

from .catalog import Catalog
from .config import Settings
from .datastore import DataStore
from .errors import Conflict
from .jobs import LeaseLost
from .mrc.archiver import FORM_ARCHIVE, ArchiveOutcome, ArchivePolicy, Archiver
from .mrc.preview import encode_sum
from .mrc.stream import StreamCutter
from .storage import (FORM_REGISTERED, Storage, archive_key, original_key, record_key,
                      sum_key, tail_key)

log = logging.getLogger("mrc_ingest.ingest")

#: statuses a re-upload of the same bytes is answered from (no second copy is kept)
LIVE_STATUSES = ("receiving", "queued", "processing", "ready")
#: progress goes to the catalog at most this often (seconds)
PROGRESS_INTERVAL = 0.25


@dataclass
class PassDeps:
    """What a pass needs of the service around it."""

    settings: Settings
    catalog: Catalog
    store: DataStore
    #: (dataset id, info, fields, extended header, header, frames) -> writes the final
    #: row with the acquisition summary in it; False when the row is gone
    finalize: Callable[..., bool]
    #: serializes "is there already a dataset with these bytes?" with the commit
    commit_lock: threading.Lock = field(default_factory=threading.Lock)
    #: how many passes may cut and measure frames at once: one per core but one, which
    #: stays for the event loop and the compressors. Eight uploads at once otherwise run
    #: eight such threads, and the event loop, which answers the dashboards, waits its
    #: turn for the GIL behind all of them; the others wait here (and their clients,
    #: through TCP, a moment) instead. Measured (bench_load --quick, 2 cores): metadata
    #: p99 326 ms unbounded, 164 ms with one slot per core, 85 ms with this; the
    #: aggregate upload rate 121, 119, 114 MB/s.
    frame_slots: threading.Semaphore = field(default_factory=lambda: threading.BoundedSemaphore(
        max(1, (os.cpu_count() or 1) - 1)))


def drop_receiving(catalog: Catalog, storage: Storage, dataset_id: str) -> bool:
    """Drop a dataset whose upload was cut off while it was still ``receiving``: its
    objects, then its row (its jobs go with it). Objects first: should the store be
    away, the row stays for a later attempt and nothing is orphaned. A dataset in any
    other state is left alone; True when one was dropped."""
    dataset = catalog.get_dataset(dataset_id)
    if dataset is None or dataset["status"] != "receiving":
        return False
    storage.remove_dataset(dataset_id)
    catalog.delete_dataset(dataset_id)
    return True


class OriginalBytes:
    """How the bytes as received can be kept if they must be: moved from a scratch or
    tus file into the datastore, or (registrations) left where the user keeps them."""

    def keep(self, store: DataStore, key: str) -> int | None:
        """Store them under ``key``; the byte count, or None when nothing is stored."""
        return None

    def discard(self) -> None:
        pass


class MovedOriginal(OriginalBytes):
    """Bytes waiting somewhere (an upload's scratch copy, a finished tus upload) that
    ``keep(store, key)`` moves into the datastore and ``discard()`` drops."""

    def __init__(self, keep: Callable[[DataStore, str], int], discard: Callable[[], None]):
        self._keep, self._discard = keep, discard

    def keep(self, store: DataStore, key: str) -> int | None:
        return self._keep(store, key)

    def discard(self) -> None:
        self._discard()


class IngestPass:
    """Feed it the bytes in order (:meth:`feed`, on a worker thread), then
    :meth:`finish` (or :meth:`abort`). ``dataset_id``: the dataset's row, made by the
    caller (registrations, replays) or by the pass when the header arrives (uploads,
    ``create_row``)."""

    def __init__(self, deps: PassDeps, *, dataset_id: str, name: str, source: str,
                 normalize: bool | None, original: OriginalBytes,
                 declared_size: int | None = None, create_row: bool = False,
                 phase: str = "receiving", registered_path: str = "", fence: tuple[str, str] | None = None,
                 takeover_rewrites: bool = False):
        self.deps = deps
        self.dataset_id, self.name, self.source = dataset_id, name, source
        self.normalize = deps.settings.normalize if normalize is None else normalize
        self.original = original
        self.declared_size = declared_size
        self.create_row, self.phase = create_row, phase
        self.registered_path = registered_path
        #: (job id, owner): the final write happens only while that lease is held
        self.fence = fence
        #: a worker that takes the lease over runs this same pass and writes the same
        #: keys (an ingest job): having lost the lease, this pass must not remove them
        self.takeover_rewrites = takeover_rewrites
        #: the catalog row names this pass's objects: from here on nothing is removed
        self.committed = False
        #: called (on the feeding thread) once the dataset row exists
        self.on_row: Callable[[], None] | None = None
        #: merged into the dataset's info at the end (a registration's fingerprint)
        self.extra_info: dict[str, Any] = {}
        self.received = 0
        self.row_created = False
        settings = deps.settings
        policy = ArchivePolicy(codec=settings.archive, clevel=settings.archive_clevel,
                               normalize=self.normalize,
                               sum_side=settings.sum_preview_size)
        self.archiver = Archiver(
            policy, lambda: deps.store.open_writer(archive_key(dataset_id), reserve_head=1024),
            lambda: deps.store.open_writer(tail_key(dataset_id)))
        self.cutter = StreamCutter(pool=self.archiver.pool)
        self._last_progress = 0.0
        self.started = time.perf_counter()

    # -- bytes in -----------------------------------------------------------------

    def feed(self, chunks: list[bytes]) -> None:
        with self.deps.frame_slots:
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
        self.deps.catalog.add_dataset(
            id=self.dataset_id, name=self.name, source=self.source, status="receiving",
            size_bytes=self.declared_size or 0, path=self.registered_path, info=info,
            mode=layout.mode, nx=layout.nx, ny=layout.ny, nz=layout.nz,
            dtype=str(layout.dtype), progress=self._progress())
        self.row_created = True
        if self.on_row is not None:
            self.on_row()

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

    # -- the end ------------------------------------------------------------------

    def finish(self, sha256: str) -> dict[str, Any]:
        """All bytes are in and their digest checked: decide the stored form, commit it
        and the catalog row. Returns ``{"dataset", "duplicate"}``."""
        deps, catalog = self.deps, self.deps.catalog
        for piece in self.cutter.finish():
            self.archiver.add(piece)
        with deps.commit_lock:
            if self.source != "registration":
                existing = catalog.find_by_sha256(sha256, LIVE_STATUSES,
                                                  exclude_id=self.dataset_id)
                if existing is not None:
                    self.abort(delete_row=True)
                    return {"dataset": existing, "duplicate": True}
            outcome = self.archiver.finish(self.received, sha256,
                                           self.cutter.header_findings + self.cutter.findings)
            try:
                dataset = self._commit(outcome, sha256)
            except LeaseLost:
                if not self.takeover_rewrites:
                    self._remove_objects()
                raise
            except sa_exc.IntegrityError:
                # The same bytes became a dataset an instant ago, here or on another
                # replica (the catalog keeps one live upload per content): that one.
                existing = catalog.find_by_sha256(sha256, LIVE_STATUSES,
                                                  exclude_id=self.dataset_id)
                self.abort(delete_row=True)
                if existing is None:
                    raise
                return {"dataset": existing, "duplicate": True}
            except BaseException:
                if not self.committed:
                    self._remove_objects()
                raise
        return {"dataset": dataset, "duplicate": False}

    def _commit(self, outcome: ArchiveOutcome, sha256: str) -> dict[str, Any]:
        deps, store, dataset_id = self.deps, self.deps.store, self.dataset_id
        keys: dict[str, str] = {}
        sizes: dict[str, int] = {}
        if outcome.form == FORM_ARCHIVE:
            assert outcome.record is not None and outcome.archive is not None
            keys["archive"] = archive_key(dataset_id)
            sizes["archive"] = outcome.archive["bytes"]
            sizes["record"] = store.put_bytes(record_key(dataset_id), outcome.record)
            keys["record"] = record_key(dataset_id)
            if outcome.tail_bytes:
                keys["tail"], sizes["tail"] = tail_key(dataset_id), outcome.tail_bytes
        if outcome.frame_sum is not None and outcome.frame_sum.total is not None:
            sizes["sum"] = store.put_bytes(sum_key(dataset_id),
                                           encode_sum(outcome.frame_sum.total))
            keys["sum"] = sum_key(dataset_id)
        form = outcome.form
        keep = form != FORM_ARCHIVE or deps.settings.keep_original
        kept = self.original.keep(store, original_key(dataset_id, self.name)) if keep else None
        if kept is not None:
            keys["original"], sizes["original"] = original_key(dataset_id, self.name), kept
        else:
            self.original.discard()
            if form != FORM_ARCHIVE:
                form = FORM_REGISTERED  # the user's file, on shared storage
        fields: dict[str, Any] = {"sha256": sha256, "size_bytes": self.received,
                                  "stored_bytes": sum(sizes.values()), "progress": None,
                                  "frame_stats": outcome.frame_stats}
        info = self._info(outcome, form, keys, sizes)
        source = self.archiver.source
        if source is not None:
            layout = source.layout
            fields.update(mode=layout.mode, nx=layout.nx, ny=layout.ny, nz=layout.nz,
                          dtype=str(layout.dtype), pixel_size=outcome.described[
                              "pixel_size_angstrom"][0] if outcome.described else None)
        fields["status"] = "ready" if outcome.valid else "rejected"
        if not deps.finalize(dataset_id, info, fields,
                             source.extended if source is not None else None,
                             source.header if source is not None else None,
                             source.layout.nz if source is not None else None,
                             fence=self.fence):
            if self.fence is not None and not deps.catalog.holds_lease(*self.fence):
                raise LeaseLost(f"the lease of job {self.fence[0]} went to another worker "
                                f"before dataset {dataset_id} was committed")
            raise Conflict(f"dataset {dataset_id} was deleted while it was being ingested")
        self.committed = True
        dataset = deps.catalog.get_dataset(dataset_id)
        if dataset is None:
            raise Conflict(f"dataset {dataset_id} was deleted as it was committed")
        return dataset

    def _info(self, outcome: ArchiveOutcome, form: str, keys: dict[str, str],
              sizes: dict[str, int]) -> dict[str, Any]:
        info: dict[str, Any] = {
            "findings": [f.to_dict() for f in outcome.findings],
            "storage": {"form": form, "keys": keys, "bytes": sizes,
                        "received_bytes": self.received},
            "timings": {**outcome.timings,
                        "total_s": round(time.perf_counter() - self.started, 3)},
        }
        if self.normalize != self.deps.settings.normalize:
            info["normalize"] = self.normalize
        info.update(self.extra_info)
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

    def abort(self, delete_row: bool | None = None, discard_original: bool = True) -> None:
        """The upload failed (or was a duplicate): nothing of it stays. The dataset row
        goes too when this pass made it (or ``delete_row``), but only once its objects
        are gone: while the store or catalog is away the row stays ``receiving`` and its
        upload job's lease lapses, so a worker finishes the cleanup later
        (:meth:`Pipeline.drop_upload`). ``discard_original=False``: the bytes as received
        stay where they are (a complete tus upload, to be ingested again). A pass whose
        row was committed removes nothing: the objects are the dataset's."""
        if self.committed:
            return
        try:
            self.archiver.abort()
            if discard_original:
                self.original.discard()
            self._remove_objects()
            if self.row_created if delete_row is None else delete_row:
                self.deps.catalog.delete_dataset(self.dataset_id)
        except Exception:  # noqa: BLE001 - the request's own error is the one to report
            log.warning("upload cleanup deferred to its lapsed job", exc_info=True,
                        extra={"dataset_id": self.dataset_id})

    def _remove_objects(self) -> None:
        for key in (archive_key(self.dataset_id), record_key(self.dataset_id),
                    tail_key(self.dataset_id), sum_key(self.dataset_id),
                    original_key(self.dataset_id, self.name)):
            self.deps.store.delete(key)

