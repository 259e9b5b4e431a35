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


def test_a_commit_whose_answer_is_lost_keeps_everything_it_stored(tmp_path, failpoint):
    """The commit transaction lands but its answer never arrives (the connection broke
    after COMMIT): the pass cannot know, so it removes nothing. The client gets a 503
    and sends again; that is answered as the same, whole dataset."""
    movie = write_raw_mrc(tmp_path / "m.mrc", counting_movie((4, 64, 96)), 101)
    raw = movie.read_bytes()
    failpoint("commit.answer_lost", "unavailable@once")
    with make_client(tmp_path / "data") as c:
        lost = c.put("/v1/uploads/m.mrc", content=raw)
        assert lost.status_code == 503, lost.text
        again = c.put("/v1/uploads/m.mrc", content=raw)
        assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
        ds = again.json()["dataset"]
        assert ds["status"] == "ready"
        assert c.get(f"/v1/datasets/{ds['id']}/download").content == raw
    data_dir = tmp_path / "data"
    run_recover(data_dir)
    place = Place(f"sqlite:///{data_dir.resolve() / 'catalog.sqlite3'}", data_dir=data_dir)
    from tests.invariants import Sent, sha256_of
    assert check(place, [Sent("m.mrc", sha256_of(raw), told_complete=True)]) == []


def test_delete_during_the_last_tus_patch_never_brings_the_dataset_back(tmp_path,
                                                                      failpoint):
    """DELETE while the last PATCH's pass is between its proof and the store: the pass
    finds the dataset gone (409), the upload is detached from it, and recovery never
    replays it into a new dataset."""
    pause = tmp_path / "pause"
    pause.mkdir()
    movie = write_raw_mrc(tmp_path / "m.mrc", counting_movie((4, 64, 96)), 101)
    raw = movie.read_bytes()
    failpoint("commit.before_store", f"pause={pause}")
    with make_client(tmp_path / "data") as c:
        url = c.post("/v1/tus/", headers={**TUS, "Upload-Length": str(len(raw))}) \
            .headers["location"]
        answer: dict = {}

        def last_patch() -> None:
            try:
                answer["response"] = c.patch(url, content=raw, headers={
                    **TUS, "Upload-Offset": "0",
                    "Content-Type": "application/offset+octet-stream"})
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                answer["error"] = exc
        patching = threading.Thread(target=last_patch)
        patching.start()
        deadline = time.monotonic() + 30
        while not (pause / "commit.before_store.reached").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (dataset,) = c.get("/v1/datasets").json()["items"]
        assert c.delete(f"/v1/datasets/{dataset['id']}").status_code == 200
        (pause / "commit.before_store.go").touch()
        patching.join(30)
        assert "error" not in answer, answer
        assert answer["response"].status_code == 409, answer["response"].text
        service = c.app.state.service
        for _ in range(2):
            service.recovery.tick()
        assert c.get(f"/v1/datasets/{dataset['id']}").status_code == 404
        assert c.get("/v1/datasets").json()["items"] == []
        assert service.catalog.get_dataset(dataset["id"]) is None
