"""The service the routers call, assembled: intake (uploads, registrations, sidecars,
resumable uploads), queries, previews, downloads, particle sets, and the job queue that
runs ingest and conversion jobs. Each part lives in its own module with one reason to
change; this one only wires them and owns their lifetime. Nothing happens at import.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from .auth import Authenticator
from .catalog import Catalog
from .config import Settings
from .downloads import Downloads
from .ingest_pass import PassDeps
from .intake import Intake, new_id
from .jobs import JobQueue
from .metadata import Acquisition
from .metrics import Metrics
from .particle_sets import ParticleSets
from .pipeline import Pipeline
from .previews import Previews
from .queries import Queries
from .readers import Readers
from .storage import Storage
from .tus import TusUploads


class IngestService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.storage = Storage(settings.data_dir)
        self.auth = Authenticator(settings.tokens)
        self.metrics = Metrics(self.snapshot)
        self.catalog: Catalog | None = None
        self.queue: JobQueue | None = None

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        settings, storage = self.settings, self.storage
        storage.prepare()
        self.catalog = catalog = Catalog(settings.catalog_url)
        self.readers = Readers(storage.store, storage.root)
        self.acquisition = Acquisition(catalog, self.readers)
        deps = PassDeps(settings=settings, catalog=catalog, store=storage.store,
                        finalize=self.acquisition.finalize, commit_lock=threading.Lock())
        self.pipeline = Pipeline(settings, catalog, storage, self.readers, deps)
        self.queue = queue = JobQueue(catalog, settings.workers, self.pipeline,
                                      on_finish=self.metrics.job_finished)
        self.queries = Queries(catalog)
        self.intake = Intake(settings, catalog, storage, self.metrics, queue,
                             self.acquisition, deps)
        self.previews = Previews(self.queries, self.readers, self.metrics,
                                 settings.preview_cache_items)
        self.downloads = Downloads(catalog, storage, self.readers, self.queries, queue,
                                   self.submit_job)
        self.particle_sets = ParticleSets(settings, catalog, storage)
        self.tus = TusUploads(storage, catalog, settings.max_upload_bytes,
                              timedelta(hours=settings.tus_expiry_hours), deps,
                              self.intake, self.metrics)
        self.pipeline.submit = queue.submit
        self.pipeline.tus_file = self.tus.file_of
        self.pipeline.on_ingested = self.intake.attach_pending_sidecars
        self.intake.recover()
        self.tus.prepare()
        queue.start()

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
                "free_bytes": self.storage.free_bytes(),
                "storage": self.catalog.storage_totals()}

    # -- shared by several parts ------------------------------------------------------

    def submit_job(self, kind: str, dataset_id: str,
                   target: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
        """Record a job and hand it to the pool: (its row, a future of its result)."""
        assert self.catalog is not None and self.queue is not None
        job = self.catalog.add_job(id=new_id(), kind=kind, dataset_id=dataset_id,
                                   target=target)
        assert job is not None
        return job, self.queue.submit(job["id"])

    def delete(self, dataset_id: str) -> None:
        """Cancel its jobs, drop it from the catalog, then remove its objects (a
        registered file on shared storage is never touched)."""
        assert self.catalog is not None and self.queue is not None
        self.queries.dataset(dataset_id)
        self.queue.cancel_dataset(dataset_id)
        self.catalog.delete_dataset(dataset_id)
        self.storage.remove_dataset(dataset_id)
        self.previews.cache.drop(dataset_id)
        self.readers.forget(dataset_id)
