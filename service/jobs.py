"""Workers: threads that claim leased job rows from the catalog and run them.

Jobs live in the catalog, not in process memory (:mod:`service.catalog.jobs`): any
worker of any replica may claim a queued job, or one whose lease expired because its
worker died. A heartbeat renews the leases this process holds every third of the lease;
a renewal that finds the lease gone (or a cancellation asked for) stops the job at its
next progress report, and its last write, guarded by the lease owner, writes nothing.
A failure retries with exponential backoff up to the job's ``max_attempts``; a failure
that is the input's fault (a 4xx) fails at once. Workers wake on a new job in this
process, on PostgreSQL's NOTIFY from another replica, and otherwise poll.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from typing import Any, Callable, Protocol, Sequence

from .catalog import Catalog, Fence
from .errors import ServiceError, error_body, first_line, to_service_error
from .priority import lower_this_thread

log = logging.getLogger("mrc_ingest.jobs")

#: Progress goes to the catalog at most this often (seconds), plus once at the end.
PROGRESS_INTERVAL = 0.25
#: An idle worker looks for work at least this often, notified or not.
POLL_SECONDS = 2.0
#: A job that must wait (a conversion whose dataset is still ingesting) looks again after
DEFER_SECONDS = 2.0
NOTIFY_CHANNEL = "mrc_ingest_jobs"
#: finished-job events kept for in-process waiters
FINISHED_EVENTS_KEPT = 1024


def replica_id() -> str:
    """This process, as lease owner: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()[:48]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobCancelled(Exception):
    """Raised inside a job (from its progress callback) when it was cancelled or its
    lease was lost."""


class JobDeferred(Exception):
    """Raised by a job that cannot run yet; it goes back to the queue for a while (not
    counted as an attempt)."""


class LeaseLost(JobCancelled):
    """The job's lease was taken over: stop, write nothing."""


class JobContext:
    """What a running job may do: report progress (which is also where cancellation and
    a lost lease are noticed) and name its lease for guarded writes."""

    def __init__(self, queue: "JobQueue", job: dict[str, Any], cancel: threading.Event):
        self.queue, self.job, self._cancel = queue, job, cancel
        self._last = 0.0
        #: the job was finished inside the commit transaction of its dataset (the commit
        #: protocol): the queue records no second end
        self.finished = False

    @property
    def fence(self) -> Fence:
        """This claim of the job: catalog writes guarded by its lease and token."""
        return Fence(self.job["id"], self.queue.owner, self.job["attempts"])

    @property
    def lost(self) -> bool:
        return self.fence in self.queue.lost

    def check(self) -> None:
        if self._cancel.is_set():
            raise LeaseLost(self.job["id"]) if self.lost else JobCancelled(self.job["id"])

    def progress(self, done: int, total: int) -> bool:
        """Record progress (at most every PROGRESS_INTERVAL, and at the end); True when
        this call wrote it."""
        self.check()
        moment = time.monotonic()
        if done >= total or moment - self._last >= PROGRESS_INTERVAL:
            self._last = moment
            self.queue.catalog.update_job(self.job["id"], owner=self.queue.owner, done=done,
                                          total=total)
            return True
        return False


class Runner(Protocol):
    def __call__(self, job: dict[str, Any], ctx: JobContext) -> dict[str, Any] | None: ...


def retryable(exc: BaseException) -> bool:
    """Worth another attempt: an unexpected error, or the catalog or object store away
    for a moment. Not the input's fault (a 4xx fails the same way again), and not a full
    disk (507), which needs an operator, not a retry."""
    mapped = to_service_error(exc)
    return mapped is None or mapped.status in (500, 502, 503, 504)


