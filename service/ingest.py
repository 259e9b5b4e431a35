"""The service the routers call, assembled: intake (uploads, registrations, sidecars,
resumable uploads), queries, previews, downloads, particle sets, and the job queue that
runs ingest and conversion jobs. Each part lives in its own module with one reason to
change; this one only wires them and owns their lifetime. Nothing happens at import.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from .auth import Authenticator
from .catalog import Catalog
from .config import Settings
from .datastore import StoreUnavailable, open_store
from .downloads import Downloads
from .errors import first_line
from .priority import WorkThreads
from .arrival import PassDeps
from .arrival.recovery import Recovery, run_tick
from .intake import Intake, new_id
from .jobs import JobQueue
from .metadata import Acquisition
from .metrics import Metrics
from .particle_sets import ParticleSets
from .pipeline import Pipeline
from .previews import Previews
from .queries import Queries
from .readers import Readers
from .roots import Roots
from .storage import Storage
from .tus import TusUploads

log = logging.getLogger("mrc_ingest.maintenance")
#: how often each replica with workers sweeps (expired tus uploads, crash leftovers)
MAINTENANCE_SECONDS = 600.0
#: an S3 multipart upload with no live writer is abandoned after this (the longest an
#: upload may pause and still finish: a 64 GiB movie over a slow link)
ABANDONED_AFTER_SECONDS = 6 * 3600.0


class IngestService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.storage = Storage(settings.data_dir, open_store(
            settings.storage_url, settings.data_dir.resolve(), settings.s3_endpoint_url,
            settings.s3_part_bytes))
        self.auth = Authenticator(settings.tokens)
        #: the only way anything on shared storage is opened (service/roots.py)
        self.roots = Roots(settings.allowed_roots, settings.allow_hard_links)
        self.metrics = Metrics(self.snapshot)
        self.catalog: Catalog | None = None
        self.queue: JobQueue | None = None
        #: the lowered-priority threads of the uploads' stream work (service/priority.py)
        self._work: WorkThreads | None = None
        self._stopping = threading.Event()
        self._single: EmbeddedLock | None = None

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        settings, storage = self.settings, self.storage
        if settings.catalog_url.startswith("sqlite"):
            # One process per embedded catalog: a second one would take the first's
            # leases and drop its uploads in flight. Refused here, with the reason.
            self._single = EmbeddedLock.take(settings.catalog_url)
        storage.prepare()
        self.catalog = catalog = Catalog(
            settings.catalog_url, migrate=settings.migrate_on_start,
            session_refresh_seconds=settings.session_refresh_seconds)
        self.readers = Readers(storage.store, storage.root, self.roots)
        self.acquisition = Acquisition(catalog, self.readers)
        self._work = WorkThreads(settings.work_nice)
        deps = PassDeps(settings=settings, catalog=catalog, store=storage.store,
                        finalize=self.acquisition.finalize, commit_lock=threading.Lock(),
                        work=self._work)
        self.pipeline = Pipeline(settings, catalog, storage, self.readers, deps)
        self.queue = queue = JobQueue(catalog, settings.workers, self.pipeline,
                                      lease_seconds=settings.job_lease_seconds,
                                      nice=settings.work_nice,
                                      on_finish=self.metrics.job_finished)
        self.queries = Queries(catalog)
        self.intake = Intake(settings, catalog, storage, self.metrics, queue,
                             self.acquisition, deps, self.submit_job, self.roots)
        self.previews = Previews(self.queries, self.readers, self.metrics,
                                 settings.preview_cache_items)
        self.downloads = Downloads(catalog, storage, self.readers, self.queries, queue,
                                   self.submit_job)
        self.particle_sets = ParticleSets(settings, catalog, storage, self.roots)
        self.tus = TusUploads(storage, catalog, settings.max_upload_bytes,
                              timedelta(hours=settings.tus_expiry_hours), deps,
                              self.intake, self.metrics)
        self.pipeline.wake = queue.wake
        self.pipeline.tus_blocks = self.tus.blocks_of
        self.pipeline.tus_arrived = self.tus.arrived_of
        self.pipeline.on_ingested = self.intake.attach_pending_sidecars
        self.recovery = Recovery(catalog, storage, self.tus)
        if catalog.dialect == "sqlite":
            # Embedded: no other process shares this catalog (EmbeddedLock), so a lease
            # still held is this process's own from before a restart; its jobs may run
            # again at once.
            catalog.expire_leases()
        queue.start()
        if settings.workers:
            for target, name in ((self._recover, "mrc-recovery"),
                                 (self._maintain, "mrc-maintenance")):
                threading.Thread(target=target, daemon=True, name=name).start()

    def _recover(self) -> None:
        """At start and every few seconds, on every replica that runs workers: the
        recovery steps of the commit protocol (service/arrival/recovery.py)."""
        while True:
            run_tick(self.recovery)
            if self._stopping.wait(self.settings.recovery_seconds):
                return

    def _maintain(self) -> None:
        """Every few minutes, on every replica that runs workers (each step is
        idempotent, so several replicas doing it at once is fine): remove what crashed
        writers left, and objects no row names; recompute session figures a lost
        coalesced recompute left stale (at start too)."""
        assert self.catalog is not None
        while True:
            try:
                self.catalog.refresh_stale_sessions()
            except Exception as exc:  # noqa: BLE001 - next round
                log.warning("stale session figures not refreshed: %s", first_line(exc))
            if self._stopping.wait(MAINTENANCE_SECONDS):
                return
            try:
                removed = self.storage.sweep(self.may_be_writing, ABANDONED_AFTER_SECONDS)
                removed += self.recovery.sweep()
                if removed:
                    log.info("swept %d abandoned temporaries, uploads or objects", removed)
            except Exception as exc:  # noqa: BLE001 - next round; the store may be away
                log.warning("maintenance sweep failed: %s", first_line(exc))

    def may_be_writing(self, dataset_id: str) -> bool:
        """Whether the dataset's objects may be being written: a job of it holds a live
        lease, or a resumable upload of it is still open (its streaming pass keeps the
        archive's multipart upload while the client pauses, up to the tus expiry)."""
        assert self.catalog is not None
        if self.catalog.has_live_lease(dataset_id):
            return True
        upload = self.catalog.tus_upload_of(dataset_id)
        return upload is not None and upload["completed_at"] is None

    def stop(self) -> None:
        self._stopping.set()
        if self.queue is not None:
            self.queue.shutdown(wait=False)
        if self._work is not None:
            self._work.shutdown()
        if self.catalog is not None:
            self.catalog.session_figures.flush()  # the coalesced recomputes still due
            self.catalog.close()
        if self._single is not None:
            self._single.release()
            self._single = None

    def snapshot(self) -> dict[str, Any]:
        assert self.catalog is not None and self.queue is not None
        return {"datasets": self.catalog.count_datasets_by_status(),
                "jobs": self.catalog.count_jobs_by_state(),
                "queue_depth": self.queue.pending(),
                "free_bytes": self.storage.free_bytes(),
                "storage": self.catalog.storage_totals()}

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether this replica can serve (catalog and datastore reachable), and the
        facts /healthz reports."""
        from . import __version__

        catalog = storage = "ok"
        depth = None
        try:
            assert self.catalog is not None and self.queue is not None
            self.catalog.ping()
            depth = self.queue.pending()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            catalog = f"unreachable: {type(exc).__name__}"
        try:
            self.storage.store.ping()
        except Exception as exc:  # noqa: BLE001
            storage = f"unreachable: {exc}"
        ok = catalog == storage == "ok"
        body = {"status": "ok" if ok else "unavailable", "version": __version__,
                "replica": self.queue.owner if self.queue else "", "catalog": catalog,
                "storage": storage, "workers": self.settings.workers, "queue_depth": depth,
                "data_free_bytes": self.storage.free_bytes()}
        return ok, body

    # -- shared by several parts ------------------------------------------------------

    def submit_job(self, kind: str, dataset_id: str, target: dict[str, Any] | None = None,
                   dedup_key: str | None = None) -> dict[str, Any]:
        """Queue a job (or, with ``dedup_key``, find the same one already queued or
        running) and wake the workers; its row."""
        assert self.catalog is not None and self.queue is not None
        job = self.catalog.add_job(id=new_id(), kind=kind, dataset_id=dataset_id,
                                   target=target, dedup_key=dedup_key)
        assert job is not None
        return self.queue.submit(job)

    def delete(self, dataset_id: str) -> None:
        """The dataset becomes a tombstone (hidden from every answer at once), its jobs
        are cancelled and an unfinished upload of it terminated; then its objects go,
        then its row. Answers promptly: a job still running stops at its next lease
        renewal, and recovery finishes the deletion (also when the store is away). A
        registered file on shared storage is never touched."""
        assert self.catalog is not None and self.queue is not None
        self.queries.dataset(dataset_id)
        self.catalog.mark_deleting(dataset_id)
        self.queue.cancel_dataset(dataset_id, timeout=2.0)
        self.tus.terminate_for_dataset(dataset_id)
        self.previews.cache.drop(dataset_id)
        self.readers.forget(dataset_id)
        if self.catalog.has_live_lease(dataset_id):
            return
        try:
            self.recovery.delete_now(dataset_id)
        except StoreUnavailable:
            log.warning("dataset %s: deletion finishes once the store is back", dataset_id)


    def delete_session(self, session_id: str) -> int:
        """A session with its datasets: each becomes a tombstone at once (as for
        :meth:`delete`), the session row goes, and the datasets' objects and rows are
        removed right after, on a thread (recovery finishes what that leaves). Returns
        how many datasets were deleted."""
        assert self.catalog is not None
        self.queries.session(session_id)
        dataset_ids = self.catalog.delete_session(session_id)
        threading.Thread(target=self._stop_and_remove, args=(dataset_ids,),
                         name="session-delete", daemon=True).start()
        return len(dataset_ids)

    def _stop_and_remove(self, dataset_ids: list[str]) -> None:
        """After a session's deletion: its jobs stopped, its uploads terminated, its
        datasets' objects and rows removed (what fails here, recovery finishes)."""
        assert self.queue is not None
        try:
            for dataset_id in dataset_ids:
                self.queue.cancel_dataset(dataset_id, timeout=0)
                self.tus.terminate_for_dataset(dataset_id)
                self.previews.cache.drop(dataset_id)
                self.readers.forget(dataset_id)
            self.recovery.finish_deletions()
        except Exception:  # noqa: BLE001 - the recovery thread finishes them later
            log.warning("session deletion left for recovery", exc_info=True)


class EmbeddedLock:
    """An exclusive ``flock`` on ``<catalog>.lock`` beside the SQLite catalog, held for
    the life of the process: a second process on the same data folder (a second
    ``serve``, a ``worker``) is refused at start with a one-line reason."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def take(cls, catalog_url: str) -> "EmbeddedLock | None":
        import fcntl
        import sqlalchemy as sa

        database = sa.engine.make_url(catalog_url).database
        if not database or database == ":memory:":
            return None
        path = Path(database).resolve().with_name(Path(database).name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CatalogInUse(f"another mrc-ingest process (pid {holder}) uses the "
                               f"embedded catalog {database}; the SQLite catalog serves one "
                               "process: stop it, or run several over PostgreSQL") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CatalogInUse(RuntimeError):
    """A second process on one embedded catalog."""
