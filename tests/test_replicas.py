"""Several replicas on one PostgreSQL and one S3-compatible store (SeaweedFS), as a facility
runs the service on several machines. Every scenario starts real ``mrc-ingest serve``
processes, each with its own data folder (scratch only, as on separate machines), on a
real PostgreSQL and a real SeaweedFS that the fixtures start; nothing is mocked."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import mrcfile
import numpy as np
import pytest
import sqlalchemy as sa

from tests.api_helpers import run_recover, start_server
from tests.invariants import Sent, check
from tests.reference import counting_movie, raw_header, write_raw_mrc

TUS = {"Tus-Resumable": "1.0.0"}


class Replicas:
    """Replicas of one deployment: one database, one bucket prefix, own data folders."""

    def __init__(self, root: Path, database_url: str, storage_url: str, s3, **settings):
        self.root, self.database_url, self.storage_url, self.s3 = (root, database_url,
                                                                   storage_url, s3)
        self.env = {"MRC_INGEST_DATABASE_URL": database_url,
                    "MRC_INGEST_STORAGE_URL": storage_url,
                    "MRC_INGEST_S3_ENDPOINT_URL": s3.endpoint_url,
                    "MRC_INGEST_S3_PART_BYTES": str(5 << 20),
                    "MRC_INGEST_ALLOWED_ROOTS": f'["{root / "shared"}"]', **s3.env,
                    **{f"MRC_INGEST_{k.upper()}": str(v) for k, v in settings.items()}}
        (root / "shared").mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, object] = {}
        self.count = 0

    def start(self, name: str, **settings) -> str:
        env = {**self.env, **{f"MRC_INGEST_{k.upper()}": str(v) for k, v in settings.items()}}
        proc, base = start_server(self.root / name, env=env)
        self.procs[name] = proc
        return base

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(timeout=30)
        self.procs = {}

    def catalog(self) -> sa.Engine:
        return sa.create_engine(self.database_url)

    def check(self, sent: list, base_url: str | None = None) -> list[str]:
        """tests/invariants.py on this deployment, after one sweep by a replica's own
        ``mrc-ingest recover`` (every replica keeps serving: objects younger than a few
        seconds are left, so this sweeps what a finished pass left)."""
        from tests.invariants import Place

        self.recover()
        place = Place(self.database_url, bucket=self.s3.bucket,
                      prefix=self.storage_url.split("/", 3)[3] + "/", s3=self.s3.client())
        return check(place, sent, base_url=base_url)

    def recover(self) -> None:
        run_recover(self.root / "recover", self.env)


@pytest.fixture
def replicas(tmp_path, postgres, seaweedfs):
    deployment = Replicas(tmp_path, postgres.create_database(),
                          seaweedfs.url(f"t{os.urandom(4).hex()}"), seaweedfs)
    yield deployment
    deployment.stop_all()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(fetch, done, timeout: float = 60.0, what: str = "it"):
    deadline = time.monotonic() + timeout
    while not done(value := fetch()):
        assert time.monotonic() < deadline, f"{what}: still {value} after {timeout} s"
        time.sleep(0.1)
    return value


def job_of(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/jobs/{job_id}").json()


def finished(job: dict) -> bool:
    return job["state"] in ("done", "failed", "cancelled")


@pytest.fixture
def movie(tmp_path):
    data = counting_movie((12, 256, 320))
    return write_raw_mrc(tmp_path / "movie.mrc", data, 101, cella=(320 * 0.9, 256 * 0.9, 12)), \
        data


def test_upload_to_one_replica_read_from_another(replicas, movie):
    path, data = movie
    raw = path.read_bytes()
    a, b = replicas.start("a"), replicas.start("b")
    up = httpx.put(f"{a}/v1/uploads/movie.mrc", content=raw, timeout=60)
    assert up.status_code == 201, up.text
    ds_id = up.json()["dataset"]["id"]
    meta = httpx.get(f"{b}/v1/datasets/{ds_id}").json()
    assert meta["status"] == "ready" and meta["sha256"] == sha(raw)
    assert meta["storage"]["form"] == "archive" and meta["frames"] == 12
    assert httpx.get(f"{b}/v1/datasets/{ds_id}/frames/5.png").headers["content-type"] == \
        "image/png"
    whole = httpx.get(f"{b}/v1/datasets/{ds_id}/download", timeout=60)
    assert whole.content == raw and whole.headers["etag"] == f'"{sha(raw)}"'
    part = httpx.get(f"{b}/v1/datasets/{ds_id}/download", headers={"Range": "bytes=5000-9999"})
    assert part.status_code == 206 and part.content == raw[5000:10000]
    converted = httpx.get(f"{b}/v1/datasets/{ds_id}/download", params={"mode": 1}, timeout=60)
    out = replicas.root / "c.mrc"
    out.write_bytes(converted.content)
    with mrcfile.open(out) as m:
        assert m.data.dtype == np.int16 and np.array_equal(m.data, data)
    # ... and A serves the conversion B made, from the shared store, as it is
    again = httpx.get(f"{a}/v1/datasets/{ds_id}/download", params={"mode": 1}, timeout=60)
    assert again.content == converted.content


def test_tus_patches_alternating_between_replicas(replicas, tmp_path):
    """Several PATCHes on each replica, each going to the other one: the offset, the S3
    multipart upload and its parts live in the catalog, and a tail shorter than a part
    waits as its own object. The movie (17.3 MB) spans four 5 MiB parts; the PATCHes
    (2.3 MB, not a divisor of the part) cross part boundaries and end in short tails.
    Afterwards the independent invariant checker reads the catalog and the bucket."""
    data = counting_movie((24, 1024, 1408))
    path = write_raw_mrc(tmp_path / "tus.mrc", data, 101)
    raw = path.read_bytes()
    assert len(raw) > 3 * (5 << 20)
    a, b = replicas.start("a"), replicas.start("b")
    created = httpx.post(f"{a}/v1/tus/", headers={
        **TUS, "Upload-Length": str(len(raw)),
        "Upload-Metadata": "filename " + base64.b64encode(b"tus.mrc").decode()})
    assert created.status_code == 201
    location = created.headers["location"]
    offset, step, turn = 0, 2_300_000, 0
    while offset < len(raw):
        base = (a, b)[turn % 2]
        response = httpx.patch(f"{base}{location}", content=raw[offset:offset + step],
                               headers={**TUS, "Upload-Offset": str(offset),
                                        "Content-Type": "application/offset+octet-stream"},
                               timeout=60)
        assert response.status_code == 204, response.text
        offset = int(response.headers["upload-offset"])
        head = httpx.head(f"{(b, a)[turn % 2]}{location}", headers=TUS)  # the other one
        assert int(head.headers["upload-offset"]) == offset
        turn += 1
    assert turn >= 7  # several PATCHes on each replica
    assert_exact_dataset(a, b, response.headers["mrc-ingest-dataset"], raw)
    assert replicas.check([Sent("tus.mrc", sha(raw), pixels=data, told_complete=True)],
                          base_url=a) == []


def assert_exact_dataset(meta_base: str, download_base: str, dataset_url: str,
                         raw: bytes) -> None:
    """The upload became a ready dataset whose download is ``raw``, byte for byte."""
    ds = wait_for(lambda: httpx.get(f"{meta_base}{dataset_url}").json(),
                  lambda d: d["status"] in ("ready", "rejected", "failed"), what="dataset")
    assert ds["status"] == "ready" and ds["sha256"] == sha(raw)
    assert httpx.get(f"{download_base}{dataset_url}/download", timeout=60).content == raw


def test_a_discarded_patch_keeps_the_recorded_tail(replicas, tmp_path):
    """A PATCH that ends inside a part leaves a tail object; a following PATCH whose
    checksum fails (460), and an empty one, keep nothing -- and must not lose that tail."""
    raw = write_raw_mrc(tmp_path / "big.mrc", counting_movie((24, 1024, 1024)), 101).read_bytes()
    assert len(raw) > 12 << 20
    a, b = replicas.start("a"), replicas.start("b")
    location = httpx.post(f"{a}/v1/tus/", headers={
        **TUS, "Upload-Length": str(len(raw)),
        "Upload-Metadata": "filename " + base64.b64encode(b"tail.mrc").decode()
    }).headers["location"]

    def patch(base, offset, body, **headers):
        return httpx.patch(f"{base}{location}", content=body, timeout=60, headers={
            **TUS, "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream", **headers})
    first = 7 << 20  # one 5 MiB part and a 2 MiB tail
    assert patch(a, 0, raw[:first]).status_code == 204
    wrong = base64.b64encode(hashlib.sha1(b"not these bytes").digest()).decode()
    refused = patch(b, first, raw[first:first + 100_000], **{"Upload-Checksum": f"sha1 {wrong}"})
    assert refused.status_code == 460, refused.text
    assert patch(a, first, b"").status_code == 204
    assert int(httpx.head(f"{b}{location}", headers=TUS).headers["upload-offset"]) == first
    done = patch(b, first, raw[first:])
    assert done.status_code == 204, done.text
    assert_exact_dataset(a, a, done.headers["mrc-ingest-dataset"], raw)


def test_a_killed_worker_job_is_finished_by_the_other_replica(replicas, tmp_path):
    """kill -9 of the replica running an ingest: once its lease lapses the other one
    takes the job over and finishes it; the dataset is ready, exact, not duplicated."""
    lease = 3.0
    frames, n = 40, 1024
    rng = np.random.default_rng(3)
    counts = np.minimum(rng.poisson(1.0, size=(frames, n, n)), 15).astype(np.uint8)
    registered = replicas.root / "shared" / "long.mrc"
    with open(registered, "wb") as f:
        f.write(raw_header(nx=n, ny=n, nz=frames, mode=101))
        f.write((counts[:, :, 0::2] | (counts[:, :, 1::2] << 4)).tobytes())
    # Slow compression (zstd level 9) so that the ingest is still running when killed.
    settings = {"job_lease_seconds": lease, "archive_clevel": 9, "workers": 1}
    bases = {"a": replicas.start("a", **settings), "b": replicas.start("b", **settings)}
    reg = httpx.post(f"{bases['a']}/v1/registrations", json={"path": str(registered)})
    job_id = reg.json()["job"]["id"]
    running = wait_for(lambda: job_of(bases["a"], job_id),
                       lambda j: j["state"] == "running" and j["progress"]["done"] > 0,
                       what="the ingest running")
    victim = next(name for name, base in bases.items()
                  if httpx.get(f"{base}/healthz").json()["replica"] == running["worker"])
    survivor = "b" if victim == "a" else "a"
    replicas.kill(victim)
    killed_at = time.monotonic()
    job = wait_for(lambda: job_of(bases[survivor], job_id), finished, timeout=lease + 60,
                   what="the takeover")
    took = time.monotonic() - killed_at
    assert job["state"] == "done" and job["attempts"] == 2, job
    ds = httpx.get(f"{bases[survivor]}/v1/datasets/{reg.json()['dataset']['id']}").json()
    assert ds["status"] == "ready" and ds["sha256"] == sha(registered.read_bytes())
    assert ds["stats"]["dmax"] == counts.max()
    listing = httpx.get(f"{bases[survivor]}/v1/datasets").json()["items"]
    assert [d["id"] for d in listing] == [ds["id"]]
    back = httpx.get(f"{bases[survivor]}/v1/datasets/{ds['id']}/download", timeout=120)
    assert sha(back.content) == ds["sha256"]
    print(f"takeover after kill -9: {took:.1f} s (lease {lease} s)")
    # what the killed pass left (its generation's parts) goes in one sweep; nothing else
    told = [Sent("long.mrc", sha(registered.read_bytes()), pixels=counts,
                 told_complete=True)]
    assert replicas.check(told, base_url=bases[survivor]) == []


def test_replicas_starting_together_after_a_crash_run_each_job_once(replicas, movie):
    path, _ = movie
    shared = replicas.root / "shared"
    files = []
    for i in range(6):
        target = shared / f"m{i}.mrc"
        target.write_bytes(path.read_bytes()[:-8] + i.to_bytes(8, "little"))
        files.append(target)
    first = replicas.start("setup", workers=0)  # queues jobs but runs none: then "crashes"
    jobs = [httpx.post(f"{first}/v1/registrations", json={"path": str(p)}).json()["job"]["id"]
            for p in files]
    replicas.kill("setup")
    starters = {}

    def start(name):
        starters[name] = replicas.start(name, workers=2)
    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [wait_for(lambda j=j: job_of(starters["a"], j), finished, what="a job")
            for j in jobs]
    assert [j["state"] for j in done] == ["done"] * 6
    assert [j["attempts"] for j in done] == [1] * 6  # each claimed once
    with replicas.catalog().connect() as conn:
        rows = conn.execute(sa.text("SELECT status, count(*) FROM datasets GROUP BY status")
                            ).all()
    assert rows == [("ready", 6)]


def test_postgres_stopped_for_a_while(replicas, movie, postgres):
    path, _ = movie
    raw = path.read_bytes()
    a = replicas.start("a")
    before = httpx.put(f"{a}/v1/uploads/before.mrc", content=raw, timeout=60)
    assert before.status_code == 201
    postgres.stop()
    try:
        listing = httpx.get(f"{a}/v1/datasets", timeout=30)
        assert listing.status_code == 503 and listing.json()["error"] == "unavailable"
        health = httpx.get(f"{a}/healthz", timeout=30)
        assert health.status_code == 503 and health.json()["catalog"].startswith("unreachable")
        refused = httpx.put(f"{a}/v1/uploads/during.mrc", content=raw[:-1] + b"\x01",
                            timeout=60)
        assert refused.status_code == 503, refused.text
    finally:
        postgres.start()
    recovered = wait_for(lambda: httpx.get(f"{a}/v1/datasets", timeout=30),
                         lambda r: r.status_code == 200, what="recovery")
    assert [d["name"] for d in recovered.json()["items"]] == ["before.mrc"]
    assert httpx.get(f"{a}/healthz").status_code == 200
    after = httpx.put(f"{a}/v1/uploads/after.mrc", content=raw[:-1] + b"\x02", timeout=60)
    assert after.status_code == 201
    names = sorted(d["name"] for d in httpx.get(f"{a}/v1/datasets").json()["items"])
    assert names == ["after.mrc", "before.mrc"]  # nothing lost, nothing twice
    told = [Sent("before.mrc", sha(raw), told_complete=True),
            Sent("after.mrc", sha(raw[:-1] + b"\x02"), told_complete=True),
            Sent("during.mrc", sha(raw[:-1] + b"\x01"))]  # refused: told nothing
    assert replicas.check(told, base_url=a) == []


def test_same_bytes_to_two_replicas_at_once_make_one_dataset(replicas, movie):
    path, _ = movie
    raw = path.read_bytes()
    a, b = replicas.start("a"), replicas.start("b")
    barrier = threading.Barrier(4)
    answers = []

    def upload(base, name):
        barrier.wait()
        answers.append(httpx.put(f"{base}/v1/uploads/{name}", content=raw, timeout=60))
    threads = [threading.Thread(target=upload, args=(base, f"{i}.mrc"))
               for i, base in enumerate((a, b, a, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in answers) == [200, 200, 200, 201]
    assert len({r.json()["dataset"]["id"] for r in answers}) == 1
    assert len(httpx.get(f"{a}/v1/datasets").json()["items"]) == 1


def test_same_conversion_asked_of_two_replicas_is_one_job(replicas, movie):
    path, data = movie
    a, b = replicas.start("a"), replicas.start("b")
    ds_id = httpx.put(f"{a}/v1/uploads/m.mrc", content=path.read_bytes(),
                      timeout=60).json()["dataset"]["id"]
    barrier = threading.Barrier(2)
    answers = []

    def ask(base):
        barrier.wait()
        answers.append(httpx.post(f"{base}/v1/conversions",
                                  json={"dataset_id": ds_id, "mode": 6}, timeout=60))
    threads = [threading.Thread(target=ask, args=(base,)) for base in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {r.status_code for r in answers} == {202}
    job_ids = {r.json()["job"]["id"] for r in answers}
    assert len(job_ids) == 1
    job = wait_for(lambda: job_of(a, job_ids.pop() if len(job_ids) else answers[0].json()
                                  ["job"]["id"]), finished, what="the conversion")
    assert job["state"] == "done"
    result = httpx.get(f"{b}/v1/jobs/{job['id']}/result", timeout=60)
    (replicas.root / "r.mrc").write_bytes(result.content)
    with mrcfile.open(replicas.root / "r.mrc") as m:
        assert m.data.dtype == np.uint16 and np.array_equal(m.data, data)
    conversions = httpx.get(f"{a}/v1/datasets/{ds_id}").json()["storage"]["conversions_bytes"]
    assert conversions == len(result.content)  # one result, counted once


def test_object_store_unreachable_during_an_upload(tmp_path, postgres):
    """Its own SeaweedFS, stopped while an upload streams: a clean 503, no dataset."""
    from tests.servers import start_seaweedfs

    s3 = start_seaweedfs()
    deployment = Replicas(tmp_path, postgres.create_database(), s3.url("gone"), s3)
    try:
        a = deployment.start("a")
        raw = raw_header(nx=2048, ny=2048, nz=40, mode=101) + \
            np.random.default_rng(0).integers(0, 256, size=40 * 2048 * 1024,
                                              dtype=np.uint8).tobytes()
        stopper = threading.Timer(0.5, s3.stop)

        def body():
            stopper.start()
            for i in range(0, len(raw), 1 << 20):
                time.sleep(0.01)
                yield raw[i:i + (1 << 20)]
        response = httpx.put(f"{a}/v1/uploads/lost.mrc", content=body(),
                             headers={"Content-Length": str(len(raw))}, timeout=120)
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "unavailable"
        assert "object store" in response.json()["detail"]
        # Nothing half-written is ever ready: the row stays ``receiving`` (its upload job
        # cleans it up once the store is back) or is gone already.
        items = httpx.get(f"{a}/v1/datasets").json()["items"]
        assert all(item["status"] == "receiving" for item in items), items
        assert httpx.get(f"{a}/healthz").status_code == 503
    finally:
        deployment.stop_all()
        s3.stop()


def test_puts_the_archive_cannot_hold_are_kept_exactly_in_the_bucket(replicas, movie):
    """A PUT has no scratch copy: when its archive is not the stored form, the pass
    rebuilds the file as received from the chunks and tail it put in the bucket, then
    removes those two. A truncated movie (rejected) and noise that does not compress
    (ready) come back byte for byte, and the bucket holds nothing no row names."""
    path, _ = movie
    truncated = path.read_bytes()[:-5000]
    # 12 MiB: its chunks, and the original rebuilt from them, are multipart uploads of
    # three 5 MiB parts (MRC_INGEST_S3_PART_BYTES), read back by ranges across parts
    noise = np.random.default_rng(3).integers(0, 2**32, size=(3, 1024, 1024), dtype=np.uint32)
    noisy = write_raw_mrc(replicas.root / "noise.mrc", noise.view(np.float32), 2)
    assert noisy.stat().st_size > 2 * int(replicas.env["MRC_INGEST_S3_PART_BYTES"])
    a = replicas.start("a")
    told = []
    for name, raw, status in [("truncated.mrc", truncated, "rejected"),
                              ("noise.mrc", noisy.read_bytes(), "ready")]:
        up = httpx.put(f"{a}/v1/uploads/{name}", content=raw, timeout=60)
        assert up.status_code == 201, up.text
        meta = httpx.get(f"{a}/v1/datasets/{up.json()['dataset']['id']}").json()
        assert meta["status"] == status and meta["storage"]["form"] == "original"
        got = httpx.get(f"{a}/v1/datasets/{meta['id']}/download", timeout=60)
        assert got.content == raw
        # the chunks and tail it was rebuilt from went with the commit, before any sweep
        listed = replicas.s3.client().list_objects_v2(
            Bucket=replicas.s3.bucket,
            Prefix=f"{replicas.storage_url.split('/', 3)[3]}/datasets/{meta['id']}/")
        names = sorted(o["Key"].split("/", 4)[4] for o in listed.get("Contents", []))
        assert names == sorted([f"original/{name}"] + (["sum.bin"] if status == "ready"
                                                       else [])), names
        told.append(Sent(name, sha(raw), told_complete=True, valid=status == "ready"))
    assert replicas.check(told, base_url=a) == []
