"""The job queue: a bounded thread pool that runs persisted jobs, reports progress to
the catalog, and re-runs what a restart interrupted.

Jobs live in the catalog from the moment they are created (state ``queued``), so a crash
loses nothing: :meth:`JobQueue.start` re-submits every job still ``queued`` or
``running``. Re-running is safe because every output is written to a temporary name
and renamed only when complete.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol

from .catalog import UNFINISHED_JOB_STATES, Catalog, now
from .errors import error_body

log = logging.getLogger("mrc_ingest.jobs")

#: Progress goes to the catalog at most this often (seconds), plus once at the end.
PROGRESS_INTERVAL = 0.25


class JobCancelled(Exception):
    """Raised inside a job (from its progress callback) when the job was cancelled."""


class JobDeferred(Exception):
    """Raised by a job that cannot run yet; it goes back to ``queued`` (not re-submitted:
    whatever it waits for submits it again)."""


class JobContext:
    """What a running job may do: report progress (which is also where cancellation is
    noticed) and read its own row."""

    def __init__(self, queue: "JobQueue", job: dict[str, Any], cancel: threading.Event):
        self.queue, self.job, self._cancel = queue, job, cancel
        self._last = 0.0

    def progress(self, done: int, total: int) -> bool:
        """Record progress (at most every PROGRESS_INTERVAL, and at the end); True when
        this call wrote it."""
        if self._cancel.is_set():
            raise JobCancelled(self.job["id"])
        moment = time.monotonic()
        if done >= total or moment - self._last >= PROGRESS_INTERVAL:
            self._last = moment
            self.queue.catalog.update_job(self.job["id"], done=done, total=total)
            return True
        return False


class Runner(Protocol):
    def __call__(self, job: dict[str, Any], ctx: JobContext) -> dict[str, Any] | None: ...


class JobQueue:
    def __init__(self, catalog: Catalog, workers: int, runner: Runner,
                 on_finish: Callable[[dict[str, Any], str, float, dict[str, Any] | None],
                                     None] | None = None):
        self.catalog, self.workers, self.runner = catalog, workers, runner
        self.on_finish = on_finish
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> list[str]:
        """Start the pool and re-submit unfinished jobs; returns their ids."""
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mrc-job")
        resumed = []
        for job in self.catalog.jobs_in_states(UNFINISHED_JOB_STATES):
            self.catalog.update_job(job["id"], state="queued", done=0)
            self.submit(job["id"])
            resumed.append(job["id"])
        return resumed

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking jobs. Running jobs are cancelled (their rows stay ``running`` and
        are re-run at the next start) unless ``wait``."""
        if self._pool is None:
            return
        self._stopping = True
        if not wait:
            for event in list(self._cancel.values()):
                event.set()
        self._pool.shutdown(wait=True, cancel_futures=not wait)
        self._pool = None
        self._stopping = False

    def submit(self, job_id: str) -> Future:
        assert self._pool is not None, "JobQueue.start() first"
        with self._lock:
            if job_id in self._futures:
                return self._futures[job_id]
            cancel = threading.Event()
            self._cancel[job_id] = cancel
            future = self._pool.submit(self._run, job_id, cancel)
            self._futures[job_id] = future
        future.add_done_callback(lambda _f: self._forget(job_id))
        return future

    def cancel_dataset(self, dataset_id: str) -> list[str]:
        """Cancel the dataset's unfinished jobs and wait until none of them runs."""
        jobs = self.catalog.jobs_in_states(UNFINISHED_JOB_STATES, dataset_id=dataset_id)
        futures = []
        for job in jobs:
            with self._lock:
                event, future = self._cancel.get(job["id"]), self._futures.get(job["id"])
            if event is not None:
                event.set()
            if future is not None:
                futures.append(future)
        for future in futures:
            try:
                future.result(timeout=60)
            except Exception:  # noqa: BLE001 - its outcome is recorded by _run
                pass
        return [job["id"] for job in jobs]

    def pending(self) -> int:
        with self._lock:
            return sum(1 for f in self._futures.values() if not f.done())

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._futures.pop(job_id, None)
            self._cancel.pop(job_id, None)

    def _run(self, job_id: str, cancel: threading.Event) -> dict[str, Any] | None:
        job = self.catalog.get_job(job_id)
        if job is None or job["state"] not in UNFINISHED_JOB_STATES:
            return None  # deleted or finished while it waited
        if cancel.is_set():
            self.catalog.update_job(job_id, state="cancelled", finished_at=now())
            return None
        started = time.monotonic()
        self.catalog.update_job(job_id, state="running", started_at=now())
        log.info("job running", extra={"job_id": job_id, "dataset_id": job["dataset_id"],
                                       "kind": job["kind"]})
        state, result, error = "done", None, None
        exc_seen: BaseException | None = None
        try:
            result = self.runner(job, JobContext(self, job, cancel))
        except JobDeferred:
            self.catalog.update_job(job_id, state="queued")
            return None
        except JobCancelled:
            if self._stopping:  # shut down mid-job: leave it for the next start
                return None
            state = "cancelled"
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
            state, error, exc_seen = "failed", error_body(exc), exc
            if error["error"] == "internal_error":
                log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        self.catalog.update_job(job_id, state=state, result=result, error=error,
                                finished_at=now())
        seconds = time.monotonic() - started
        log.log(logging.WARNING if state == "failed" else logging.INFO, f"job {state}",
                extra={"job_id": job_id, "dataset_id": job["dataset_id"], "kind": job["kind"],
                       "seconds": round(seconds, 3),
                       **({"error": error["error"]} if error else {})})
        if self.on_finish:
            self.on_finish(job, state, seconds, result)
        if error is not None:
            raise JobFailed(error) from exc_seen
        return result


class JobFailed(Exception):
    """The future of a failed job raises this, carrying the recorded error body."""

    def __init__(self, body: dict[str, Any]):
        self.body = body
        super().__init__(body)
