"""Operations: JSON log lines per request and per job transition (with ids), and the
Prometheus metrics operators graph (uploads, bytes, jobs, conversion bytes, previews)."""

from __future__ import annotations

import json

import httpx

from tests.api_helpers import make_client, start_server, upload_and_wait, wait_job
from tests.reference import counting_movie, write_raw_mrc


def test_json_log_lines_for_requests_and_jobs(tmp_path):
    movie = write_raw_mrc(tmp_path / "m.mrc", counting_movie((3, 32, 32)), 101)
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc, base = start_server(tmp_path / "data", stderr=log)
        try:
            with httpx.Client(base_url=base) as c:
                up = c.put("/v1/uploads/m.mrc", content=movie.read_bytes()).json()
                wait_job(c, up["job"]["id"])
                c.get(f"/v1/datasets/{up['dataset']['id']}")
                c.get("/v1/datasets/nope")
        finally:
            proc.terminate()
            proc.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    requests = [e for e in lines if e["message"] == "request"]
    put = next(e for e in requests if e["method"] == "PUT")
    assert put["route"] == "/v1/uploads/{filename}" and put["status"] == 201 and put["ms"] > 0
    detail = next(e for e in requests if e["path"] == f"/v1/datasets/{up['dataset']['id']}")
    assert detail["dataset_id"] == up["dataset"]["id"] and detail["status"] == 200
    assert any(e["status"] == 404 and e["dataset_id"] == "nope" for e in requests)
    jobs = [e for e in lines if e["logger"] == "mrc_ingest.jobs"]
    assert [e["message"] for e in jobs] == ["job running", "job done"]
    assert all(e["job_id"] == up["job"]["id"] and e["dataset_id"] == up["dataset"]["id"]
               and e["kind"] == "upload" for e in jobs)
    assert jobs[1]["seconds"] > 0


def test_metrics_operators_graph(tmp_path):
    movie = write_raw_mrc(tmp_path / "m.mrc", counting_movie((3, 32, 32)), 101)
    with make_client(tmp_path / "data") as c:
        ds = upload_and_wait(c, movie)
        c.get(f"/v1/datasets/{ds['id']}/frames/0.png")
        c.get(f"/v1/datasets/{ds['id']}/frames/0.png")
        c.get(f"/v1/datasets/{ds['id']}/download", params={"mode": 1})
        text = c.get("/metrics").text
    assert f'mrc_ingest_upload_bytes_total {float(movie.stat().st_size)}' in text
    kept = ds["stored_bytes"] - ds["storage"]["conversions_bytes"]  # written at upload
    assert f'mrc_ingest_converted_bytes_total{{kind="upload"}} {float(kept)}' in text
    assert 'mrc_ingest_converted_bytes_total{kind="convert"}' in text
    assert 'mrc_ingest_preview_seconds_count{cached="false",kind="frame"} 1.0' in text
    assert 'mrc_ingest_preview_seconds_count{cached="true",kind="frame"} 1.0' in text
    assert 'mrc_ingest_jobs{state="done"} 2.0' in text
    received = float(movie.stat().st_size)
    assert f"mrc_ingest_received_bytes {received}" in text
    assert f"mrc_ingest_stored_bytes {float(ds['stored_bytes'])}" not in text  # + conversion
    assert "mrc_ingest_storage_ratio " in text
    assert "mrc_ingest_queue_depth 0.0" in text
    assert 'mrc_ingest_job_seconds_count{kind="convert"} 1.0' in text
