"""tus 1.0: the real tuspy client uploads, is interrupted (stop half-way, restart the
server, drop the connection mid-PATCH) and resumes from the stored offset; the stored
bytes hash identical to the source. Protocol errors get the prescribed status codes."""

from __future__ import annotations

import base64
import hashlib
import socket
import time

import httpx
import pytest
from tusclient import client as tus_client

from tests.api_helpers import make_client, start_server, wait_job
from tests.test_api import error_of
from tests.reference import counting_movie, write_raw_mrc

TUS = {"Tus-Resumable": "1.0.0"}


@pytest.fixture(scope="module")
def movie(tmp_path_factory):
    path = tmp_path_factory.mktemp("tus") / "movie.mrc"
    write_raw_mrc(path, counting_movie((24, 512, 512)), 101)  # ~3 MB
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def dataset_of(base: str, upload_url: str) -> dict:
    head = httpx.head(upload_url, headers=TUS)
    assert head.status_code == 200 and head.headers["upload-offset"] == \
        head.headers["upload-length"]
    location = head.headers["mrc-ingest-dataset"]
    with httpx.Client(base_url=base) as c:
        ds = c.get(location).json()
        wait_job(c, ds["jobs"][0]["id"])
        return c.get(location).json()


def test_tuspy_upload_becomes_a_dataset(tmp_path, movie):
    path, sha = movie
    proc, base = start_server(tmp_path / "data")
    try:
        uploader = tus_client.TusClient(f"{base}/v1/tus/").uploader(
            str(path), chunk_size=1 << 20, metadata={"filename": "scope1_movie.mrc"},
            upload_checksum=True)
        uploader.upload()
        ds = dataset_of(base, uploader.url)
        assert ds["status"] == "ready" and ds["sha256"] == sha
        assert ds["name"] == "scope1_movie.mrc" and ds["size_bytes"] == path.stat().st_size
    finally:
        proc.terminate()
        proc.wait()


def test_tuspy_resumes_after_a_server_restart(tmp_path, movie):
    path, sha = movie
    data = tmp_path / "data"
    proc, base = start_server(data)
    try:
        uploader = tus_client.TusClient(f"{base}/v1/tus/").uploader(
            str(path), chunk_size=256 << 10, metadata={"filename": "m.mrc"})
        half = path.stat().st_size // 2
        uploader.upload(stop_at=half)
        url = uploader.url
        assert int(httpx.head(url, headers=TUS).headers["upload-offset"]) >= half
    finally:
        proc.terminate()
        proc.wait()
    proc, base2 = start_server(data)
    try:
        url = url.replace(base, base2)  # same data folder, new port
        offset = int(httpx.head(url, headers=TUS).headers["upload-offset"])
        assert offset >= half  # the offset survived the restart
        resumed = tus_client.TusClient(f"{base2}/v1/tus/").uploader(
            str(path), chunk_size=256 << 10, url=url)
        assert resumed.offset == offset
        resumed.upload()
        ds = dataset_of(base2, url)
        assert ds["sha256"] == sha and ds["status"] == "ready"
    finally:
        proc.terminate()
        proc.wait()


def test_connection_dropped_mid_patch_keeps_what_arrived(tmp_path, movie):
    path, sha = movie
    raw = path.read_bytes()
    proc, base = start_server(tmp_path / "data")
    try:
        create = httpx.post(f"{base}/v1/tus/", headers={
            **TUS, "Upload-Length": str(len(raw)),
            "Upload-Metadata": "filename " + base64.b64encode(b"cut.mrc").decode()})
        assert create.status_code == 201 and create.headers["tus-resumable"] == "1.0.0"
        url = base + create.headers["location"]
        host, port = base.removeprefix("http://").split(":")
        sent = 1 << 20
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall((f"PATCH {create.headers['location']} HTTP/1.1\r\nHost: {host}\r\n"
                          f"Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
                          f"Content-Type: application/offset+octet-stream\r\n"
                          f"Content-Length: {len(raw)}\r\n\r\n").encode())
            sock.sendall(raw[:sent])
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        while (offset := int(httpx.head(url, headers=TUS).headers["upload-offset"])) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert 0 < offset <= sent
        resumed = tus_client.TusClient(f"{base}/v1/tus/").uploader(
            str(path), chunk_size=1 << 20, url=url)
        assert resumed.offset == offset
        resumed.upload()
        assert dataset_of(base, url)["sha256"] == sha
    finally:
        proc.terminate()
        proc.wait()


# -- protocol errors (in-process) ----------------------------------------------------

def create(c, length: int, **headers) -> str:
    response = c.post("/v1/tus/", headers={**TUS, "Upload-Length": str(length), **headers})
    assert response.status_code == 201, response.text
    return response.headers["location"]


