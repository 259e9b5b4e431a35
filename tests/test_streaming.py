"""Archive-only storage and streaming ingest, through the API.

An upload is ingested while it streams and is ready when the response comes; what is
kept is the MRCZ archive and its restore record (no file as received); the download
"as received" is rebuilt from them with the same SHA-256, length and ETag, and a byte
range decodes only the frames it touches. Faults on the streaming path (a client that
hangs up at any point, a wrong digest, kill -9 mid-stream, a full disk) leave no dataset
and nothing half-written.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import threading
import time

import mrcfile
import numpy as np
import pytest

from service.mrc import reader as reader_mod
from tests.api_helpers import assert_consistent, files_under, make_client, wait_job
from tests.reference import counting_movie, raw_header, slow_pack_4bit, write_raw_mrc
from tests.test_api import error_of


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def movie4(tmp_path):
    """A 4-bit movie with odd nx and non-zero row padding nibbles (20 frames)."""
    counts = counting_movie((20, 64, 95), lam=1.0)
    body = bytearray(b"".join(slow_pack_4bit(f) for f in counts))
    row = 48
    for i in range(20 * 64):
        body[i * row + row - 1] |= (i % 16) << 4
    path = tmp_path / "movie4.mrc"
    path.write_bytes(raw_header(nx=95, ny=64, nz=20, mode=101, cella=(95 * 0.9, 64 * 0.9, 20))
                     + bytes(body))
    return path, counts


@pytest.fixture
def movie16(tmp_path):
    data = np.random.default_rng(1).poisson(2.0, size=(40, 48, 64)).astype(np.int16)
    return write_raw_mrc(tmp_path / "movie16.mrc", data, 1, order=">"), data


def dataset_files(data_dir, dataset_id):
    """The dataset's files, relative to the folder of the pass that committed them (one
    generation: ARCHITECTURE.md)."""
    files = [p.relative_to(data_dir / "datasets" / dataset_id).parts
             for p in files_under(data_dir / "datasets" / dataset_id)]
    assert len({parts[0] for parts in files}) <= 1, files  # one pass's objects, no other
    return sorted("/".join(parts[1:]) for parts in files)


def test_put_is_ready_on_response_and_keeps_only_the_archive(tmp_path, movie4):
    path, counts = movie4
    raw = path.read_bytes()
    with make_client(tmp_path / "data") as c:
        response = c.put("/v1/uploads/movie4.mrc", content=raw)
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["dataset"]["status"] == "ready" and body["job"]["kind"] == "upload"
        assert body["job"]["state"] == "done"
        ds = c.get(response.headers["location"]).json()
        assert ds["sha256"] == sha(raw) and ds["size_bytes"] == len(raw)
        assert ds["archive"]["restorable"] is True and ds["archive"]["reason"] is None
        assert ds["archive"]["mode"] == 0 and ds["archive"]["codec"] == "zstd"
        assert dataset_files(tmp_path / "data", ds["id"]) == ["archive.mrcz", "restore.npz",
                                                             "sum.bin"]
        stored = sum(p.stat().st_size for p in files_under(tmp_path / "data" / "datasets"))
        assert ds["stored_bytes"] == stored and stored < len(raw)
        assert ds["storage_ratio"] == pytest.approx(stored / len(raw), abs=1e-4)
        assert ds["stats"]["dmax"] == counts.max() and ds["frames"] == 20

        whole = c.get(f"/v1/datasets/{ds['id']}/download")
        assert whole.status_code == 200 and whole.content == raw
        assert whole.headers["content-length"] == str(len(raw))
        assert whole.headers["etag"] == f'"{sha(raw)}"'
        assert whole.headers["content-disposition"] == 'attachment; filename="movie4.mrc"'
        again = c.get(f"/v1/datasets/{ds['id']}/download",
                      headers={"If-None-Match": whole.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    assert_consistent(tmp_path / "data")


def test_ranges_match_slices_of_the_file(tmp_path, movie4):
    path, _ = movie4
    raw = path.read_bytes()
    frame = 48 * 64
    with make_client(tmp_path / "data") as c:
        ds = c.put("/v1/uploads/m.mrc", content=raw).json()["dataset"]
        url = f"/v1/datasets/{ds['id']}/download"
        for first, last in [(0, 1023), (1000, 1100), (1024, 1024 + frame - 1),
                            (1024 + frame - 10, 1024 + frame + 10),
                            (1024 + 5 * frame + 7, 1024 + 9 * frame + 3),
                            (len(raw) - 100, len(raw) - 1)]:
            part = c.get(url, headers={"Range": f"bytes={first}-{last}"})
            assert part.status_code == 206
            assert part.content == raw[first:last + 1], (first, last)
            assert part.headers["content-range"] == f"bytes {first}-{last}/{len(raw)}"
        assert c.get(url, headers={"Range": "bytes=-300"}).content == raw[-300:]
        assert c.get(url, headers={"Range": f"bytes={len(raw) - 5}-"}).content == raw[-5:]
        beyond = c.get(url, headers={"Range": f"bytes={len(raw)}-"})
        detail = error_of(beyond, 416, "range_not_satisfiable")
        assert "outside" in detail and beyond.headers["content-range"] == f"bytes */{len(raw)}"
        error_of(c.get(url, headers={"Range": "lines=1-2"}), 400, "bad_request")
        stale = c.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
        assert stale.status_code == 200 and stale.content == raw  # If-Range mismatch: whole


def test_a_range_decodes_only_the_frames_it_touches(tmp_path, movie16, monkeypatch):
    path, data = movie16
    raw = path.read_bytes()
    frame = 48 * 64 * 2
    with make_client(tmp_path / "data") as c:
        ds = c.put("/v1/uploads/m.mrc", content=raw).json()["dataset"]
        read = []
        real = reader_mod.MrcFile.read_frame
        monkeypatch.setattr(reader_mod.MrcFile, "read_frame",
                            lambda self, k, out=None: (read.append(k), real(self, k, out))[1])
        start = 1024 + 37 * frame + 100
        part = c.get(f"/v1/datasets/{ds['id']}/download",
                     headers={"Range": f"bytes={start}-{start + 4095}"})
        assert part.content == raw[start:start + 4096]
        assert read == [37]


def test_rebuilt_big_endian_file_reads_in_mrcfile(tmp_path, movie16):
    path, data = movie16
    with make_client(tmp_path / "data") as c:
        ds = c.put("/v1/uploads/m.mrc", content=path.read_bytes()).json()["dataset"]
        out = tmp_path / "back.mrc"
        out.write_bytes(c.get(f"/v1/datasets/{ds['id']}/download").content)
    with mrcfile.open(out) as m:
        assert m.data.dtype == np.dtype(">i2") and np.array_equal(m.data, data)


def test_multipart_and_upload_with_conversion_stream_too(tmp_path, movie4):
    path, counts = movie4
    raw = path.read_bytes()
    with make_client(tmp_path / "data") as c:
        up = c.post("/v1/uploads", files={"file": ("mp.mrc", raw)})
        assert up.status_code == 201 and up.json()["dataset"]["status"] == "ready"
        assert up.json()["dataset"]["name"] == "mp.mrc"
        conv = c.post("/v1/conversions", params={"mode": 1},
                      files={"file": ("other.mrc", raw[:1024] + raw[1024:])})
        assert conv.status_code == 202 and conv.json()["duplicate"] is True
        job = wait_job(c, conv.json()["job"]["id"])
        assert job["state"] == "done", job
        result = c.get(f"/v1/jobs/{job['id']}/result")
        out = tmp_path / "c.mrc"
        out.write_bytes(result.content)
        with mrcfile.open(out) as m:
            assert m.data.dtype == np.int16 and np.array_equal(m.data, counts)


def test_keep_original_setting_keeps_the_file_as_received(tmp_path, movie4):
    path, _ = movie4
    raw = path.read_bytes()
    with make_client(tmp_path / "data", keep_original=True) as c:
        ds = c.put("/v1/uploads/m.mrc", content=raw).json()["dataset"]
        assert dataset_files(tmp_path / "data", ds["id"]) == [
            "archive.mrcz", "original/m.mrc", "restore.npz", "sum.bin"]
        (original,) = (tmp_path / "data" / "datasets" / ds["id"]).glob("*/original/m.mrc")
        assert original.read_bytes() == raw
        assert c.get(f"/v1/datasets/{ds['id']}/download").content == raw


def test_storage_accounting_counts_conversions_and_reaches_metrics(tmp_path, movie4):
    path, _ = movie4
    raw = path.read_bytes()
    with make_client(tmp_path / "data") as c:
        ds = c.put("/v1/uploads/m.mrc", content=raw).json()["dataset"]
        before = c.get(f"/v1/datasets/{ds['id']}").json()
        converted = c.get(f"/v1/datasets/{ds['id']}/download", params={"mode": 6})
        after = c.get(f"/v1/datasets/{ds['id']}").json()
        assert after["stored_bytes"] == before["stored_bytes"] + len(converted.content)
        assert after["storage"]["conversions_bytes"] == len(converted.content)
        metrics = c.get("/metrics").text
        assert f"mrc_ingest_received_bytes {float(len(raw))}" in metrics
        assert f"mrc_ingest_stored_bytes {float(after['stored_bytes'])}" in metrics
        listing = c.get("/v1/datasets").json()["items"][0]
        assert listing["stored_bytes"] == after["stored_bytes"]
        assert listing["storage_ratio"] == pytest.approx(after["stored_bytes"] / len(raw),
                                                         abs=1e-4)


def test_registration_reads_its_file_once_and_never_touches_it(tmp_path, movie4,
                                                               monkeypatch):
    path, _ = movie4
    shared = tmp_path / "shared"
    shared.mkdir()
    registered = shared / "scope.mrc"
    registered.write_bytes(path.read_bytes())
    before = registered.stat()
    opened = []
    real_open, real_os_open = builtins.open, os.open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(registered):
            opened.append("open")
        return real_open(file, *args, **kwargs)

    def counting_os_open(file, *args, **kwargs):
        # shared storage is opened walking from the root (service/roots.py): by name
        if str(file) == str(registered) or (str(file) == registered.name
                                            and kwargs.get("dir_fd") is not None):
            opened.append("os.open")
        return real_os_open(file, *args, **kwargs)
    with make_client(tmp_path / "data", allowed_roots=[shared]) as c:
        monkeypatch.setattr(builtins, "open", counting_open)
        monkeypatch.setattr(os, "open", counting_os_open)
        reg = c.post("/v1/registrations", json={"path": str(registered)})
        assert reg.status_code == 202
        wait_job(c, reg.json()["job"]["id"])
        ds = c.get(reg.headers["location"]).json()
        assert ds["status"] == "ready" and ds["sha256"] == sha(path.read_bytes())
        assert ds["archive"]["restorable"] is True
        assert c.get(f"/v1/datasets/{ds['id']}/frames/3.png").status_code == 200
        assert c.get(f"/v1/datasets/{ds['id']}/download").content == path.read_bytes()
        monkeypatch.undo()
        # one open to record its identity at registration, one to read it once (hash,
        # frames, archive in one pass)
        assert opened == ["os.open", "os.open"], opened
        assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 200
    after = registered.stat()
    assert registered.read_bytes() == path.read_bytes()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_an_unprovable_restore_keeps_the_original(tmp_path, movie4, monkeypatch):
    from service.mrc import restore as restore_mod
    real = restore_mod.restore_frame

    def wrong(values, source, padding=None, out=None):
        out = real(values, source, padding, out).copy()
        out[-1] ^= 0x80
        return out
    monkeypatch.setattr("service.mrc.archiver.restore_frame", wrong)
    path, _ = movie4
    raw = path.read_bytes()
    with make_client(tmp_path / "data") as c:
        ds = c.put("/v1/uploads/m.mrc", content=raw).json()["dataset"]
        detail = c.get(f"/v1/datasets/{ds['id']}").json()
        assert detail["status"] == "ready"
        assert detail["archive"]["restorable"] is False
        assert detail["archive"]["reason"].startswith("restore not proven: frame 0")
        assert dataset_files(tmp_path / "data", ds["id"]) == ["original/m.mrc", "sum.bin"]
        assert c.get(f"/v1/datasets/{ds['id']}/download").content == raw
        assert c.get(f"/v1/datasets/{ds['id']}/frames/2.png").status_code == 200
    assert_consistent(tmp_path / "data")


def test_verify_job_rebuilds_and_checks_the_sha256(tmp_path, movie4):
    path, _ = movie4
    with make_client(tmp_path / "data") as c:
        ds = c.put("/v1/uploads/m.mrc", content=path.read_bytes()).json()["dataset"]
        job = c.post(f"/v1/datasets/{ds['id']}/verify")
        assert job.status_code == 202
        done = wait_job(c, job.json()["id"])
        assert done["state"] == "done" and done["result"]["match"] is True
        assert done["result"]["sha256"] == ds["sha256"] and done["result"]["form"] == "archive"


def test_same_bytes_uploaded_at_once_give_one_dataset(tmp_path, movie4):
    path, _ = movie4
    raw = path.read_bytes()
    with make_client(tmp_path / "data") as c:
        results = []

        def upload(i):
            results.append(c.put(f"/v1/uploads/copy{i}.mrc", content=raw))
        threads = [threading.Thread(target=upload, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ids = {r.json()["dataset"]["id"] for r in results}
        assert len(ids) == 1
        assert sorted(r.status_code for r in results) == [200] * 5 + [201]
        assert len(c.get("/v1/datasets").json()["items"]) == 1
    assert_consistent(tmp_path / "data")


def test_digest_mismatch_leaves_nothing(tmp_path, movie4):
    path, _ = movie4
    with make_client(tmp_path / "data") as c:
        bad = c.put("/v1/uploads/m.mrc", content=path.read_bytes(),
                    headers={"X-Content-SHA256": "0" * 64})
        assert "the client said" in error_of(bad, 400, "digest_mismatch")
        assert c.get("/v1/datasets").json()["items"] == []
    assert files_under(tmp_path / "data" / "datasets") == []
    assert_consistent(tmp_path / "data")


def test_legacy_datasets_keep_working(tmp_path, movie4):
    """A dataset stored before archive-only storage (the file as received at an absolute
    path, an archive copy beside it) is still served, previewed and converted."""
    from service.catalog import Catalog
    from service.config import Settings

    path, counts = movie4
    raw = path.read_bytes()
    data_dir = tmp_path / "data"
    with make_client(data_dir):
        pass  # creates the catalog
    folder = data_dir / "datasets" / "legacy0000000000001"
    folder.mkdir(parents=True)
    (folder / "old.mrc").write_bytes(raw)
    from service import mrc
    mrc.convert(path, folder / "archive.mrcz", mrc.Target(mode=0, codec=mrc.Codec.ZSTD))
    np.save(folder / "sum.npy", counts.sum(axis=0).astype(np.float64))
    catalog = Catalog(Settings(data_dir=data_dir).catalog_url)
    catalog.add_dataset(id="legacy0000000000001", name="old.mrc", source="upload",
                        status="ready", size_bytes=len(raw), sha256=sha(raw),
                        path=str((folder / "old.mrc").resolve()), mode=101, nx=95, ny=64,
                        nz=20, stored_bytes=1, info={
                            "archive": {"mode": 0, "codec": "zstd", "clevel": 1},
                            "default_mode": 0, "stats": {"dmin": 0.0, "dmax": 15.0,
                                                         "dmean": 1.0, "rms": 1.0}})
    catalog.close()
    with make_client(data_dir) as c:
        base = "/v1/datasets/legacy0000000000001"
        assert c.get(f"{base}/download").content == raw
        assert c.get(f"{base}/frames/4.png").status_code == 200
        assert c.get(f"{base}/sum.png").status_code == 200, c.get(f"{base}/sum.png").text
        converted = c.get(f"{base}/download", params={"mode": 6})
        out = tmp_path / "legacy6.mrc"
        out.write_bytes(converted.content)
        with mrcfile.open(out) as m:
            assert np.array_equal(m.data, counts)
        assert c.get(f"{base}/download", params={"format": "mrcz"}).content == \
            (folder / "archive.mrcz").read_bytes()


def test_an_ingest_that_lost_its_lease_writes_nothing_and_removes_only_its_own(tmp_path,
                                                                              movie4):
    """Fencing: the job is claimed again (another claim, the next fencing token) just
    before this claim commits. The commit is refused, the dataset is not marked failed,
    and the loser removes only the objects of its own generation: none of the new
    claim's keys."""
    from service.catalog import jobs as jobs_table

    path, _ = movie4
    shared = tmp_path / "shared"
    shared.mkdir()
    registered = shared / "scope.mrc"
    registered.write_bytes(path.read_bytes())
    with make_client(tmp_path / "data", allowed_roots=[shared]) as c:
        service = c.app.state.service
        real_finalize = service.pipeline.deps.finalize
        stolen = threading.Event()

        def finalize_after_a_takeover(dataset_id, *args, **kwargs):
            with service.catalog.engine.begin() as conn:  # another worker took it over
                conn.execute(jobs_table.update().where(jobs_table.c.dataset_id == dataset_id)
                             .values(lease_owner="another-worker",
                                     attempts=jobs_table.c.attempts + 1))
            # ... and stored its own generation meanwhile
            service.storage.store.put_bytes(f"datasets/{dataset_id}/0ther000/archive.mrcz",
                                            b"the new claim's")
            stolen.set()
            return real_finalize(dataset_id, *args, **kwargs)
        service.pipeline.deps.finalize = finalize_after_a_takeover
        reg = c.post("/v1/registrations", json={"path": str(registered)}).json()
        dataset_id = reg["dataset"]["id"]
        assert stolen.wait(30)
        time.sleep(1.0)  # the loser handles the refusal (before the fix: failed, cleaned)
        ds = c.get(f"/v1/datasets/{dataset_id}").json()
        assert ds["status"] == "processing", ds  # not "failed", not committed by the loser
        keys = {info.key for info in service.storage.store.list(f"datasets/{dataset_id}/")}
        assert keys == {f"datasets/{dataset_id}/0ther000/archive.mrcz"}  # only the new's
        job = service.catalog.get_job(reg["job"]["id"])
        assert job["state"] == "running" and job["lease_owner"] == "another-worker"
        service.pipeline.deps.finalize = real_finalize
