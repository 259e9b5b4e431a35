"""Faults: a full disk at every place we write, and a server killed with SIGKILL in the
middle of a conversion. After each, the catalog and the data folder agree, nothing
partial is visible, what was stored before is untouched, and the service answers."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time

import httpx
import mrcfile
import numpy as np
import pytest

from service.mrc.writer import MrcWriter
from tests.api_helpers import (assert_consistent, files_under, make_client, start_server,
                               upload_and_wait, wait_job)
from tests.reference import counting_movie, raw_header, write_raw_mrc


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class DiskFullOs:
    """``os`` as the upload sink sees it, on a disk with no room left for data."""
    write = writev = staticmethod(disk_full)

    def __getattr__(self, name):
        return getattr(os, name)


def temp_files(data_dir):
    return [p for p in files_under(data_dir) if p.name.endswith(".part")]


@pytest.fixture
def movie(tmp_path):
    data = counting_movie((6, 64, 64))
    return write_raw_mrc(tmp_path / "m.mrc", data, 101), data


def test_disk_full_during_upload(tmp_path, movie, monkeypatch):
    path, _ = movie
    with make_client(tmp_path / "data") as c:
        stored = upload_and_wait(c, path, name="first.mrc")
        first_file = tmp_path / "data" / "datasets" / stored["id"] / "first.mrc"
        monkeypatch.setattr("service.uploads.os", DiskFullOs())
        other = write_raw_mrc(tmp_path / "o.mrc", counting_movie((2, 8, 8), seed=3), 101)
        response = c.put("/v1/uploads/second.mrc", content=other.read_bytes())
        assert response.status_code == 507
        assert response.json()["error"] == "insufficient_storage"
        assert "disk is full" in response.json()["detail"]
        assert files_under(tmp_path / "data" / "incoming") == []
        assert [d["id"] for d in c.get("/v1/datasets").json()["items"]] == [stored["id"]]
        assert hashlib.sha256(first_file.read_bytes()).hexdigest() == stored["sha256"]
        assert c.get("/healthz").status_code == 200
    assert_consistent(tmp_path / "data")


def test_disk_full_during_ingest_archive(tmp_path, movie, monkeypatch):
    path, _ = movie
    monkeypatch.setattr(MrcWriter, "_encode_and_write", disk_full)
    with make_client(tmp_path / "data") as c:
        response = c.put("/v1/uploads/m.mrc", content=path.read_bytes())
        job = wait_job(c, response.json()["job"]["id"])
        assert job["state"] == "failed"
        assert job["error"]["error"] == "insufficient_storage"
        ds = c.get(response.headers["location"]).json()
        assert ds["status"] == "failed" and ds["error"]["error"] == "insufficient_storage"
        received = tmp_path / "data" / "datasets" / ds["id"] / "m.mrc"
        assert received.read_bytes() == path.read_bytes()  # the input is untouched
        assert not (received.parent / "archive.mrcz").exists()
        assert temp_files(tmp_path / "data") == []
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/datasets", params={"status": "failed"}).json()["items"]
    assert_consistent(tmp_path / "data")


def test_disk_full_during_a_download_conversion(tmp_path, movie, monkeypatch):
    path, _ = movie
    with make_client(tmp_path / "data") as c:
        ds = upload_and_wait(c, path)
        monkeypatch.setattr(MrcWriter, "_encode_and_write", disk_full)
        response = c.get(f"/v1/datasets/{ds['id']}/download", params={"mode": 1})
        assert response.status_code == 507
        assert response.json()["error"] == "insufficient_storage"
        assert files_under(tmp_path / "data" / "conversions") == []
        assert temp_files(tmp_path / "data") == []
        monkeypatch.undo()
        again = c.get(f"/v1/datasets/{ds['id']}/download", params={"mode": 1})
        assert again.status_code == 200  # and it recovers once there is room
    assert_consistent(tmp_path / "data")


def test_sigkill_mid_conversion_then_restart(tmp_path):
    """A real server process, killed -9 while a conversion writes; after a restart the
    job completes and no partial output was ever visible under a final name."""
    frames, n = 48, 2048
    data_dir = tmp_path / "data"
    movie = tmp_path / "big.mrc"
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 16, size=(frames, n, n), dtype=np.uint8)
    with open(movie, "wb") as f:
        f.write(raw_header(nx=n, ny=n, nz=frames, mode=101))
        f.write((counts[:, :, 0::2] | (counts[:, :, 1::2] << 4)).tobytes())
    proc, base = start_server(data_dir)
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            up = client.put("/v1/uploads/big.mrc", content=movie.read_bytes())
            wait_job(client, up.json()["job"]["id"])
            ds_id = up.json()["dataset"]["id"]
            conv = client.post("/v1/conversions", json={"dataset_id": ds_id, "mode": 2})
            job_id = conv.json()["job"]["id"]
            deadline = time.monotonic() + 60
            while True:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["state"] == "running" and job["progress"]["done"] >= 2:
                    break
                assert job["state"] in ("queued", "running") and time.monotonic() < deadline
                time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    conversions = data_dir / "conversions" / ds_id
    finals = [p for p in conversions.glob("*.mrc")] if conversions.exists() else []
    assert finals == [], "a partial conversion is visible under its final name"
    assert temp_files(data_dir), "the kill should have interrupted a write in progress"

    proc, base = start_server(data_dir)
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            job = wait_job(client, job_id, timeout=120)
            assert job["state"] == "done", job
            result = client.get(f"/v1/jobs/{job_id}/result")
            assert result.status_code == 200
            out = tmp_path / "out.mrc"
            out.write_bytes(result.content)
            assert client.get(f"/v1/datasets/{ds_id}").json()["status"] == "ready"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert_consistent(data_dir)
    with mrcfile.mmap(str(out)) as m:
        assert m.data.dtype == np.float32 and m.data.shape == (frames, n, n)
        assert np.array_equal(m.data[frames - 1], counts[frames - 1])
