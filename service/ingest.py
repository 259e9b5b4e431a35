"""The service layer the routers call: accept uploads and registrations, look datasets up,
render previews, hand out downloads and conversions, delete. No HTTP here: routers parse
requests and shape responses; this module raises :mod:`service.errors` types.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
import uuid
from datetime import timedelta
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path, PurePath
from typing import Any, AsyncIterator

import numpy as np
from PIL import Image

from . import mrc
from .auth import Authenticator
from .catalog import JOB_STATES, Catalog, CursorError, DatasetQuery
from .config import Settings
from .errors import (BadRequest, Conflict, NotFound, ServiceError, TooLarge, from_core,
                     to_service_error)
from .jobs import JobFailed, JobQueue
from .metrics import Metrics
from .mrc.preview import binned, contrast_u8
from .mrc.writer import fsync_directory
from .particle_sets import ParticleSets
from .tus import Received, TusUploads
from .pipeline import (Pipeline, check_source_unchanged, source_fingerprint, target_from_dict,
                       target_to_dict)
from .sidecars import (SIDECAR_MAX_BYTES, beside, belongs_to, decode_text, name_prefix,
                       sidecar_kind)
from .storage import Storage, resolve_registration
from .uploads import UploadSink, check_filename

#: statuses a re-upload of the same bytes is answered from (no second copy is kept)
LIVE_STATUSES = ("queued", "processing", "ready")
MAX_PREVIEW_SIDE = 4096


def download_name(name: str, target: mrc.Target) -> str:
    """File name for a converted download: ``movie.mode1.mrc``, ``movie.mrcz``."""
    stem = PurePath(name).stem
    mode = "" if target.mode is None else f".mode{target.mode}"
    endian = ".be" if target.byte_order == ">" else ""
    return f"{stem}{mode}{endian}.{'mrcz' if target.is_mrcz else 'mrc'}"


def new_id() -> str:
    return uuid.uuid4().hex[:20]


class PreviewCache:
    """PNG bytes of recent previews (datasets never change, so entries never go stale;
    a deleted dataset's entries are dropped)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            png = self._items.get(key)
            if png is not None:
                self._items.move_to_end(key)
            return png

    def put(self, key: tuple, png: bytes) -> None:
        with self._lock:
            self._items[key] = png
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, dataset_id: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == dataset_id]:
                del self._items[key]


def encode_png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image, mode="L").save(out, format="PNG", compress_level=1)
    return out.getvalue()


