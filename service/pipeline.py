"""The work jobs do: ingest a registered file (or a resumable upload replayed after a
restart), convert a dataset for download, verify a stored dataset.

Ingest reads its file exactly once through the same streaming pass an upload takes,
and ends in the same commit protocol (:mod:`service.arrival`). Conversions read the stored archive and write through the
datastore, so a conversion needs nothing of the file as received.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Callable, Iterator

from . import mrc
from .arrival import IngestPass, PassDeps, ReceivedBytes, drop_receiving
from .catalog import TOMBSTONE, Catalog
from .config import Settings
from .errors import Conflict, NotFound, error_body
from .jobs import JobCancelled, JobContext, JobDeferred, LeaseLost
from .mrc.stats import Stats
from .readers import Readers, open_registered
from .roots import Identity, SharedFile
from .storage import Storage, conversion_key

log = logging.getLogger("mrc_ingest.pipeline")


def target_to_dict(target: mrc.Target) -> dict[str, Any]:
    return {"mode": target.mode, "codec": target.codec.cname, "clevel": target.clevel,
            "byte_order": target.byte_order}


def target_from_dict(d: dict[str, Any]) -> mrc.Target:
    return mrc.Target(mode=d["mode"], codec=mrc.Codec.from_name(d["codec"]),
                      clevel=d["clevel"], byte_order=d["byte_order"])


def known_stats(dataset: dict[str, Any]) -> Stats | None:
    """The dataset's exact statistics from ingest (a lossless conversion keeps every
    value, so they are the output's too). None when one of them is not finite (the
    catalog holds null for NaN and infinities): the writer then takes its own."""
    stats = dataset["info"].get("stats")
    if not stats or dataset["nz"] is None or None in stats.values():
        return None
    count = int(dataset["nx"]) * int(dataset["ny"]) * int(dataset["nz"])
    return Stats(stats["dmin"], stats["dmax"], stats["dmean"], stats["rms"], count)


class Pipeline:
    """The job runner given to :class:`service.jobs.JobQueue`."""

    def __init__(self, settings: Settings, catalog: Catalog, storage: Storage,
                 readers: Readers, deps: PassDeps):
        self.settings, self.catalog, self.storage = settings, catalog, storage
        self.readers, self.deps = readers, deps
        #: set by the service once the queue exists: wakes its workers
        self.wake: Callable[[], None] = lambda: None
        #: set by the service: a finished resumable upload's bytes, and where they wait
        self.tus_blocks: Callable[[dict[str, Any]], Iterator[bytes] | None] = \
            lambda dataset: None
        self.tus_arrived: Callable[[dict[str, Any]], ReceivedBytes] = \
            lambda dataset: ReceivedBytes()
        #: set by the service: attach sidecars that arrived before the movie
        self.on_ingested: Callable[[str, str, str | None], None] = \
            lambda dataset_id, name, project: None

    def __call__(self, job: dict[str, Any], ctx: JobContext) -> dict[str, Any] | None:
        if job["kind"] == "upload":
            return self.drop_upload(job)
        if job["kind"] == "ingest":
            return self.ingest(job["dataset_id"], ctx)
        if job["kind"] == "convert":
            return self.convert(job["dataset_id"], target_from_dict(job["target"]), ctx)
        if job["kind"] == "verify":
            return self.verify(job["dataset_id"], ctx)
        raise ValueError(f"unknown job kind {job['kind']!r}")

    def gave_up(self, job: dict[str, Any], fence, error: dict[str, Any]) -> None:
        """A job whose worker died in every attempt: an ingest's dataset is failed with
        that error (recovery never replays a dataset failed for good)."""
        if job["kind"] != "ingest":
            return
        dataset = self.catalog.get_dataset(job["dataset_id"])
        if dataset is not None and dataset["status"] in ("queued", "processing"):
            self.catalog.update_dataset(job["dataset_id"], fence=fence, status="failed",
                                        progress=None, info={**dataset["info"], "error": error})

    # -- uploads cut off ----------------------------------------------------------

    def drop_upload(self, job: dict[str, Any]) -> dict[str, Any]:
        """An upload's job whose lease lapsed: the process receiving it died, its client
        is gone, and an upload cannot resume. What it left (the receiving dataset, a
        partial archive) goes; finished uploads are never touched."""
        # This worker holds the upload job's lease now, so the receiving process (if it
        # still lives) cannot commit: its fenced final write fails and it removes what it
        # wrote. Should the store be away, the row (and this job) stay and it is retried.
        dropped = drop_receiving(self.catalog, self.storage, job["dataset_id"])
        if dropped:
            log.warning("cut-off upload dropped", extra={"dataset_id": job["dataset_id"],
                                                         "job_id": job["id"]})
        return {"dropped": dropped}

    # -- ingest -------------------------------------------------------------------

    def ingest(self, dataset_id: str, ctx: JobContext) -> dict[str, Any] | None:
        dataset = self.catalog.get_dataset(dataset_id)
        if dataset is None or dataset["status"] == TOMBSTONE:
            return None
        if dataset["status"] in ("ready", "rejected"):
            # committed already (a dataset is committed once): nothing to do
            self._release_conversions(dataset_id)
            return {"status": dataset["status"], "already": True, "dataset_id": dataset_id}
        if not self.catalog.update_dataset(dataset_id, fence=ctx.fence, status="processing"):
            if self.catalog.holds_lease(ctx.fence):
                return None  # deleted meanwhile
            raise LeaseLost(f"job {ctx.job['id']} lost its lease before it started")
        info = {k: v for k, v in dataset["info"].items() if k != "error"}
        try:
            outcome = self._ingest(dataset, info, ctx)
        except JobCancelled:
            raise  # its lease went to another worker, or it was cancelled: no writes
        except Exception as exc:
            self.catalog.update_dataset(dataset_id, fence=ctx.fence, status="failed",
                                        progress=None,
                                        info={**info, "error": error_body(exc)})
            self._release_conversions(dataset_id)
            raise
        self._release_conversions(dataset_id)
        return outcome

    def _ingest(self, dataset: dict[str, Any], info: dict[str, Any],
                ctx: JobContext) -> dict[str, Any]:
        dataset_id = dataset["id"]
        arrived = ReceivedBytes()  # a registration's: the user's file, never released
        opened: SharedFile | None = None
        if dataset["source"] == "registration":
            opened = open_registered(self.readers.roots, dataset, dataset["path"])
            info["source_fingerprint"] = opened.identity.to_dict()
            registered, total = dataset["path"], opened.identity.size
            blocks = opened.blocks()
        else:  # a resumable upload finished without being ingested on the way
            found = self.tus_blocks(dataset)
            if found is None:
                raise Conflict(f"the bytes of upload {dataset_id} are gone")
            blocks, registered, total = found, "", dataset["size_bytes"]
            arrived = self.tus_arrived(dataset)
        ingest = IngestPass(self.deps, dataset_id=dataset_id, name=dataset["name"],
                            source=dataset["source"], normalize=info.get("normalize"),
                            arrived=arrived, declared_size=total,
                            phase="processing", registered_path=registered, fence=ctx.fence)
        ingest.extra_info = info
        digest = hashlib.sha256()
        try:
            for block in blocks:
                digest.update(block)
                ingest.feed([block])
                ctx.progress(ingest.received, total)
            if opened is not None and \
                    Identity.of(os.fstat(opened.fd)) != opened.identity:
                raise Conflict(f"the registered file {registered!r} changed while it was "
                               "being read; register it again once it is complete")
            result = ingest.finish(digest.hexdigest())
        except BaseException:
            # only this pass's own generation goes; the bytes as received stay
            ingest.abort(delete_row=False, release_arrived=False)
            raise
        finally:
            if opened is not None:
                opened.close()
        row = result["dataset"]
        if result["duplicate"]:
            return {"status": row["status"], "duplicate": True, "dataset_id": row["id"]}
        ctx.finished = ingest.committed  # the commit transaction finished this job
        self.on_ingested(dataset_id, row["name"], row.get("project"))
        return ingest.job_result or {"status": row["status"], "dataset_id": row["id"]}

    def _release_conversions(self, dataset_id: str) -> None:
        """Conversions requested while the dataset was ingesting can run now (or fail
        with the reason, if the dataset was rejected)."""
        if self.catalog.release_jobs(dataset_id, "convert"):
            self.wake()

    # -- conversions --------------------------------------------------------------

    def convert(self, dataset_id: str, target: mrc.Target,
                ctx: JobContext) -> dict[str, Any]:
        dataset = self.catalog.get_dataset(dataset_id)
        if dataset is None:
            raise NotFound(f"dataset {dataset_id} was deleted")
        if dataset["status"] in ("receiving", "queued", "processing"):
            raise JobDeferred(dataset_id)  # its ingest re-submits it
        if dataset["status"] != "ready":
            raise Conflict(f"dataset {dataset_id} is {dataset['status']}, not ready; its "
                           "findings say why")
        key = conversion_key(dataset_id, target)
        store = self.storage.store
        size = store.size(key)
        written = 0
        if size is None:
            started = time.perf_counter()
            with self.readers.movie(dataset) as src:
                sink = store.open_writer(key, reserve_head=1024)
                report = mrc.convert(src, sink, target, progress=ctx.progress,
                                     known_stats=known_stats(dataset))
            size = written = report.file_bytes_out
            log.info("converted", extra={"dataset_id": dataset_id, "key": key,
                                         "seconds": round(time.perf_counter() - started, 3)})
        self.catalog.record_conversion(dataset_id, key, size)
        self.evict_conversions(keep=key)
        return {"bytes": size, "key": key, "bytes_written": written}

    def evict_conversions(self, keep: str | None = None) -> list[str]:
        """Delete least recently used conversions until the cache fits its limit
        (``keep``, the one about to be served, stays)."""
        removed = []
        for row in self.catalog.conversions_to_evict(self.settings.conversion_cache_bytes,
                                                     keep):
            self.storage.store.delete(row["key"])
            self.catalog.forget_conversion(row["dataset_id"], row["key"])
            removed.append(row["key"])
        return removed

    # -- verification -------------------------------------------------------------

    def verify(self, dataset_id: str, ctx: JobContext) -> dict[str, Any]:
        """Rebuild the bytes as received from what is stored and compare their SHA-256
        with the digest taken on receipt."""
        dataset = self.catalog.get_dataset(dataset_id)
        if dataset is None:
            raise NotFound(f"dataset {dataset_id} was deleted")
        if dataset["status"] not in ("ready", "rejected"):
            raise JobDeferred(dataset_id)
        received = self.readers.as_received(dataset)
        digest = hashlib.sha256()
        done = 0
        try:
            for block in received.read():
                digest.update(block)
                done += len(block)
                ctx.progress(done, received.size)
        finally:
            received.close()
        sha256 = digest.hexdigest()
        form = self.readers.form(dataset)
        return {"sha256": sha256, "expected": dataset["sha256"], "bytes": done,
                "match": sha256 == dataset["sha256"] and done == dataset["size_bytes"],
                "form": form.form}
