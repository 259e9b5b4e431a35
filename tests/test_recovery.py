"""Restart recovery: jobs that were queued or running when the service stopped are
re-run at the next start, and temporary files a crash left behind are removed."""

from __future__ import annotations

import mrcfile
import mrcz
import numpy as np

from service.catalog import Catalog
from service.config import Settings
from tests.api_helpers import assert_consistent, make_client, upload_and_wait, wait_job
from tests.reference import counting_movie, write_raw_mrc


def test_interrupted_jobs_rerun_and_stale_temp_files_go(tmp_path):
    data = counting_movie((4, 32, 40))
    movie = write_raw_mrc(tmp_path / "m.mrc", data, 101)
    with make_client(tmp_path / "data") as c:
        ds = upload_and_wait(c, movie)
    assert ds["status"] == "ready"
    data_dir = tmp_path / "data"
    archive = data_dir / "datasets" / ds["id"] / "archive.mrcz"
    # Simulate a crash mid-ingest: the archive not yet renamed into place, a partial temp
    # file beside it, an upload cut off in incoming/, the rows still saying "running".
    archive.unlink()
    stale = [data_dir / "datasets" / ds["id"] / ".archive.mrcz.0123456789ab.part",
             data_dir / "incoming" / "abc.part"]
    for path in stale:
        path.write_bytes(b"partial")
    catalog = Catalog(Settings(data_dir=data_dir).catalog_url)
    catalog.update_dataset(ds["id"], status="processing")
    ingest_job = ds["jobs"][0]["id"]
    catalog.update_job(ingest_job, state="running", done=2, finished_at=None)
    convert = catalog.add_job(id="convertjob1", kind="convert", dataset_id=ds["id"],
                              target={"mode": 1, "codec": "none", "clevel": 1,
                                      "byte_order": "<"})
    catalog.close()

    with make_client(data_dir) as c:
        assert wait_job(c, ingest_job)["state"] == "done"
        assert wait_job(c, convert["id"])["state"] == "done"
        again = c.get(f"/v1/datasets/{ds['id']}").json()
        assert again["status"] == "ready"
        assert again["sha256"] == ds["sha256"]
        result = c.get(f"/v1/jobs/{convert['id']}/result")
        assert result.status_code == 200
    assert not any(p.exists() for p in stale)
    assert_consistent(data_dir)
    values, _ = mrcz.readMRC(str(archive))
    assert np.array_equal(values, data)


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
        out = tmp_path / "out.mrc"
        out.write_bytes(c.get(job["links"]["result"]).content)
    with mrcfile.open(str(out)) as m:
        assert m.data.dtype == np.uint16 and np.array_equal(m.data, data)
