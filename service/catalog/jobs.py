"""Job rows as a leased queue (ARCHITECTURE.md; the pattern of pgqueuer and river).

A worker claims the next runnable row in one statement: queued and due, or running with
an expired lease (its worker died), taken with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL so
concurrent workers on any replica never take the same row (SQLite serializes writers,
which gives the same guarantee within its one process). Every renewal and completion is
guarded by ``lease_owner``: zero rows updated means the lease was lost, and the worker
stops and writes nothing. Times come from the database.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import sqlalchemy as sa

from .base import CatalogBase
from .schema import JOB_STATES, UNFINISHED_JOB_STATES, Fence, jobs, lease_held


class JobRows(CatalogBase):
    def add_job(self, **row: Any) -> dict[str, Any] | None:
        """A new job (queued unless given a state). With a ``dedup_key``, an unfinished
        job of the dataset with the same key is returned instead of a second one."""
        stamp = self.now()
        values = {"state": "queued", "done": 0, "total": 0, "attempts": 0,
                  "max_attempts": 3, "priority": 100, "cancel_requested": False,
                  "created_at": stamp, "run_after": stamp, **row}
        try:
            return self._insert(jobs, values)
        except sa.exc.IntegrityError:
            if values.get("dedup_key") is None:
                raise
            existing = self._rows(sa.select(jobs).where(
                jobs.c.dataset_id == values["dataset_id"],
                jobs.c.dedup_key == values["dedup_key"],
                jobs.c.state.in_(UNFINISHED_JOB_STATES)))
            if not existing:  # it finished in between: this one is new after all
                return self._insert(jobs, values)
            return existing[0]

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._by_id(jobs, job_id)

    def update_job(self, job_id: str, *, owner: str | None = None, attempt: int | None = None,
                   **fields: Any) -> bool:
        """Update a job (with ``owner``: only while that worker holds its lease; with
        ``attempt`` too, only while that very claim does)."""
        condition = jobs.c.id == job_id
        if owner is not None:
            condition = sa.and_(condition, jobs.c.lease_owner == owner)
        if attempt is not None:
            condition = sa.and_(condition, jobs.c.attempts == attempt)
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(condition).values(**fields)).rowcount > 0

    def jobs_in_states(self, states: Iterable[str],
                       dataset_id: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(jobs).where(jobs.c.state.in_(list(states)))
        if dataset_id is not None:
            query = query.where(jobs.c.dataset_id == dataset_id)
        return self._rows(query.order_by(jobs.c.created_at, jobs.c.id))

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(jobs.c.state == state)
        return self._rows(query)

    def count_jobs_by_state(self) -> dict[str, int]:
        query = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        with self.engine.connect() as conn:
            counts = dict(conn.execute(query).all())
        return {state: counts.get(state, 0) for state in JOB_STATES}

    # -- the lease ------------------------------------------------------------------------

    def claim_job(self, owner: str, lease_seconds: float,
                  kinds: Sequence[str] | None = None) -> dict[str, Any] | None:
        """Take the next runnable job for ``owner``: queued and due, or running with an
        expired lease. Returns the row as claimed, or None when there is none."""
        now = self.now()
        lapsed = sa.or_(jobs.c.lease_expires_at < now, jobs.c.lease_expires_at.is_(None))
        runnable = sa.or_(sa.and_(jobs.c.state == "queued", jobs.c.run_after <= now),
                          sa.and_(jobs.c.state == "running", lapsed))
        pick = sa.select(jobs.c.id).where(runnable)
        if kinds is not None:
            pick = pick.where(jobs.c.kind.in_(list(kinds)))
        pick = (pick.order_by(jobs.c.priority, jobs.c.run_after, jobs.c.id).limit(1)
                .with_for_update(skip_locked=True))
        claim = (jobs.update().where(jobs.c.id == pick.scalar_subquery())
                 .values(state="running", lease_owner=owner,
                         lease_expires_at=self.now(lease_seconds),
                         attempts=jobs.c.attempts + 1,
                         started_at=sa.func.coalesce(jobs.c.started_at, now))
                 .returning(*jobs.c))
        with self.engine.begin() as conn:
            row = conn.execute(claim).first()
        return dict(row._mapping) if row else None

    def renew_leases(self, owner: str, claims: Sequence[Fence],
                     lease_seconds: float) -> dict[Fence, bool]:
        """Extend the leases ``owner``'s claims hold; claim -> whether cancellation was
        asked. A claim missing from the answer has lost its lease (the job was claimed
        again since, by another process or by this one)."""
        if not claims:
            return {}
        with self.engine.begin() as conn:
            rows = conn.execute(
                jobs.update().where(jobs.c.id.in_([c.job_id for c in claims]),
                                    jobs.c.lease_owner == owner, jobs.c.state == "running")
                .values(lease_expires_at=self.now(lease_seconds))
                .returning(jobs.c.id, jobs.c.attempts, jobs.c.cancel_requested)).all()
        current = {Fence(row.id, owner, row.attempts): bool(row.cancel_requested)
                   for row in rows}
        return {claim: current[claim] for claim in claims if claim in current}

    def complete_job(self, job_id: str, owner: str, *, state: str, result: Any = None,
                     error: Any = None, attempt: int | None = None) -> bool:
        """The last write of a run, only while ``owner`` (and claim ``attempt``) holds
        the lease."""
        return self.update_job(job_id, owner=owner, attempt=attempt, state=state,
                               result=result, error=error, finished_at=self.now(),
                               lease_owner=None, lease_expires_at=None)

    def requeue_job(self, job_id: str, owner: str, *, delay_seconds: float,
                    error: Any = None, count_attempt: bool = True,
                    attempt: int | None = None) -> bool:
        """Back to the queue, runnable after ``delay_seconds`` (a retry after a failure,
        or a job that has to wait for something, which does not count as an attempt)."""
        fields: dict[str, Any] = {"state": "queued", "run_after": self.now(delay_seconds),
                                  "lease_owner": None, "lease_expires_at": None}
        if error is not None:
            fields["error"] = error
        if not count_attempt:
            # The attempt count is also the fencing token, which must only grow: a wait
            # that does not count raises the allowance instead.
            fields["max_attempts"] = jobs.c.max_attempts + 1
        return self.update_job(job_id, owner=owner, attempt=attempt, **fields)

    def release_jobs(self, dataset_id: str, kind: str) -> int:
        """Queued jobs of a dataset that were waiting for it become runnable now."""
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(
                jobs.c.dataset_id == dataset_id, jobs.c.kind == kind,
                jobs.c.state == "queued").values(run_after=self.now())).rowcount

    def request_cancel(self, dataset_id: str) -> list[str]:
        """Cancel a dataset's unfinished jobs: queued ones at once, running ones are
        asked to stop (their workers see it on their next lease renewal). Returns the
        ids of the running ones."""
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.dataset_id == dataset_id,
                                             jobs.c.state == "queued")
                         .values(state="cancelled", finished_at=self.now()))
            running = conn.execute(
                jobs.update().where(jobs.c.dataset_id == dataset_id,
                                    jobs.c.state == "running")
                .values(cancel_requested=True).returning(jobs.c.id)).scalars().all()
        return list(running)

    def expire_leases(self) -> int:
        """Expire running leases now (an embedded catalog at start-up: no other process
        can hold them)."""
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(jobs.c.state == "running")
                                .values(lease_expires_at=self.now(-1.0))).rowcount

    def holds_lease(self, fence: Fence) -> bool:
        """Whether the claim ``fence`` still holds its job's lease."""
        return bool(self._count(jobs, lease_held(fence)))

    def has_live_lease(self, dataset_id: str) -> bool:
        """Whether some worker (or a receiving process) holds a live lease on a job of
        the dataset: its objects may be being written right now."""
        return bool(self._count(jobs, jobs.c.dataset_id == dataset_id,
                                jobs.c.state == "running",
                                jobs.c.lease_expires_at > self.now()))

    def runnable_count(self) -> int:
        return self._count(jobs, sa.or_(
            sa.and_(jobs.c.state == "queued", jobs.c.run_after <= self.now()),
            jobs.c.state == "running"))