class JobQueue:
    """``workers`` threads running jobs of ``kinds`` (all when None), plus a heartbeat.
    With no workers, this process only queues jobs and tracks leases it holds itself
    (uploads streaming into it)."""

    def __init__(self, catalog: Catalog, workers: int, runner: Runner, *,
                 lease_seconds: float = 30.0, owner: str | None = None, nice: int = 0,
                 kinds: Sequence[str] | None = None,
                 on_finish: Callable[[dict[str, Any], str, float, dict[str, Any] | None],
                                     None] | None = None):
        self.catalog, self.workers, self.runner = catalog, workers, runner
        self.lease_seconds = lease_seconds
        #: how much nicer the job workers run than the process (service.priority); the
        #: lease heartbeat keeps the process's priority
        self.nice = nice
        self.owner = owner or replica_id()
        self.kinds = list(kinds) if kinds is not None else None
        self.on_finish = on_finish
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: claim -> cancel event, for every lease this process holds; keyed by the claim
        #: (job, owner, attempt), not the job, so a stale thread of an earlier claim of
        #: the same job never shares (or releases) the current claim's entry
        self._held: dict[Fence, threading.Event] = {}
        self._held_lock = threading.Lock()
        #: claims whose lease was found lost
        self.lost: set[Fence] = set()
        #: job id -> event set when it finishes here (in-process waiters; bounded)
        self._done: OrderedDict[str, threading.Event] = OrderedDict()
        self._done_lock = threading.Lock()

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        for i in range(self.workers):
            self._spawn(self._work, f"mrc-job-{i}")
        self._spawn(self._heartbeat, "mrc-lease")
        if self.catalog.is_postgres and self.workers:
            self._spawn(self._listen, "mrc-notify")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def shutdown(self, wait: bool = True) -> None:
        """Stop claiming. Running jobs are cancelled; their leases expire and another
        worker (or this process after a restart) takes them over."""
        self._stop.set()
        with self._held_lock:
            for event in self._held.values():
                event.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=30 if wait else 5)
        self._threads = []

    # -- queueing ---------------------------------------------------------------------

    def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        """Wake workers (here and, on PostgreSQL, on every replica) for a queued job."""
        self.wake()
        if self.catalog.is_postgres:
            try:
                with self.catalog.engine.begin() as conn:
                    conn.exec_driver_sql(f"NOTIFY {NOTIFY_CHANNEL}")
            except Exception:  # noqa: BLE001 - polling finds the job anyway
                log.debug("NOTIFY failed", exc_info=True)
        return job

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def finished_event(self, job_id: str) -> threading.Event:
        """Set when ``job_id`` finishes in this process (waiters elsewhere poll)."""
        with self._done_lock:
            event = self._done.setdefault(job_id, threading.Event())
            self._done.move_to_end(job_id)
            while len(self._done) > FINISHED_EVENTS_KEPT:
                self._done.popitem(last=False)
        return event

    def pending(self) -> int:
        return self.catalog.runnable_count()

    # -- leases this process holds ----------------------------------------------------

    def hold(self, fence: Fence) -> threading.Event:
        """Keep renewing the lease of the claim ``fence`` (a job running here: a
        worker's, or an upload streaming in); returns its cancel event."""
        event = threading.Event()
        with self._held_lock:
            self._held[fence] = event
        return event

    def release(self, fence: Fence) -> None:
        with self._held_lock:
            self._held.pop(fence, None)
        self.lost.discard(fence)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            self.renew_held()

    def renew_held(self) -> None:
        """One heartbeat: extend every lease held here; a claim whose lease was lost
        (taken over) or whose job is asked to cancel has its event set."""
        with self._held_lock:
            held = dict(self._held)
        if not held:
            return
        try:
            renewed = self.catalog.renew_leases(self.owner, list(held), self.lease_seconds)
        except Exception as exc:  # noqa: BLE001 - the catalog is away: try next beat
            log.warning("lease renewal failed: %s", first_line(exc))
            return
        for fence, event in held.items():
            if fence not in renewed:
                if self._ended_under(fence):
                    continue
                self.lost.add(fence)
                log.warning("job lease lost", extra={"job_id": fence.job_id})
                event.set()
            elif renewed[fence]:
                event.set()  # cancellation asked for

    def _ended_under(self, fence: Fence) -> bool:
        """Whether a claim the renewal missed had ended its job itself meanwhile (an
        ingest's commit marks its job done; releasing the claim comes after): not a
        lost lease, which is a claim taken over by another attempt."""
        with self._held_lock:
            if fence not in self._held:
                return True
        try:
            job = self.catalog.get_job(fence.job_id)
        except Exception:  # noqa: BLE001 - the catalog is away: count it lost, as before
            return False
        return job is not None and job["state"] in ("done", "failed", "cancelled") and \
            job["attempts"] == fence.attempt

    def cancel_dataset(self, dataset_id: str, timeout: float = 60.0) -> list[str]:
        """Cancel the dataset's unfinished jobs; wait (up to ``timeout``) until those
        running in this process stopped. Jobs running elsewhere see the request at
        their next lease renewal."""
        running = self.catalog.request_cancel(dataset_id)
        local = []
        with self._held_lock:
            for fence, event in self._held.items():
                if fence.job_id in running:
                    event.set()
                    local.append(fence.job_id)
        deadline = time.monotonic() + timeout
        for job_id in local:
            self.finished_event(job_id).wait(max(0.0, deadline - time.monotonic()))
        return running

    # -- the workers ------------------------------------------------------------------

    def _listen(self) -> None:
        """PostgreSQL LISTEN: wake the workers when another replica queues a job."""
        import psycopg

        dsn = self.catalog.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=POLL_SECONDS):
                            self.wake()
            except Exception:  # noqa: BLE001 - the database is away; polling goes on
                self._stop.wait(POLL_SECONDS)

    def _work(self) -> None:
        lower_this_thread(self.nice)
        away_since: float | None = None
        while not self._stop.is_set():
            try:
                job = self.catalog.claim_job(self.owner, self.lease_seconds, self.kinds)
            except Exception as exc:  # noqa: BLE001 - the catalog is away: wait, try again
                # one line when it goes away, not a traceback every poll while it is
                if away_since is None:
                    away_since = time.monotonic()
                    log.warning("catalog unreachable, cannot claim jobs: %s", first_line(exc))
                self._stop.wait(POLL_SECONDS)
                continue
            if away_since is not None:
                log.info("catalog back after %.1f s", time.monotonic() - away_since)
                away_since = None
            if job is None:
                with self._wake:
                    self._wake.wait(POLL_SECONDS)
                continue
            fence = Fence(job["id"], self.owner, job["attempts"])
            try:
                self._run(job, fence)
            except Exception as exc:  # noqa: BLE001 - the worker thread must live on
                # the job's own bookkeeping failed (the catalog went away as it ended):
                # its lease is released, so it lapses and the job runs again (idempotent)
                log.warning("could not record the end of job %s: %s", job["id"],
                            first_line(exc))
            finally:
                self.release(fence)

    def _run(self, job: dict[str, Any], fence: Fence) -> None:
        """Run one claimed job and record how it ended (the caller releases its lease).
        Every end is written under the claim's fence (owner and attempt)."""
        job_id = job["id"]
        cancel = self.hold(fence)
        ctx = JobContext(self, job, cancel)
        started = time.monotonic()
        log.info("job running", extra={"job_id": job_id, "dataset_id": job["dataset_id"],
                                       "kind": job["kind"], "attempt": job["attempts"]})
        state, result, error = "done", None, None
        try:
            if job["cancel_requested"]:
                raise JobCancelled(job_id)
            if job["attempts"] > job["max_attempts"]:
                raise JobGaveUp(f"gave up after {job['max_attempts']} attempts (its worker "
                                "stopped each time)")
            result = self.runner(job, ctx)
        except JobDeferred:
            self.catalog.requeue_job(job_id, self.owner, delay_seconds=DEFER_SECONDS,
                                     count_attempt=False, attempt=fence.attempt)
            return
        except LeaseLost:
            log.warning("job stopped: lease lost", extra={"job_id": job_id})
            return
        except JobCancelled:
            if self._stop.is_set():  # shut down mid-job: another worker takes it over
                return
            state = "cancelled"
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
            error = error_body(exc)
            if error["error"] == "internal_error":
                log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            if retryable(exc) and not isinstance(exc, JobGaveUp) and \
                    job["attempts"] < job["max_attempts"]:
                delay = min(60.0, 2.0 ** job["attempts"])
                log.warning("job will retry", extra={"job_id": job_id, "seconds": delay,
                                                     "error": error["error"]})
                self.catalog.requeue_job(job_id, self.owner, delay_seconds=delay,
                                         error=error, attempt=fence.attempt)
                return
            state = "failed"
            if isinstance(exc, JobGaveUp) and hasattr(self.runner, "gave_up"):
                # its worker died in every attempt: the runner never saw it fail, so it
                # is told now (an ingest marks its dataset failed, which recovery leaves)
                self.runner.gave_up(job, fence, error)
        written = ctx.finished or self.catalog.complete_job(
            job_id, self.owner, state=state, result=result, error=error,
            attempt=fence.attempt)
        self.release(fence)
        seconds = time.monotonic() - started
        if not written:
            log.warning("job result discarded: lease lost", extra={"job_id": job_id})
            return
        log.log(logging.WARNING if state == "failed" else logging.INFO, f"job {state}",
                extra={"job_id": job_id, "dataset_id": job["dataset_id"], "kind": job["kind"],
                       "seconds": round(seconds, 3),
                       **({"error": error["error"]} if error else {})})
        self.finished_event(job_id).set()
        if self.on_finish:
            self.on_finish(job, state, seconds, result)


class JobGaveUp(ServiceError):
    """A job whose worker died in every attempt."""
    status, code = 500, "gave_up"