def patch(c, url, body: bytes, offset: int, **headers):
    return c.patch(url, content=body, headers={
        **TUS, "Upload-Offset": str(offset),
        "Content-Type": "application/offset+octet-stream", **headers})


def test_protocol_errors(tmp_path, movie):
    path, _ = movie
    raw = path.read_bytes()
    with make_client(tmp_path / "data", max_upload_bytes=len(raw) + 10) as c:
        options = c.options("/v1/tus/")
        assert options.status_code == 204 and options.headers["tus-version"] == "1.0.0"
        assert "checksum" in options.headers["tus-extension"]
        assert "tus-resumable" not in options.headers
        url = create(c, len(raw), **{"Upload-Metadata": ""})  # empty metadata is fine
        assert c.head(url, headers=TUS).headers["upload-offset"] == "0"
        # 412 without (or with another) Tus-Resumable, naming the version we speak
        bad = c.head(url)
        assert bad.status_code == 412 and bad.headers["tus-version"] == "1.0.0"
        old = c.patch(url, content=b"x", headers={"Tus-Resumable": "0.2.2"})
        assert error_of(old, 412, "tus_version") == "Tus-Resumable must be 1.0.0, got '0.2.2'"
        assert old.headers["tus-version"] == "1.0.0"
        # 415 without the tus content type
        wrong_type = c.patch(url, content=raw[:10], headers={**TUS, "Upload-Offset": "0"})
        assert "application/offset+octet-stream" in error_of(wrong_type, 415, "content_type")
        assert wrong_type.headers["tus-resumable"] == "1.0.0"
        # 409 on an offset mismatch
        assert patch(c, url, raw[:100], 0).status_code == 204
        conflict = patch(c, url, raw[100:200], 50)
        assert error_of(conflict, 409, "offset_mismatch") == \
            "Upload-Offset 50 != the upload's offset 100"
        # 460 on a checksum mismatch, and the bytes are not kept
        wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
        mismatch = patch(c, url, raw[100:300], 100, **{"Upload-Checksum": f"sha1 {wrong}"})
        detail = error_of(mismatch, 460, "checksum_mismatch")
        assert "sha1 differs from Upload-Checksum" in detail and "discarded" in detail
        assert c.head(url, headers=TUS).headers["upload-offset"] == "100"
        good = base64.b64encode(hashlib.sha1(raw[100:]).digest()).decode()
        done = patch(c, url, raw[100:], 100, **{"Upload-Checksum": f"sha1 {good}"})
        assert done.status_code == 204 and done.headers["upload-offset"] == str(len(raw))
        assert done.headers["mrc-ingest-dataset"].startswith("/v1/datasets/")
        # 413 over Tus-Max-Size; 400 without Upload-Length
        too_big = c.post("/v1/tus/", headers={**TUS, "Upload-Length": str(len(raw) + 11)})
        assert error_of(too_big, 413, "too_large") == \
            f"Upload-Length {len(raw) + 11} exceeds Tus-Max-Size {len(raw) + 10}"
        assert "Upload-Length is required" in error_of(c.post("/v1/tus/", headers=TUS), 400,
                                                       "bad_request")
        # 404 unknown (HEAD has no body: the PATCH says why); termination
        assert c.head("/v1/tus/nope", headers=TUS).status_code == 404
        assert error_of(patch(c, "/v1/tus/nope", b"x", 0), 404, "upload_not_found") == \
            "no upload 'nope'"
        other = create(c, len(raw))
        assert c.delete(other, headers=TUS).status_code == 204
        gone = c.head(other, headers=TUS)
        assert gone.status_code == 404 and gone.headers["tus-resumable"] == "1.0.0"
        # not MRC: refused once the header is in, and the upload is terminated
        junk = create(c, 4096)
        refused = patch(c, junk, b"hello" * 400, 0)
        detail = error_of(refused, 415, "not_mrc")
        assert "terminated and nothing was stored" in detail["message"]
        assert [(f["severity"], f["field"]) for f in detail["findings"]] == [("error", "header")]
        assert c.head(junk, headers=TUS).status_code == 404
        assert c.get("/v1/datasets").json()["items"][0]["name"] == "upload.mrc"
        # the 460 dropped the pass streaming alongside, so the upload's bytes are read
        # once more by an ingest job; its commit releases them
        deadline = time.monotonic() + 60
        while (status := c.get("/v1/datasets").json()["items"][0]["status"]) != "ready":
            assert status in ("receiving", "queued", "processing"), status
            assert time.monotonic() < deadline, f"the replayed upload is still {status}"
            time.sleep(0.05)
        while any((tmp_path / "data" / "tus").iterdir()):  # released right after the commit
            assert time.monotonic() < deadline, "the committed upload's bytes are still kept"
            time.sleep(0.05)


