"""The commit protocol's promises that are not crash points (ARCHITECTURE.md): a DELETE of
a dataset still streaming answers at once and stops the stream, objects before rows; one
process per embedded catalog; a tus upload's bytes are released only by the protocol
(and never before its dataset is committed). Real servers, real clients."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.api_helpers import make_client, run_recover, start_server
from tests.conftest import clean_environment
from tests.invariants import Place, check
from tests.reference import counting_movie, write_raw_mrc

TUS = {"Tus-Resumable": "1.0.0"}


def test_delete_of_a_streaming_dataset_answers_at_once_and_stops_it(tmp_path):
    data = counting_movie((40, 1024, 1024))
    movie = write_raw_mrc(tmp_path / "slow.mrc", data, 101)
    raw = movie.read_bytes()
    proc, base = start_server(tmp_path / "data")
    outcome: dict = {}

    def slow_body():
        for start in range(0, len(raw), 1 << 20):
            yield raw[start:start + (1 << 20)]
            time.sleep(0.05)  # ~1 s per 20 MiB: the upload streams for a while

    def upload() -> None:
        try:
            outcome["response"] = httpx.put(f"{base}/v1/uploads/slow.mrc", content=slow_body(),
                                            headers={"Content-Length": str(len(raw))},
                                            timeout=120)
        except httpx.TransportError as exc:
            outcome["error"] = exc
    try:
        client = threading.Thread(target=upload)
        client.start()
        deadline = time.monotonic() + 30
        while not (items := httpx.get(f"{base}/v1/datasets").json()["items"]):
            assert time.monotonic() < deadline, "the upload never showed up"
            time.sleep(0.05)
        assert items[0]["status"] == "receiving"
        started = time.perf_counter()
        deleted = httpx.delete(f"{base}/v1/datasets/{items[0]['id']}", timeout=30)
        took = time.perf_counter() - started
        assert deleted.status_code == 200, deleted.text
        assert took < 5.0, f"DELETE took {took:.1f} s"  # promptly, not after the stream
        assert httpx.get(f"{base}/v1/datasets/{items[0]['id']}").status_code == 404
        assert httpx.get(f"{base}/v1/datasets").json()["items"] == []  # hidden at once
        client.join(120)
        response = outcome.get("response")
        assert response is None or response.status_code == 409, response.text
    finally:
        proc.terminate()
        proc.wait(30)
    data_dir = tmp_path / "data"
    run_recover(data_dir)
    place = Place(f"sqlite:///{data_dir.resolve() / 'catalog.sqlite3'}", data_dir=data_dir)
    assert place.datasets() == []  # the tombstone finished: objects first, then the row
    assert check(place, []) == []


def test_a_second_process_on_one_embedded_catalog_is_refused(tmp_path):
    data = tmp_path / "data"
    proc, _ = start_server(data)
    try:
        for command in ("serve", "worker", "recover"):
            second = subprocess.run(
                [sys.executable, "-m", "service.cli", command, "--data-dir", str(data)],
                env=clean_environment({"MRC_INGEST_PORT": "1"}), capture_output=True,
                text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
            assert second.returncode == 1, (command, second.stderr)
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "another mrc-ingest process" in lines[0] \
                and str(proc.pid) in lines[0], (command, second.stderr)
    finally:
        proc.terminate()
        proc.wait(30)
    # once the first is gone, the folder is free again
    proc, base = start_server(data)
    proc.terminate()
    proc.wait(30)


def test_tus_bytes_stay_until_the_dataset_is_committed_then_go(tmp_path):
    """The handler never deletes an upload's bytes: after the last PATCH the dataset is
    committed (upload completed in the same transaction) and only then released."""
    movie = write_raw_mrc(tmp_path / "m.mrc", counting_movie((4, 64, 96)), 101)
    raw = movie.read_bytes()
    with make_client(tmp_path / "data") as c:
        url = c.post("/v1/tus/", headers={**TUS, "Upload-Length": str(len(raw))}) \
            .headers["location"]
        upload_id = url.rsplit("/", 1)[1]
        tus_file = tmp_path / "data" / "tus" / f"{upload_id}.tus"
        half = len(raw) // 2
        assert c.patch(url, content=raw[:half], headers={
            **TUS, "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream"}).status_code == 204
        assert tus_file.stat().st_size == half
        done = c.patch(url, content=raw[half:], headers={
            **TUS, "Upload-Offset": str(half),
            "Content-Type": "application/offset+octet-stream"})
        assert done.status_code == 204
        row = c.app.state.service.catalog.get_tus_upload(upload_id)
        assert row["completed_at"] is not None and row["released_at"] is not None
        assert row["completed_at"] <= row["released_at"]
        assert not tus_file.exists()
        ds = c.get(done.headers["mrc-ingest-dataset"]).json()
        assert ds["status"] == "ready"
        assert c.get(f"/v1/datasets/{ds['id']}/download").content == raw
