"""Restart recovery: jobs that were queued or running when the service stopped are
re-run at the next start, and temporary files a crash left behind are removed."""

from __future__ import annotations

import hashlib

import mrcfile
import mrcz
import numpy as np
import pytest

from service.catalog import Catalog
from service.config import Settings
from tests.api_helpers import assert_consistent, make_client, wait_job
from tests.reference import counting_movie, write_raw_mrc
from tests.test_api import error_of


def test_interrupted_jobs_rerun_and_stale_temp_files_go(tmp_path):
    """A crash during a registration's ingest, a conversion still queued, and an upload
    that was streaming: at the next start the ingest runs again from its file, the
    conversion runs, the cut-off upload leaves nothing, and temporaries are gone."""
    data = counting_movie((4, 128, 160))
    shared = tmp_path / "shared"
    shared.mkdir()
    movie = write_raw_mrc(shared / "m.mrc", data, 101)
    data_dir = tmp_path / "data"
    with make_client(data_dir, allowed_roots=[shared]) as c:
        reg = c.post("/v1/registrations", json={"path": str(movie)})
        wait_job(c, reg.json()["job"]["id"])
        ds = c.get(reg.headers["location"]).json()
    assert ds["status"] == "ready"
    (archive,) = (data_dir / "datasets" / ds["id"]).glob("*/archive.mrcz")
    # Simulate the crash: the archive not yet renamed into place, a partial temp file
    # beside it, a scratch copy of an upload in incoming/, the rows still "running".
    archive.unlink()
    stale = [data_dir / "datasets" / ds["id"] / ".archive.mrcz.0123456789ab.part",
             data_dir / "incoming" / ".upload.abcdef012345.part"]
    for path in stale:
        path.write_bytes(b"partial")
    catalog = Catalog(Settings(data_dir=data_dir).catalog_url)
    catalog.update_dataset(ds["id"], status="processing")
    ingest_job = ds["jobs"][0]["id"]
    catalog.update_job(ingest_job, state="running", done=2, finished_at=None)
    convert = catalog.add_job(id="convertjob1", kind="convert", dataset_id=ds["id"],
                              target={"mode": 1, "codec": "none", "clevel": 1,
                                      "byte_order": "<"})
    catalog.add_dataset(id="cutoffupload0000001", name="cut.mrc", source="upload",
                        status="receiving", size_bytes=10**9, path="", info={})
    catalog.add_job(id="uploadjob1", kind="upload", dataset_id="cutoffupload0000001",
                    state="running")
    catalog.close()

    with make_client(data_dir, allowed_roots=[shared]) as c:
        rerun = wait_job(c, ingest_job)
        assert (rerun["state"], rerun["error"]) == ("done", None)
        assert rerun["progress"]["done"] == rerun["progress"]["total"] == movie.stat().st_size
        assert rerun["result"]["status"] == "ready"
        converted = wait_job(c, convert["id"])
        assert (converted["state"], converted["error"]) == ("done", None)
        assert converted["target"]["mode"] == 1 and converted["dataset_id"] == ds["id"]
        again = c.get(f"/v1/datasets/{ds['id']}").json()
        assert again["status"] == "ready" and again["findings"] == []
        assert again["sha256"] == ds["sha256"] == hashlib.sha256(movie.read_bytes()).hexdigest()
        assert again["stats"] == ds["stats"]
        expected = data.astype(np.float64)
        assert (again["stats"]["dmin"], again["stats"]["dmax"]) == (expected.min(),
                                                                    expected.max())
        assert again["stats"]["dmean"] == pytest.approx(expected.mean(), rel=1e-12)
        assert again["stats"]["rms"] == pytest.approx(expected.std(), rel=1e-12)
        # the re-run wrote (and committed) a generation of its own
        (rewritten,) = [a for a in (data_dir / "datasets" / ds["id"]).glob("*/archive.mrcz")
                        if a.parent != archive.parent]
        assert again["archive"]["bytes"] == rewritten.stat().st_size
        assert error_of(c.get("/v1/datasets/cutoffupload0000001"), 404, "not_found")
        assert error_of(c.get("/v1/jobs/uploadjob1"), 404, "not_found")
        result = c.get(f"/v1/jobs/{convert['id']}/result")
        assert result.status_code == 200, result.text
        assert converted["result"]["bytes"] == len(result.content)
        (tmp_path / "result.mrc").write_bytes(result.content)
    with mrcfile.open(str(tmp_path / "result.mrc")) as m:  # the recovered conversion
        assert m.header.mode == 1 and m.data.dtype == np.int16
        np.testing.assert_array_equal(m.data, data)
    assert not any(p.exists() for p in stale)
    assert_consistent(data_dir)
    values, _ = mrcz.readMRC(str(rewritten))  # the archive the re-run wrote
    assert values.dtype == np.int8 and np.array_equal(values, data)


def test_conversion_requested_during_ingest_waits_for_it(tmp_path):
    """A conversion queued before its dataset is ready runs once the ingest finishes."""
    data = counting_movie((30, 256, 256))
    movie = write_raw_mrc(tmp_path / "m.mrc", data, 101)
    with make_client(tmp_path / "data", workers=3) as c:
        response = c.post("/v1/conversions", params={"mode": 6},
                          files={"file": ("m.mrc", movie.read_bytes())})
        job = wait_job(c, response.json()["job"]["id"])
        assert job["state"] == "done", job
        assert c.get(f"/v1/datasets/{job['dataset_id']}").json()["status"] == "ready"
        assert job["error"] is None and job["target"]["mode"] == 6
        jobs = c.get(f"/v1/datasets/{job['dataset_id']}").json()["jobs"]
        assert [j["state"] for j in jobs] == ["done", "done"]  # the upload and this one
        assert [j["id"] for j in jobs if j["kind"] == "convert"] == [job["id"]]
        out = tmp_path / "out.mrc"
        out.write_bytes(c.get(job["links"]["result"]).content)
    with mrcfile.open(str(out)) as m:
        assert m.header.mode == 6
        assert m.data.dtype == np.uint16 and np.array_equal(m.data, data)