def test_expired_uploads_get_410(tmp_path, movie):
    """The handler's own answer to an expired upload. No workers, so no recovery thread
    whose expiry step could drop the upload first (it would, within a tick: a 404)."""
    path, _ = movie
    with make_client(tmp_path / "data", tus_expiry_hours=1e-6, workers=0) as c:
        url = create(c, path.stat().st_size)
        time.sleep(0.05)
        assert c.head(url, headers=TUS).status_code == 410
        assert c.head(url, headers=TUS).status_code == 404  # and then it is gone
        other = create(c, path.stat().st_size)
        time.sleep(0.05)
        detail = error_of(patch(c, other, b"x", 0), 410, "upload_expired")
        assert detail.startswith(f"upload {other.rsplit('/', 1)[1]} expired at ")


def test_a_failed_end_keeps_the_bytes_and_recovery_ingests_them(tmp_path, movie, failpoint):
    """The last PATCH's end fails (the store went away as it stored the archive): the
    client gets 503, every byte stays, and recovery ingests them after all."""
    path, sha = movie
    raw = path.read_bytes()
    failpoint("commit.after_store", "unavailable@once")
    with make_client(tmp_path / "data") as c:
        url = c.post("/v1/tus/", headers={
            **TUS, "Upload-Length": str(len(raw)),
            "Upload-Metadata": "filename " + base64.b64encode(b"t.mrc").decode()
        }).headers["location"]
        response = c.patch(url, content=raw, headers={
            **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
        error_of(response, 503, "unavailable")
        assert c.get("/v1/datasets").json()["items"] == []
        assert c.head(url, headers=TUS).headers["upload-offset"] == str(len(raw))
        c.app.state.service.recovery.tick()  # what every replica runs every few seconds
        head = c.head(url, headers=TUS)
        location = head.headers["mrc-ingest-dataset"]
        ds = c.get(location).json()
        wait_job(c, ds["jobs"][-1]["id"])
        ds = c.get(location).json()
        assert ds["status"] == "ready" and ds["sha256"] == sha
        assert c.get(f"{location}/download").content == raw


def test_an_ingest_job_run_again_leaves_a_ready_dataset_alone(tmp_path, movie):
    """A job whose commit landed but whose end was not recorded runs again: it finds the
    dataset ready and changes nothing."""
    path, sha = movie
    with make_client(tmp_path / "data") as c:
        ds = c.put("/v1/uploads/m.mrc", content=path.read_bytes()).json()["dataset"]
        service = c.app.state.service
        job = service.submit_job("ingest", ds["id"])
        done = wait_job(c, job["id"])
        assert done["state"] == "done" and done["result"]["already"] is True
        after = c.get(f"/v1/datasets/{ds['id']}").json()
        assert after["status"] == "ready" and after["sha256"] == sha
        assert c.get(f"/v1/datasets/{ds['id']}/download").content == path.read_bytes()


def test_expiration_counts_from_the_last_patch_and_is_announced(tmp_path, movie):
    """tus 1.0 expiration: advertised in Tus-Extension, ``Upload-Expires`` (an RFC 7231
    date) on creation, HEAD and PATCH of an unfinished upload, moved on by each PATCH;
    an upload PATCHed within its expiry lives on past its creation + expiry. And
    ``Mrc-Ingest-Dataset`` appears only once there is a dataset."""
    from email.utils import parsedate_to_datetime

    path, sha = movie
    raw = path.read_bytes()
    expiry_s = 2.0
    with make_client(tmp_path / "data", tus_expiry_hours=expiry_s / 3600) as c:
        assert "expiration" in c.options("/v1/tus/").headers["tus-extension"].split(",")
        created = c.post("/v1/tus/", headers={**TUS, "Upload-Length": str(len(raw))})
        url = created.headers["location"]
        first = parsedate_to_datetime(created.headers["upload-expires"])
        head = c.head(url, headers=TUS)
        assert "mrc-ingest-dataset" not in head.headers  # no dataset yet
        assert parsedate_to_datetime(head.headers["upload-expires"]) == first
        third = len(raw) // 3
        for k in range(3):  # every 1.2 s: past creation + expiry by the last one
            time.sleep(1.2 if k else 0)
            stop = len(raw) if k == 2 else (k + 1) * third
            response = patch(c, url, raw[k * third:stop], k * third)
            assert response.status_code == 204, response.text
            if k < 2:
                moved = parsedate_to_datetime(response.headers["upload-expires"])
                assert moved >= first  # whole seconds: the first PATCH is at once
                first = moved
        assert "upload-expires" not in response.headers  # finished: it no longer expires
        location = response.headers["mrc-ingest-dataset"]
        ds = c.get(location).json()
        assert ds["status"] == "ready" and ds["sha256"] == sha