class IngestService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.storage = Storage(settings.data_dir)
        self.catalog: Catalog | None = None
        self.queue: JobQueue | None = None
        self.pipeline: Pipeline | None = None
        self.particle_sets: ParticleSets | None = None
        self.tus: TusUploads | None = None
        self.previews = PreviewCache(settings.preview_cache_items)
        self.auth = Authenticator(settings.tokens)
        self.metrics = Metrics(self.snapshot)

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        self.storage.prepare()
        self.catalog = Catalog(self.settings.catalog_url)
        self.pipeline = pipeline = Pipeline(self.settings, self.catalog, self.storage)
        self.particle_sets = ParticleSets(self.settings, self.catalog, self.storage)
        self.tus = TusUploads(self.storage.root / "tus", self.catalog,
                              self.settings.max_upload_bytes,
                              timedelta(hours=self.settings.tus_expiry_hours),
                              commit=lambda received, name: self._commit_upload(
                                  received, name, None))
        self.tus.prepare()
        self.queue = JobQueue(self.catalog, self.settings.workers, pipeline,
                              on_finish=self.metrics.job_finished)
        pipeline.submit = self.queue.submit
        self.queue.start()

    def stop(self) -> None:
        if self.queue is not None:
            self.queue.shutdown(wait=False)
        if self.catalog is not None:
            self.catalog.close()

    def snapshot(self) -> dict[str, Any]:
        assert self.catalog is not None and self.queue is not None
        return {"datasets": self.catalog.count_datasets_by_status(),
                "jobs": self.catalog.count_jobs_by_state(),
                "queue_depth": self.queue.pending(),
                "free_bytes": self.storage.free_bytes()}

    # -- intake -----------------------------------------------------------------------

    async def accept_upload(self, filename: str | None, chunks: AsyncIterator[bytes],
                            expected_sha256: str | None, normalize: bool | None,
                            declared_size: int | None = None) -> dict[str, Any]:
        """Stream an upload in, then catalog it and queue its ingest job. The same bytes
        uploaded again return the existing dataset (``duplicate``: true). ``filename``
        None: ``chunks`` is a :class:`MultipartFile`, which names (and checks) it."""
        if filename is not None:
            filename = check_filename(filename)
            if sidecar_kind(filename):
                return await self._accept_sidecar(filename, chunks)
        if declared_size is not None and declared_size > self.settings.max_upload_bytes:
            self.metrics.uploads.labels("too_large").inc()
            raise TooLarge(f"Content-Length {declared_size} exceeds the limit of "
                           f"{self.settings.max_upload_bytes} bytes")
        sink = UploadSink(self.storage.incoming, self.settings.max_upload_bytes,
                          expected_sha256)
        try:
            await sink.receive(chunks)
        except ServiceError as exc:
            self.metrics.uploads.labels(exc.code).inc()
            raise
        name = filename if filename is not None else getattr(chunks, "filename")
        result = await asyncio.to_thread(self._commit_upload, sink, name, normalize)
        for extra_name, raw in getattr(chunks, "extras", {}).items():  # -F mdoc=@movie.mdoc
            sidecar = await asyncio.to_thread(self._store_sidecar, extra_name,
                                              self._sidecar_text(extra_name, raw),
                                              result["dataset"]["id"])
            result.setdefault("sidecars", []).append(sidecar["sidecar"])
        return result

    async def _accept_sidecar(self, filename: str,
                              chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """A SerialEM .mdoc or Direct Electron info.txt: small text, kept in the catalog,
        attached to its movie's dataset now or when the movie arrives."""
        parts, size = [], 0
        async for chunk in chunks:
            size += len(chunk)
            if size > SIDECAR_MAX_BYTES:
                raise TooLarge(f"{filename}: a sidecar may be at most {SIDECAR_MAX_BYTES} "
                               "bytes")
            parts.append(chunk)
        return await asyncio.to_thread(self._store_sidecar, filename,
                                       self._sidecar_text(filename, b"".join(parts)))

    @staticmethod
    def _sidecar_text(filename: str, raw: bytes) -> str:
        text = decode_text(raw)
        if "\x00" in text:
            raise BadRequest(f"{filename}: a sidecar is text; this body holds NUL bytes")
        return text

    def _store_sidecar(self, filename: str, text: str,
                       dataset_id: str | None = None) -> dict[str, Any]:
        """Keep a sidecar; attach it to ``dataset_id`` (sent together with its movie) or
        to the newest live dataset its name belongs to, if any."""
        catalog = self._catalog()
        kind = sidecar_kind(filename)
        if dataset_id is not None:
            movie = catalog.get_dataset(dataset_id)
        else:
            movie = next((d for d in catalog.datasets_named_like(name_prefix(filename))
                          if belongs_to(filename, d["name"])), None)
        catalog.add_sidecar(id=new_id(), name=filename, kind=kind, text=text,
                            dataset_id=movie["id"] if movie else None)
        if movie is not None:
            assert self.pipeline is not None
            movie = self.pipeline.refresh_acquisition(movie["id"])
        self.metrics.uploads.labels("sidecar").inc()
        return {"sidecar": {"name": filename, "kind": kind,
                            "dataset_id": movie["id"] if movie else None},
                "dataset": movie}

    def _attach_pending_sidecars(self, dataset_id: str, name: str) -> None:
        catalog = self._catalog()
        for row in catalog.pending_sidecars():
            if belongs_to(row["name"], name):
                catalog.attach_sidecar(row["id"], dataset_id)

    def _commit_upload(self, sink: UploadSink | Received, filename: str,
                       normalize: bool | None) -> dict[str, Any]:
        catalog = self._catalog()
        existing = catalog.find_by_sha256(sink.sha256, LIVE_STATUSES)
        if existing is not None:
            sink.discard()
            self.metrics.uploads.labels("duplicate").inc()
            jobs = catalog.jobs_in_states(("queued", "running"), existing["id"])
            return {"dataset": existing, "job": jobs[0] if jobs else None, "duplicate": True}
        dataset_id = new_id()
        folder = self.storage.dataset_dir(dataset_id)
        folder.mkdir(parents=True)
        final = folder / filename
        os.replace(sink.path, final)
        fsync_directory(folder)
        info: dict[str, Any] = {"header_findings": [f.to_dict() for f in sink.header_findings]}
        if normalize is not None:
            info["normalize"] = normalize
        dataset = catalog.add_dataset(id=dataset_id, name=filename, source="upload",
                                      status="queued", size_bytes=sink.received,
                                      sha256=sink.sha256, path=str(final), info=info)
        self._attach_pending_sidecars(dataset_id, filename)
        job = self._queue_job("ingest", dataset_id)
        self.metrics.uploads.labels("accepted").inc()
        self.metrics.upload_bytes.inc(sink.received)
        return {"dataset": dataset, "job": job, "duplicate": False}

    def register(self, path: str, normalize: bool | None) -> dict[str, Any]:
        real = resolve_registration(path, self.settings.allowed_roots,
                                    self.settings.allow_hard_links)
        current = source_fingerprint(real)
        for existing in self._catalog().find_registration(str(real), LIVE_STATUSES):
            # The same file, unchanged since (or still queued): that dataset, not a twin.
            if existing["info"].get("source_fingerprint", current) == current:
                jobs = self._catalog().jobs_in_states(("queued", "running"), existing["id"])
                return {"dataset": existing, "job": jobs[0] if jobs else None,
                        "duplicate": True}
        info: dict[str, Any] = {"registered_path": path}
        if normalize is not None:
            info["normalize"] = normalize
        dataset_id = new_id()
        dataset = self._catalog().add_dataset(
            id=dataset_id, name=real.name, source="registration", status="queued",
            size_bytes=real.stat().st_size, path=str(real), info=info)
        self._attach_pending_sidecars(dataset_id, real.name)
        for name, text in beside(real):
            self._catalog().add_sidecar(id=new_id(), name=name, kind=sidecar_kind(name),
                                        text=text, dataset_id=dataset_id)
        return {"dataset": dataset, "job": self._queue_job("ingest", dataset_id),
                "duplicate": False}

    def _queue_job(self, kind: str, dataset_id: str,
                   target: mrc.Target | None = None) -> dict[str, Any]:
        return self._submit_job(kind, dataset_id, target)[0]

    def _submit_job(self, kind: str, dataset_id: str,
                    target: mrc.Target | None = None) -> tuple[dict[str, Any], Future]:
        job = self._catalog().add_job(id=new_id(), kind=kind, dataset_id=dataset_id,
                                      target=target_to_dict(target) if target else None)
        assert self.queue is not None and job is not None
        return job, self.queue.submit(job["id"])

    # -- lookup -----------------------------------------------------------------------

    def list_datasets(self, query: DatasetQuery) -> tuple[list[dict[str, Any]], str | None]:
        try:
            return self._catalog().list_datasets(query)
        except CursorError as exc:
            raise BadRequest(str(exc)) from None

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        row = self._catalog().get_dataset(dataset_id)
        if row is None:
            raise NotFound(f"no dataset {dataset_id!r}")
        return row

    def ready_dataset(self, dataset_id: str) -> dict[str, Any]:
        row = self.dataset(dataset_id)
        if row["status"] != "ready":
            raise Conflict(f"dataset {dataset_id} is {row['status']}, not ready"
                           + ("; its findings say why" if row["status"] == "rejected" else ""))
        return row

    def frame_stats(self, dataset_id: str) -> dict[str, Any]:
        """Per-frame mean, standard deviation, minimum and maximum, taken at ingest."""
        exists, series = self._catalog().frame_stats(dataset_id)
        if not exists:
            raise NotFound(f"no dataset {dataset_id!r}")
        if series is None:
            raise Conflict(f"dataset {dataset_id} has no per-frame statistics (yet): they are "
                           "taken while it is ingested")
        return {"dataset_id": dataset_id, "frames": len(series["mean"]), **series}

    def job(self, job_id: str) -> dict[str, Any]:
        row = self._catalog().get_job(job_id)
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return row

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        return self._catalog().list_jobs(state, limit)

    def jobs_of(self, dataset_id: str) -> list[dict[str, Any]]:
        return self._catalog().jobs_in_states(JOB_STATES, dataset_id=dataset_id)

    def delete(self, dataset_id: str) -> None:
        """Cancel its jobs, drop it from the catalog, then remove its files (a registered
        file on shared storage is never touched)."""
        self.dataset(dataset_id)
        assert self.queue is not None
        self.queue.cancel_dataset(dataset_id)
        self._catalog().delete_dataset(dataset_id)
        self.storage.remove_dataset(dataset_id)
        self.previews.drop(dataset_id)

    # -- previews ---------------------------------------------------------------------

    def frame_png(self, dataset_id: str, k: int, size: int, clip: float) -> bytes:
        started = time.perf_counter()
        dataset = self.ready_dataset(dataset_id)
        key = (dataset_id, "frame", k, size, clip)
        png = self.previews.get(key)
        cached = png is not None
        if png is None:
            path = check_source_unchanged(dataset)
            try:
                with mrc.MrcFile(path) as src:
                    frame = src.read_frame(k)
            except mrc.MrcError as exc:
                raise from_core(exc) from None
            png = encode_png(contrast_u8(binned(frame, size), clip, 100 - clip))
            self.previews.put(key, png)
        self._observe_preview("frame", cached, started)
        return png

    def sum_png(self, dataset_id: str, size: int, clip: float) -> bytes:
        started = time.perf_counter()
        self.ready_dataset(dataset_id)
        key = (dataset_id, "sum", size, clip)
        png = self.previews.get(key)
        cached = png is not None
        if png is None:
            total = np.load(self.storage.sum_path(dataset_id), allow_pickle=False)
            png = encode_png(contrast_u8(binned(total, size), clip, 100 - clip))
            self.previews.put(key, png)
        self._observe_preview("sum", cached, started)
        return png

    def _observe_preview(self, kind: str, cached: bool, started: float) -> None:
        self.metrics.preview_seconds.labels(kind, str(cached).lower()).observe(
            time.perf_counter() - started)

    # -- downloads and conversions ----------------------------------------------------

    def original_file(self, dataset_id: str) -> tuple[Path, str]:
        dataset = self.dataset(dataset_id)
        if dataset["status"] not in ("ready", "rejected"):
            raise Conflict(f"dataset {dataset_id} is {dataset['status']}; try again when it "
                           "is ready")
        return check_source_unchanged(dataset), dataset["name"]

    def stored_conversion(self, dataset: dict[str, Any],
                          target: mrc.Target) -> Path | None:
        """A file that already is ``target``: the archive copy, or a cached conversion."""
        info = dataset["info"]
        archive = info.get("archive")
        if archive is not None and target.byte_order == "<" \
                and (archive["codec"] or "none") == target.codec.cname \
                and (not target.is_mrcz or archive["clevel"] == target.clevel) \
                and (target.mode if target.mode is not None else info["default_mode"]) \
                == archive["mode"]:
            return self.storage.archive_path(dataset["id"], target.is_mrcz)
        cached = self.storage.conversion_path(dataset["id"], target)
        if cached.exists():
            os.utime(cached)  # least-recently-used order for eviction
            return cached
        return None

    def request_conversion(self, dataset_id: str, target: mrc.Target) -> dict[str, Any]:
        """Queue a conversion job (it waits for the dataset's ingest if that is running)."""
        dataset = self.dataset(dataset_id)
        if dataset["status"] in ("rejected", "failed"):
            raise Conflict(f"dataset {dataset_id} is {dataset['status']}; nothing to convert")
        return self._queue_job("convert", dataset_id, target)

    async def converted_file(self, dataset_id: str, target: mrc.Target) -> Path:
        """The file for ``target``, converting now (on the pool) if not stored yet."""
        dataset = await asyncio.to_thread(self.ready_dataset, dataset_id)
        path = self.stored_conversion(dataset, target)
        if path is not None:
            return path
        _job, future = await asyncio.to_thread(self._submit_job, "convert", dataset_id,
                                               target)
        try:
            await asyncio.wrap_future(future)
        except JobFailed as exc:
            mapped = to_service_error(exc.__cause__) if exc.__cause__ else None
            if mapped is None:
                raise
            raise mapped from None
        path = self.stored_conversion(dataset, target)
        if path is None:  # evicted between conversion and now: cache far too small
            raise Conflict("the conversion was evicted before it could be served; raise "
                           "MRC_INGEST_CONVERSION_CACHE_BYTES")
        return path

    def job_result_file(self, job_id: str) -> tuple[Path, str]:
        """The converted file of a finished conversion job, and its download name."""
        job = self.job(job_id)
        if job["kind"] != "convert":
            raise BadRequest(f"job {job_id} is an {job['kind']} job; it has no file to "
                             "download (see its dataset)")
        if job["state"] != "done":
            raise Conflict({"message": f"job {job_id} is {job['state']}",
                            "error": job["error"]})
        dataset = self.dataset(job["dataset_id"])
        target = target_from_dict(job["target"])
        path = self.stored_conversion(dataset, target)
        if path is None:
            raise Conflict(f"the result of job {job_id} was evicted from the conversion "
                           "cache; request the conversion again")
        return path, download_name(dataset["name"], target)

    def _catalog(self) -> Catalog:
        assert self.catalog is not None, "IngestService.start() first"
        return self.catalog
