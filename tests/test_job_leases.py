"""The leased job queue's catalog side, on SQLite and on a real PostgreSQL: claim,
renewal and completion guarded by the lease owner and the claim's fencing token (its
attempt number), takeover of lapsed leases -- by another process or by the same one --
not-before times, and many concurrent claimers never getting the same job twice."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from service.catalog import Catalog, Fence


@pytest.fixture(params=["sqlite", "postgres"])
def catalog(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/catalog.sqlite3"
    else:
        url = request.getfixturevalue("pg_url")
    opened = Catalog(url, pool_size=12)
    yield opened
    opened.close()


def add(catalog: Catalog, job_id: str, **row) -> dict:
    return catalog.add_job(id=job_id, kind=row.pop("kind", "ingest"),
                           dataset_id=row.pop("dataset_id", f"d-{job_id}"), **row)


def test_a_claim_takes_the_job_and_fences_everyone_else(catalog):
    add(catalog, "j1")
    job = catalog.claim_job("worker-a", 30)
    assert job["id"] == "j1" and job["state"] == "running" and job["attempts"] == 1
    assert job["lease_owner"] == "worker-a"
    assert catalog.claim_job("worker-b", 30) is None          # nothing else runnable
    mine = Fence("j1", "worker-a", 1)
    assert catalog.renew_leases("worker-b", [Fence("j1", "worker-b", 1)], 30) == {}
    assert not catalog.complete_job("j1", "worker-b", state="done")
    assert catalog.has_live_lease("d-j1") and catalog.holds_lease(mine)
    assert catalog.renew_leases("worker-a", [mine], 30) == {mine: False}
    assert catalog.complete_job("j1", "worker-a", state="done", result={"ok": 1})
    done = catalog.get_job("j1")
    assert done["state"] == "done" and done["result"] == {"ok": 1}
    assert done["lease_owner"] is None and not catalog.has_live_lease("d-j1")


def test_a_lapsed_lease_is_taken_over_and_the_old_owner_writes_nothing(catalog):
    add(catalog, "j2")
    assert catalog.claim_job("worker-a", 1.0)["id"] == "j2"
    assert catalog.claim_job("worker-b", 30) is None
    time.sleep(1.3)  # the database's clock decides
    assert not catalog.has_live_lease("d-j2")
    taken = catalog.claim_job("worker-b", 30)
    assert taken["id"] == "j2" and taken["attempts"] == 2
    assert catalog.renew_leases("worker-a", [Fence("j2", "worker-a", 1)], 30) == {}
    assert not catalog.complete_job("j2", "worker-a", state="failed")
    assert catalog.complete_job("j2", "worker-b", state="done")
    assert catalog.get_job("j2")["state"] == "done"


def test_a_stale_claim_of_the_same_process_is_fenced_by_its_token(catalog):
    """One process claims a job, pauses past its lease, and claims the same job again
    (a second worker thread): the first claim carries the older token and can write
    nothing -- not the dataset, not the job's end -- though the owner is the same."""
    catalog.add_dataset(id="d-j5", name="m.mrc", source="upload", status="processing",
                        size_bytes=1, path="", info={})
    add(catalog, "j5")
    first = catalog.claim_job("worker-a", 0.5)
    time.sleep(0.8)
    second = catalog.claim_job("worker-a", 30)
    assert (first["attempts"], second["attempts"]) == (1, 2)
    stale, current = Fence("j5", "worker-a", 1), Fence("j5", "worker-a", 2)
    assert not catalog.holds_lease(stale) and catalog.holds_lease(current)
    assert catalog.renew_leases("worker-a", [stale, current], 30) == {current: False}
    assert not catalog.update_dataset("d-j5", fence=stale, status="failed")
    assert catalog.commit_ingest("d-j5", {"status": "ready"}, fence=stale, job_result={},
                                 tus_upload_id=None) == "lease_lost"
    assert not catalog.complete_job("j5", "worker-a", state="done", attempt=1)
    assert catalog.get_dataset("d-j5")["status"] == "processing"
    assert catalog.commit_ingest("d-j5", {"status": "ready"}, fence=current,
                                 job_result={"ok": 1}, tus_upload_id=None) == "committed"
    job = catalog.get_job("j5")
    assert (job["state"], job["result"], job["lease_owner"]) == ("done", {"ok": 1}, None)
    assert catalog.get_dataset("d-j5")["status"] == "ready"
    # a dataset is committed once
    assert catalog.commit_ingest("d-j5", {"status": "rejected"}, fence=None, job_result={},
                                 tus_upload_id=None) == "already"


