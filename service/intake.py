"""Intake: movies arriving (raw PUT, multipart POST), files registered on shared storage,
and sidecars. Uploads are ingested while they stream (:mod:`service.arrival`): the
response comes once the dataset is committed, and its bytes released, by the commit
protocol (ARCHITECTURE.md). Registrations are read once, by a job.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, AsyncIterator, Callable

import anyio

from .catalog import Catalog
from .config import Settings
from .errors import BadRequest, Conflict, NotMrc, ServiceError, TooLarge
from .arrival import IngestPass, PassBytes, PassDeps
from .arrival.ingest_pass import LIVE_STATUSES
from .catalog import Fence
from .jobs import JobQueue
from .metadata import Acquisition
from .metrics import Metrics
from .mrc.stream import HeaderOverLimit
from .mrc.validate import FrameLimits, check_frame_limits, check_header_bytes
from .receiver import Receiver, pump
from .auth import Scope
from .roots import Roots
from .sessions import Placement, place, project_for
from .sidecars import (SIDECAR_MAX_BYTES, belongs_to, decode_text, name_prefix, sidecar_kind,
                       sidecar_names)
from .storage import Storage
from .uploads import check_filename

log = logging.getLogger("mrc_ingest.intake")
job_log = logging.getLogger("mrc_ingest.jobs")


def new_id() -> str:
    return uuid.uuid4().hex[:20]


def refuse_non_mrc(first: bytes, limits: FrameLimits | None = None) -> None:
    """The door check on the first 1024 bytes, before anything is written: an MRC/MRCZ
    header (else 415), declaring no more frames than ``limits`` allow (else 422)."""
    layout, findings = check_header_bytes(first)
    if layout is None:
        raise NotMrc({"message": "the body does not start with an MRC/MRCZ header; "
                                 "nothing was stored",
                      "findings": [f.to_dict() for f in findings]})
    over = check_frame_limits(layout, limits)
    if over:
        raise HeaderOverLimit(over)


class Intake:
    def __init__(self, settings: Settings, catalog: Catalog, storage: Storage,
                 metrics: Metrics, queue: JobQueue, acquisition: Acquisition,
                 deps: PassDeps, submit_job: Callable[..., dict[str, Any]], roots: Roots):
        self.settings, self.catalog, self.storage, self.roots = settings, catalog, storage, roots
        self.metrics, self.queue, self.acquisition, self.deps = (metrics, queue,
                                                                 acquisition, deps)
        #: queue a job and wake the workers (:meth:`IngestService.submit_job`)
        self.submit_job = submit_job

    # -- uploads ------------------------------------------------------------------

    async def accept_upload(self, filename: str | None, chunks: AsyncIterator[bytes],
                            expected_sha256: str | None, normalize: bool | None,
                            declared_size: int | None = None,
                            placement: Placement = Placement(),
                            scope: Scope = Scope.ALL) -> dict[str, Any]:
        """Receive a movie and ingest it while it streams; the dataset is ready (or
        rejected, with findings) when this returns. The same bytes uploaded again
        return the existing dataset (``duplicate``: true). ``filename`` None: ``chunks``
        is a :class:`~service.uploads.MultipartFile`, which names (and checks) it.
        ``placement``: its session and project, reachable by ``scope`` (else 404)."""
        if filename is not None:
            filename = check_filename(filename)
            if sidecar_kind(filename):
                return await self._accept_sidecar(filename, chunks,
                                                  project_for(placement, scope))
        if declared_size is not None and declared_size > self.settings.max_upload_bytes:
            self.metrics.uploads.labels("too_large").inc()
            raise TooLarge(f"Content-Length {declared_size} exceeds the limit of "
                           f"{self.settings.max_upload_bytes} bytes")
        columns = await asyncio.to_thread(place, self.catalog, placement, scope, "upload")
        try:
            result = await self._stream(filename, chunks, expected_sha256, normalize,
                                        declared_size, columns)
        except ServiceError as exc:
            self.metrics.uploads.labels(exc.code).inc()
            raise
        for extra_name, raw in getattr(chunks, "extras", {}).items():  # -F mdoc=@movie.mdoc
            sidecar = await asyncio.to_thread(self.store_sidecar, extra_name,
                                              sidecar_text(extra_name, raw),
                                              columns["project"], result["dataset"]["id"])
            result.setdefault("sidecars", []).append(sidecar["sidecar"])
        return result

    async def _stream(self, filename: str | None, chunks: AsyncIterator[bytes],
                      expected_sha256: str | None, normalize: bool | None,
                      declared_size: int | None,
                      columns: dict[str, str]) -> dict[str, Any]:
        ingest: IngestPass | None = None
        dataset_id = new_id()
        # The upload's job, claimed by this process from the header's arrival until the
        # commit (attempt 0); a worker that takes its lapsed lease over claims attempt 1.
        fence = Fence(new_id(), self.queue.owner, 0)
        job_id = fence.job_id

        def consume(batch: list[bytes]) -> None:
            nonlocal ingest
            if ingest is None:
                name = filename if filename is not None else getattr(chunks, "filename")
                ingest = IngestPass(
                    self.deps, dataset_id=dataset_id, name=name, source="upload",
                    normalize=normalize, declared_size=declared_size, create_row=True,
                    arrived=PassBytes(), fence=fence,  # lapsed: drop_upload
                    placement=columns)
                ingest.on_row = lambda: self._start_upload_job(fence, dataset_id)
            receiver.write_beside(batch, ingest.feed)

        # counts bytes against the limit on the loop; hashes them beside the pass, which
        # keeps them (no scratch copy: the pass's own objects hold every byte)
        receiver = Receiver(None, 0, self.settings.max_upload_bytes)
        try:
            await pump(chunks, receiver, self.deps.work.wrap(consume),
                       lambda first: refuse_non_mrc(first, self.settings.frame_limits))
            if ingest is None:  # under 1024 bytes: the header check refused it already
                raise NotMrc({"message": "empty body", "findings": []})
            sha256 = receiver.digest(expected_sha256)
            result = await anyio.to_thread.run_sync(ingest.finish, sha256)
        except BaseException:
            receiver.close()
            if ingest is not None:
                await anyio.to_thread.run_sync(ingest.abort)
            self.queue.release(fence)
            raise
        self.queue.release(fence)
        receiver.close()
        # the catalog may be slow (a busy SQLite, a PostgreSQL failing over): never on
        # the event loop, which answers every other request meanwhile
        return await anyio.to_thread.run_sync(self._answer, result, job_id, dataset_id,
                                              ingest.received)

    def _answer(self, result: dict[str, Any], job_id: str, dataset_id: str,
                received: int) -> dict[str, Any]:
        """What an upload answers once its pass ended (on a worker thread)."""
        if result["duplicate"]:
            self.metrics.uploads.labels("duplicate").inc()
            jobs = self.catalog.jobs_in_states(("queued", "running"), result["dataset"]["id"])
            return {**result, "job": jobs[0] if jobs else None}
        # The dataset is committed with its job finished, in one transaction: what
        # follows is bookkeeping, and a failure of it loses nothing.
        job = self.catalog.get_job(job_id)
        seconds = result["dataset"]["info"]["timings"]["total_s"]
        job_log.info("job done", extra={"job_id": job_id, "dataset_id": dataset_id,
                                        "kind": "upload", "seconds": seconds})
        self.attach_pending_sidecars(dataset_id, result["dataset"]["name"],
                                     result["dataset"].get("project"))
        self.metrics.uploads.labels("accepted").inc()
        self.metrics.upload_bytes.inc(received)
        if job is not None:
            self.metrics.job_finished(job, "done", seconds, job["result"])
        return {"dataset": self.catalog.get_dataset(dataset_id) or result["dataset"],
                "job": job, "duplicate": False}

    def _start_upload_job(self, fence: Fence, dataset_id: str) -> None:
        """The upload's job: running, leased by this process, from the header's arrival
        until the dataset is committed. If this process dies, the lease lapses and any
        worker cleans up what the cut-off upload left (:meth:`Pipeline.drop_upload`)."""
        catalog = self.catalog
        catalog.add_job(id=fence.job_id, kind="upload", dataset_id=dataset_id,
                        state="running", started_at=catalog.now(), attempts=fence.attempt,
                        lease_owner=fence.owner,
                        lease_expires_at=catalog.now(self.queue.lease_seconds))
        self.queue.hold(fence)
        job_log.info("job running", extra={"job_id": fence.job_id, "dataset_id": dataset_id,
                                           "kind": "upload"})

    # -- sidecars -----------------------------------------------------------------

    async def _accept_sidecar(self, filename: str, chunks: AsyncIterator[bytes],
                              project: str) -> dict[str, Any]:
        """A SerialEM .mdoc or Direct Electron info.txt: small text, kept in the catalog,
        attached to its movie's dataset now or when the movie arrives."""
        parts, size = [], 0
        async for chunk in chunks:
            size += len(chunk)
            if size > SIDECAR_MAX_BYTES:
                raise TooLarge(f"{filename}: a sidecar may be at most {SIDECAR_MAX_BYTES} "
                               "bytes")
            parts.append(chunk)
        return await asyncio.to_thread(self.store_sidecar, filename,
                                       sidecar_text(filename, b"".join(parts)), project)

    def store_sidecar(self, filename: str, text: str, project: str,
                      dataset_id: str | None = None) -> dict[str, Any]:
        """Keep a sidecar; attach it to ``dataset_id`` (sent together with its movie) or
        to the newest live dataset of ``project`` its name belongs to, if any (else it
        waits there for its movie)."""
        kind = sidecar_kind(filename)
        if dataset_id is not None:
            movie = self.catalog.get_dataset(dataset_id)
        else:
            movie = next((d for d in self.catalog.datasets_named_like(name_prefix(filename),
                                                                      project)
                          if belongs_to(filename, d["name"])), None)
        self.catalog.add_sidecar(id=new_id(), name=filename, kind=kind, text=text,
                                 dataset_id=movie["id"] if movie else None, project=project)
        if movie is not None:
            movie = self.acquisition.refresh(movie["id"])
        self.metrics.uploads.labels("sidecar").inc()
        return {"sidecar": {"name": filename, "kind": kind,
                            "dataset_id": movie["id"] if movie else None},
                "dataset": movie}

    def attach_pending_sidecars(self, dataset_id: str, name: str,
                                project: str | None) -> None:
        attached = False
        for row in self.catalog.pending_sidecars(project):
            if belongs_to(row["name"], name):
                self.catalog.attach_sidecar(row["id"], dataset_id)
                attached = True
        if attached:
            self.acquisition.refresh(dataset_id)

    # -- registrations ------------------------------------------------------------

    def register(self, path: str, normalize: bool | None,
                 placement: Placement = Placement(),
                 scope: Scope = Scope.ALL) -> dict[str, Any]:
        """A file on shared storage, opened inside the roots (:mod:`service.roots`); its
        identity is recorded and checked at every later open, and its sidecars are read
        the same way (one refused is a finding on the dataset, never its content). Its
        session is the one named, else the folder under its root."""
        with self.roots.open_registration(path) as opened:
            real, current = opened.path, opened.identity
        columns = place(self.catalog, placement.with_default_session(
            self.roots.session_folder(real)), scope, "registration")
        for existing in self.catalog.find_registration(str(real), LIVE_STATUSES):
            if not scope.sees(existing.get("project")):
                continue  # another project's: this one gets a dataset of its own
            # The same file, unchanged since (or still queued): that dataset, not a twin.
            if not current.changes_from(existing["info"].get("source_fingerprint") or {}):
                jobs = self.catalog.jobs_in_states(("queued", "running"), existing["id"])
                return {"dataset": existing, "job": jobs[0] if jobs else None,
                        "duplicate": True}
        sidecars, refused = self.roots.read_beside(real, sidecar_names(real.name),
                                                   SIDECAR_MAX_BYTES)
        info: dict[str, Any] = {"registered_path": path,
                                "source_fingerprint": current.to_dict()}
        if refused:
            info["refused_sidecars"] = [f.to_dict() for f in refused]
        if normalize is not None:
            info["normalize"] = normalize
        dataset_id = new_id()
        dataset = self.catalog.add_dataset(
            id=dataset_id, name=real.name, source="registration", status="queued",
            size_bytes=current.size, path=str(real), info=info, **columns)
        if dataset is None:
            raise Conflict("the session this file was placed in was deleted meanwhile; "
                           "nothing was registered")
        for name, raw in sidecars:
            self.catalog.add_sidecar(id=new_id(), name=name, kind=sidecar_kind(name),
                                     text=decode_text(raw), dataset_id=dataset_id,
                                     project=columns["project"])
        self.attach_pending_sidecars(dataset_id, real.name, columns["project"])
        return {"dataset": dataset, "job": self.submit_job("ingest", dataset_id),
                "duplicate": False}


def sidecar_text(filename: str, raw: bytes) -> str:
    text = decode_text(raw)
    if "\x00" in text:
        raise BadRequest(f"{filename}: a sidecar is text; this body holds NUL bytes")
    return text