def test_requeue_waits_for_its_time_and_cancellation_reaches_the_holder(catalog):
    add(catalog, "j3")
    catalog.claim_job("worker-a", 30)
    assert catalog.requeue_job("j3", "worker-a", delay_seconds=1.0, error={"error": "x"})
    assert catalog.claim_job("worker-a", 30) is None           # not before its time
    time.sleep(1.2)
    again = catalog.claim_job("worker-a", 30)
    assert again["id"] == "j3" and again["attempts"] == 2
    assert catalog.request_cancel("d-j3") == ["j3"]
    claim = Fence("j3", "worker-a", 2)
    assert catalog.renew_leases("worker-a", [claim], 30) == {claim: True}


def test_kinds_and_priority_decide_what_is_claimed(catalog):
    add(catalog, "late", priority=200)
    add(catalog, "soon", priority=10, kind="convert")
    add(catalog, "mid", priority=100)
    assert catalog.claim_job("w", 30, kinds=["ingest"])["id"] == "mid"
    assert catalog.claim_job("w", 30)["id"] == "soon"
    assert catalog.claim_job("w", 30)["id"] == "late"


def test_concurrent_claimers_never_share_a_job(catalog):
    jobs = 120
    for i in range(jobs):
        add(catalog, f"c{i:04d}")
    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        mine = claimed.setdefault(name, [])
        try:
            while (job := catalog.claim_job(name, 30)) is not None:
                mine.append(job["id"])
                assert catalog.complete_job(job["id"], name, state="done")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if catalog.dialect == "sqlite" and errors:
        # SQLite serializes writers; a claim may meet "database is locked" under this
        # much contention, which the queue treats as "try again" -- but never a double
        assert all(isinstance(e, sa.exc.OperationalError) for e in errors), errors
    else:
        assert errors == []
    everything = [job_id for ids in claimed.values() for job_id in ids]
    assert len(everything) == len(set(everything))              # nobody ran one twice
    if not errors:
        assert len(everything) == jobs
    if catalog.is_postgres:  # SKIP LOCKED lets claimers proceed side by side
        assert sum(1 for ids in claimed.values() if ids) >= 2


def test_a_commit_never_lands_on_a_tombstone_or_twice(catalog):
    """The guards are in the writes themselves: a DELETE's tombstone between a pass's
    look and its commit makes the commit write nothing; a receiving row that was
    committed meanwhile is not dropped."""
    for dataset_id, status in (("d-t", "processing"), ("d-r", "receiving")):
        catalog.add_dataset(id=dataset_id, name="m.mrc", source="upload", status=status,
                            size_bytes=1, path="", info={})
    assert catalog.mark_deleting("d-t")
    assert catalog.commit_ingest("d-t", {"status": "ready"}, fence=None, job_result={},
                                 tus_upload_id=None) == "gone"
    assert catalog.get_dataset("d-t")["status"] == "deleting"
    assert catalog.commit_ingest("d-r", {"status": "ready"}, fence=None, job_result={},
                                 tus_upload_id=None) == "committed"
    assert not catalog.delete_receiving("d-r")  # committed: not a cut-off upload
    assert catalog.get_dataset("d-r")["status"] == "ready"


def test_a_job_that_ended_itself_while_the_renewal_waited_is_not_a_lost_lease(catalog,
                                                                              caplog):
    """An ingest's commit marks its job done and the claim is released only after: a
    heartbeat between the two misses the lease but must not call it lost (nor stop
    anything); a claim another attempt took over is lost."""
    from service.jobs import JobQueue

    queue = JobQueue(catalog, 0, lambda job, ctx: None, owner="worker-a")
    add(catalog, "j-ended")
    add(catalog, "j-taken")
    ended = catalog.claim_job("worker-a", 30)
    taken = catalog.claim_job("worker-a", 1.0)
    assert {ended["id"], taken["id"]} == {"j-ended", "j-taken"}
    if ended["id"] != "j-ended":
        ended, taken = taken, ended
    mine, old = Fence("j-ended", "worker-a", 1), Fence("j-taken", "worker-a", 1)
    mine_event, old_event = queue.hold(mine), queue.hold(old)
    assert catalog.complete_job("j-ended", "worker-a", state="done", attempt=1)
    with catalog.engine.begin() as conn:  # j-taken's lease lapses and worker-b takes it
        conn.execute(sa.text("UPDATE jobs SET state = 'queued', lease_owner = NULL, "
                             "lease_expires_at = NULL WHERE id = 'j-taken'"))
    assert catalog.claim_job("worker-b", 30)["attempts"] == 2
    with caplog.at_level("WARNING", logger="mrc_ingest.jobs"):
        queue.renew_held()
    assert queue.lost == {old} and old_event.is_set() and not mine_event.is_set()
    assert [r.job_id for r in caplog.records if r.getMessage() == "job lease lost"] \
        == ["j-taken"]
