"""The HTTP API driven with httpx (FastAPI's TestClient): uploads, registrations, the
catalog, previews, downloads and conversions, jobs, errors. Outputs are checked with
mrcfile and mrcz, previews against an obvious numpy rendering, hashes with hashlib."""

from __future__ import annotations

import base64
import hashlib
import io
import os

import mrcfile
import mrcz
import numpy as np
import pytest
from PIL import Image

from tests.api_helpers import files_under, make_client, upload_and_wait, wait_job
from tests.reference import counting_movie, synthetic, write_raw_mrc



@pytest.fixture
def movie101(tmp_path):
    data = counting_movie((5, 64, 97), lam=2.0)  # odd nx: padded rows
    return write_raw_mrc(tmp_path / "movie.mrc", data, 101, cella=(97 * 1.06, 64 * 1.06, 5)), data


def error_of(response, status: int, code: str) -> object:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    assert body["detail"], body
    return body["detail"]


# -- uploads ---------------------------------------------------------------------------

def test_put_upload_4bit_ingests_normalizes_and_archives(client, movie101, tmp_path):
    path, data = movie101
    raw = path.read_bytes()
    response = client.put("/v1/uploads/movie.mrc", content=raw)
    assert response.status_code == 201  # ingested while it streamed: ready now
    assert response.headers["location"].startswith("/v1/datasets/")
    body = response.json()
    assert body["duplicate"] is False and body["job"]["kind"] == "upload"
    assert body["job"]["state"] == "done" and body["dataset"]["status"] == "ready"
    assert body["job"]["result"]["status"] == "ready"
    ds = client.get(f"/v1/datasets/{body['dataset']['id']}").json()
    assert ds["status"] == "ready"
    assert ds["sha256"] == hashlib.sha256(raw).hexdigest()
    assert (ds["mode"], ds["nx"], ds["ny"], ds["frames"]) == (101, 97, 64, 5)
    assert ds["size_bytes"] == len(raw)
    assert ds["pixel_size_angstrom"] == pytest.approx(1.06)
    assert ds["byte_order"] == "little"
    expected = data.astype(np.float64)
    assert ds["stats"]["dmin"] == expected.min() and ds["stats"]["dmax"] == expected.max()
    assert ds["stats"]["dmean"] == pytest.approx(expected.mean(), rel=1e-12)
    assert ds["stats"]["rms"] == pytest.approx(expected.std(), rel=1e-12)
    assert ds["archive"]["mode"] == 0 and ds["archive"]["codec"] == "zstd"
    assert ds["archive"]["restorable"] is True
    assert ds["storage"]["form"] == "archive" and "original" not in ds["storage"]["bytes"]
    assert ds["stored_bytes"] == sum(ds["storage"]["bytes"].values())
    assert ds["compression_ratio"] == pytest.approx(len(raw) / ds["stored_bytes"], rel=1e-3)
    assert ds["timings"]["total_s"] >= 0
    # The archive, as a client downloads it: mrcz reads the raw counts, never shifted.
    archive = client.get(f"/v1/datasets/{ds['id']}/download", params={"format": "mrcz"})
    assert archive.status_code == 200
    assert archive.headers["content-disposition"].endswith('filename="movie.mrcz"')
    (tmp_path / "a.mrcz").write_bytes(archive.content)
    values, _ = mrcz.readMRC(str(tmp_path / "a.mrcz"))
    assert values.dtype == np.int8 and np.array_equal(values, data)


def test_multipart_upload_is_streamed_and_named_from_the_part(client, movie101):
    path, data = movie101
    response = client.post("/v1/uploads", files={"file": ("from-scope_1.mrc",
                                                           path.read_bytes())},
                           data={"note": "ignored"})
    assert response.status_code == 201, response.text
    ds = client.get(response.headers["location"]).json()
    assert ds["name"] == "from-scope_1.mrc" and ds["status"] == "ready"
    assert ds["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_multipart_without_file_part_or_boundary(client, tmp_path):
    detail = error_of(client.post("/v1/uploads", files={"note": (None, "no file here")}),
                      400, "bad_request")
    assert "no file part" in detail and "-F file=@" in detail
    for response in (client.post("/v1/uploads", data={"a": "b"}),  # urlencoded form
                     client.post("/v1/uploads", content=b"x" * 2000,
                                 headers={"content-type": "application/octet-stream"})):
        detail = error_of(response, 400, "bad_request")
        assert "multipart/form-data" in detail and "boundary" in detail
    assert files_under(tmp_path / "data" / "incoming") == []


@pytest.mark.parametrize("body", [b"hello world" * 200, b"\x00" * 5000, b"MRC" * 10])
def test_garbage_is_refused_at_the_door_and_nothing_is_stored(client, tmp_path, body):
    detail = error_of(client.put("/v1/uploads/junk.mrc", content=body), 415, "not_mrc")
    assert "nothing was stored" in detail["message"]
    [finding] = detail["findings"]
    assert (finding["severity"], finding["field"]) == ("error", "header")
    assert ("not an MRC header" if len(body) >= 1024 else
            f"{len(body)} bytes received, fewer than the 1024-byte") in finding["message"]
    assert files_under(tmp_path / "data" / "incoming") == []
    assert files_under(tmp_path / "data" / "datasets") == []
    assert client.get("/v1/datasets").json()["items"] == []


def test_client_digest_is_verified(client, movie101, tmp_path):
    path, _ = movie101
    raw = path.read_bytes()
    good = hashlib.sha256(raw).hexdigest()
    detail = error_of(client.put("/v1/uploads/m.mrc", content=raw,
                                 headers={"X-Content-SHA256": "0" * 64}), 400,
                      "digest_mismatch")
    assert good in detail
    assert files_under(tmp_path / "data" / "incoming") == []
    assert client.get("/v1/datasets").json()["items"] == []
    b64 = base64.b64encode(bytes.fromhex(good)).decode()
    response = client.put("/v1/uploads/m.mrc", content=raw,
                          headers={"Content-Digest": f"sha-256=:{b64}:"})
    assert response.status_code == 201
    assert "64 hex digits" in error_of(client.put(
        "/v1/uploads/m.mrc", content=raw, headers={"X-Content-SHA256": "xyz"}), 400,
        "bad_request")
    assert "no sha-256 digest" in error_of(client.put(
        "/v1/uploads/m.mrc", content=raw, headers={"Content-Digest": "md5=:AAAA:"}), 400,
        "bad_request")


def test_same_bytes_twice_return_the_first_dataset(client, movie101):
    path, _ = movie101
    first = upload_and_wait(client, path)
    again = client.put("/v1/uploads/other-name.mrc", content=path.read_bytes())
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["dataset"]["id"] == first["id"]
    assert len(client.get("/v1/datasets").json()["items"]) == 1


def test_upload_size_limit(tmp_path, movie101):
    path, _ = movie101
    with make_client(tmp_path / "data", max_upload_bytes=4096) as c:
        detail = error_of(c.put("/v1/uploads/m.mrc", content=path.read_bytes()), 413,
                          "too_large")
        assert f"Content-Length {path.stat().st_size} exceeds the limit of 4096" in detail

        def chunked():  # no Content-Length: the limit is enforced while streaming
            data = path.read_bytes()
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]
        detail = error_of(c.put("/v1/uploads/m.mrc", content=chunked()), 413, "too_large")
        assert "exceeds the limit of 4096 bytes" in detail
        assert files_under(tmp_path / "data" / "incoming") == []


@pytest.mark.parametrize("name", [".hidden.mrc", "a..b.mrc", "sp ace.mrc", "x" * 300])
def test_bad_file_names(client, movie101, name):
    path, _ = movie101
    detail = error_of(client.put(f"/v1/uploads/{name}", content=path.read_bytes()), 400,
                      "bad_request")
    assert f"file name {name!r} is not allowed" in detail


def test_truncated_file_becomes_rejected_with_findings(client, tmp_path):
    full = write_raw_mrc(tmp_path / "t.mrc", synthetic(2, (4, 32, 32)), 2)
    cut = tmp_path / "cut.mrc"
    cut.write_bytes(full.read_bytes()[:-1000])
    ds = upload_and_wait(client, cut)
    assert ds["status"] == "rejected"
    errors = [f for f in ds["findings"] if f["severity"] == "error"]
    assert errors and errors[0]["field"] == "data" and "truncated" in errors[0]["message"]
    listed = client.get("/v1/datasets", params={"status": "rejected"}).json()["items"]
    assert [d["id"] for d in listed] == [ds["id"]]
    # The file stays for inspection; previews and conversions are refused clearly.
    original = client.get(f"/v1/datasets/{ds['id']}/download")
    assert original.content == cut.read_bytes()
    for response in (client.get(f"/v1/datasets/{ds['id']}/frames/0.png"),
                     client.get(f"/v1/datasets/{ds['id']}/download", params={"mode": 2})):
        detail = error_of(response, 409, "conflict")
        assert f"dataset {ds['id']} is rejected, not ready" in detail


def test_stats_mismatch_is_a_warning_not_a_rejection(client, tmp_path):
    path = write_raw_mrc(tmp_path / "s.mrc", synthetic(1, (2, 16, 16)), 1,
                         stats=(0.0, 1.0, 0.5, 0.1))
    ds = upload_and_wait(client, path)
    assert ds["status"] == "ready"
    assert {f["field"] for f in ds["findings"] if f["severity"] == "warning"} >= \
        {"dmin", "dmax", "dmean", "rms"}


# -- registrations ---------------------------------------------------------------------

def test_register_inside_allowed_root(client, shared, movie101):
    path, data = movie101
    target = shared / "scope1" / "movie.mrc"
    target.parent.mkdir()
    target.write_bytes(path.read_bytes())
    response = client.post("/v1/registrations", json={"path": str(target)})
    assert response.status_code == 202, response.text
    wait_job(client, response.json()["job"]["id"])
    ds = client.get(response.headers["location"]).json()
    assert ds["status"] == "ready" and ds["source"] == "registration"
    assert ds["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    frame = client.get(f"/v1/datasets/{ds['id']}/download", params={"mode": 6})
    assert frame.status_code == 200
    with mrcfile.open(_save(frame, shared)) as m:
        assert np.array_equal(m.data, data)
    # Registering the same unchanged file again (by another path) answers that dataset.
    again = client.post("/v1/registrations",
                        json={"path": str(shared / "scope1/../scope1/movie.mrc")})
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["dataset"]["id"] == ds["id"]
    # Deleting the dataset never touches the registered file.
    assert client.delete(f"/v1/datasets/{ds['id']}").json() == {"deleted": ds["id"]}
    assert target.exists()


def _save(response, folder):
    out = folder.parent / "download.mrc"
    out.write_bytes(response.content)
    return str(out)


def test_registration_refusals(client, shared, tmp_path, movie101):
    path, _ = movie101
    outside = tmp_path / "outside.mrc"
    outside.write_bytes(path.read_bytes())
    link = shared / "link.mrc"
    link.symlink_to(outside)
    for asked in (outside, link, shared / "../outside.mrc"):  # plain, symlink, '..'
        detail = error_of(client.post("/v1/registrations", json={"path": str(asked)}), 403,
                          "path_not_allowed")
        assert f"(resolved to {str(outside)!r}) is outside the allowed roots " \
               f"[{str(shared)!r}]" in detail
    detail = error_of(client.post("/v1/registrations", json={"path": str(shared / "none.mrc")}),
                      404, "not_found")
    assert f"no such file or folder: {str(shared / 'none.mrc')!r}" in detail
    detail = error_of(client.post("/v1/registrations", json={"path": "relative.mrc"}), 422,
                      "unprocessable")
    assert "path must be absolute, got 'relative.mrc'" in detail
    detail = error_of(client.post("/v1/registrations", json={"path": str(shared)}), 422,
                      "unprocessable")
    assert f"{str(shared)!r} is not a regular file" in detail
    detail = error_of(client.post("/v1/registrations", json={}), 422, "invalid_request")
    assert detail[0]["where"] == "body.path"


def test_registration_disabled_without_roots(tmp_path, movie101):
    path, _ = movie101
    with make_client(tmp_path / "data") as c:
        detail = error_of(c.post("/v1/registrations", json={"path": str(path)}), 403,
                          "path_not_allowed")
        assert "MRC_INGEST_ALLOWED_ROOTS" in detail


def test_registered_file_changed_later(client, shared, movie101, tmp_path):
    """The archive holds the registered bytes (proven at ingest), so the dataset stays
    exactly what was registered after the user's file changes; a dataset read from the
    user's file itself (no archive kept) notices the change and says so."""
    path, _ = movie101
    raw = path.read_bytes()
    target = shared / "m.mrc"
    target.write_bytes(raw)
    response = client.post("/v1/registrations", json={"path": str(target)})
    wait_job(client, response.json()["job"]["id"])
    ds_id = response.json()["dataset"]["id"]
    with open(target, "ab") as f:
        f.write(b"\x00" * 10)
    served = client.get(f"/v1/datasets/{ds_id}/download")
    assert served.status_code == 200 and served.content == raw
    with make_client(tmp_path / "plain", allowed_roots=[shared], archive_codec="none") as c:
        plain = c.post("/v1/registrations", json={"path": str(target)})
        wait_job(c, plain.json()["job"]["id"])
        ds = c.get(plain.headers["location"]).json()
        assert ds["storage"]["form"] == "registered"
        with open(target, "ab") as f:
            f.write(b"\x01")
        detail = error_of(c.get(f"/v1/datasets/{ds['id']}/download"), 409, "conflict")
        assert "changed" in detail and "register it again" in detail
    fresh = client.post("/v1/registrations", json={"path": str(target)})  # as advised
    assert fresh.status_code == 202 and fresh.json()["dataset"]["id"] != ds_id
    wait_job(client, fresh.json()["job"]["id"])
    redone = client.get(fresh.headers["location"]).json()
    assert redone["status"] == "ready"  # 10 trailing bytes: a warning, not an error
    assert any(f["field"] == "data" and f["severity"] == "warning" for f in redone["findings"])


# -- catalog ---------------------------------------------------------------------------

def test_list_filters_sort_and_cursor_pagination(client, tmp_path):
    ids = {}
    for i, mode in enumerate([1, 2, 1, 6, 1, 2, 0]):
        path = write_raw_mrc(tmp_path / f"f{i}.mrc", synthetic(mode, (1, 8, 8), seed=i), mode)
        ids[i] = upload_and_wait(client, path, name=f"grid{i % 2}-f{i}.mrc")["id"]
    pages, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/datasets", params=params).json()
        pages.append([d["id"] for d in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert page["links"]["next"].startswith("/v1/datasets?limit=3&cursor=")
    assert [len(p) for p in pages] == [3, 3, 1]
    flat = [i for p in pages for i in p]
    assert flat == [ids[i] for i in reversed(range(7))]  # newest first
    filtered = client.get("/v1/datasets", params={"mode": 1, "limit": 2}).json()
    rest = client.get(filtered["links"]["next"]).json()["items"]  # keeps the filter
    assert {d["mode"] for d in filtered["items"] + rest} == {1} and len(rest) == 1
    by_mode = client.get("/v1/datasets", params={"mode": 1}).json()["items"]
    assert sorted(d["id"] for d in by_mode) == sorted(ids[i] for i in (0, 2, 4))
    by_name = client.get("/v1/datasets", params={"name": "GRID1"}).json()["items"]
    assert sorted(d["id"] for d in by_name) == sorted(ids[i] for i in (1, 3, 5))
    asc = client.get("/v1/datasets", params={"sort": "name", "order": "asc",
                                              "limit": 1000}).json()["items"]
    assert [d["name"] for d in asc] == sorted(d["name"] for d in asc)
    middle = client.get(f"/v1/datasets/{ids[3]}").json()["created_at"]
    after = client.get("/v1/datasets", params={"created_after": middle}).json()["items"]
    assert sorted(d["id"] for d in after) == sorted(ids[i] for i in (4, 5, 6))
    none = client.get("/v1/datasets", params={"source": "registration"}).json()
    assert none == {"items": [], "next_cursor": None, "links": {}}
    name_pages, cursor = [], None
    while True:
        page = client.get("/v1/datasets", params={"sort": "size_bytes", "limit": 2,
                                                  **({"cursor": cursor} if cursor else {})}
                          ).json()
        name_pages += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len({d["id"] for d in name_pages}) == 7


def test_list_bad_parameters(client):
    detail = error_of(client.get("/v1/datasets", params={"cursor": "not-a-cursor"}), 400,
                      "bad_request")
    assert "cursor 'not-a-cursor' is not one this service issued" in detail
    for name, value in (("limit", "0"), ("status", "bogus"), ("created_after", "yesterday")):
        [problem] = error_of(client.get("/v1/datasets", params={name: value}), 422,
                             "invalid_request")
        assert (problem["where"], problem["input"]) == (f"query.{name}", value)
        assert problem["message"]


def test_cursor_from_another_sort_is_refused(client, tmp_path):
    for i in range(3):
        upload_and_wait(client, write_raw_mrc(tmp_path / f"c{i}.mrc",
                                              synthetic(1, (1, 4, 4), seed=i), 1))
    cursor = client.get("/v1/datasets", params={"limit": 1}).json()["next_cursor"]
    detail = error_of(client.get("/v1/datasets", params={"cursor": cursor, "sort": "name"}),
                      400, "bad_request")
    assert "cursor was issued for sort='created_at', not sort='name'" in detail


def test_unknown_things_are_json_404(client):
    assert error_of(client.get("/v1/datasets/nope"), 404, "not_found") == "no dataset 'nope'"
    assert error_of(client.get("/v1/jobs/nope"), 404, "not_found") == "no job 'nope'"
    assert error_of(client.get("/no/such/route"), 404, "not_found") == "Not Found"
    assert error_of(client.delete("/v1/datasets/nope"), 404, "not_found") == \
        "no dataset 'nope'"
    assert error_of(client.patch("/v1/datasets"), 405, "method_not_allowed") == \
        "Method Not Allowed"


def test_delete_removes_rows_and_files(client, movie101, tmp_path):
    path, _ = movie101
    ds = upload_and_wait(client, path)
    client.get(f"/v1/datasets/{ds['id']}/download", params={"mode": 1})  # cache a conversion
    assert client.delete(f"/v1/datasets/{ds['id']}").json() == {"deleted": ds["id"]}
    assert error_of(client.get(f"/v1/datasets/{ds['id']}"), 404, "not_found") == \
        f"no dataset {ds['id']!r}"
    assert files_under(tmp_path / "data" / "datasets") == []
    assert files_under(tmp_path / "data" / "conversions") == []


# -- previews --------------------------------------------------------------------------

def reference_preview(values: np.ndarray, clip: float) -> np.ndarray:
    """The obvious rendering: percentiles as black and white, linear in between."""
    lo, hi = np.percentile(values.astype(np.float64), [clip, 100 - clip])
    return np.clip(np.floor((values - lo) * 255.0 / (hi - lo) + 0.5), 0, 255).astype(np.uint8)


def test_frame_preview_matches_the_frame(client, tmp_path):
    data = synthetic(1, (3, 40, 60))
    ds = upload_and_wait(client, write_raw_mrc(tmp_path / "p.mrc", data, 1))
    response = client.get(f"/v1/datasets/{ds['id']}/frames/2.png",
                          params={"size": 64, "clip": 0})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(response.content)))
    assert image.shape == (40, 60)
    assert np.array_equal(image, reference_preview(data[2], 0))
    last = client.get(f"/v1/datasets/{ds['id']}/frames/-1.png", params={"size": 64,
                                                                        "clip": 0})
    assert last.content == response.content
    # Binned: 2x2 block means, clipped at 1 %.
    small = client.get(f"/v1/datasets/{ds['id']}/frames/0.png", params={"size": 30,
                                                                        "clip": 1})
    image = np.asarray(Image.open(io.BytesIO(small.content)))
    means = data[0].astype(np.float64).reshape(20, 2, 30, 2).mean(axis=(1, 3))
    assert image.shape == (20, 30)
    assert np.abs(image.astype(int) - reference_preview(means, 1)).max() <= 1
    # Cached and conditional.
    again = client.get(f"/v1/datasets/{ds['id']}/frames/0.png",
                       params={"size": 30, "clip": 1},
                       headers={"If-None-Match": small.headers["etag"]})
    assert again.status_code == 304


def test_sum_preview_is_the_sum_of_frames(client, tmp_path):
    data = counting_movie((6, 32, 48), lam=3.0)
    ds = upload_and_wait(client, write_raw_mrc(tmp_path / "s.mrc", data, 101))
    response = client.get(f"/v1/datasets/{ds['id']}/sum.png", params={"clip": 0})
    image = np.asarray(Image.open(io.BytesIO(response.content)))
    assert np.array_equal(image, reference_preview(data.sum(axis=0), 0))


def test_preview_errors(client, movie101):
    path, _ = movie101
    ds = upload_and_wait(client, path)
    detail = error_of(client.get(f"/v1/datasets/{ds['id']}/frames/5.png"), 404,
                      "frame_not_found")
    assert detail == "frame 5 out of range: the file has 5 frames (0..4)"
    [problem] = error_of(client.get(f"/v1/datasets/{ds['id']}/frames/x.png"), 422,
                         "invalid_request")
    assert (problem["where"], problem["input"]) == ("path.k", "x")
    [problem] = error_of(client.get(f"/v1/datasets/{ds['id']}/frames/0.png",
                                    params={"size": 5}), 422, "invalid_request")
    assert (problem["where"], problem["input"]) == ("query.size", "5")
    assert error_of(client.get("/v1/datasets/nope/sum.png"), 404, "not_found") == \
        "no dataset 'nope'"


# -- downloads and conversions ---------------------------------------------------------

def test_original_download_and_range(client, movie101):
    path, _ = movie101
    raw = path.read_bytes()
    ds = upload_and_wait(client, path)
    full = client.get(f"/v1/datasets/{ds['id']}/download")
    assert full.content == raw
    assert full.headers["content-length"] == str(len(raw))
    assert 'filename="movie.mrc"' in full.headers["content-disposition"]
    part = client.get(f"/v1/datasets/{ds['id']}/download", headers={"Range": "bytes=1000-2047"})
    assert part.status_code == 206 and part.content == raw[1000:2048]
    assert part.headers["content-range"] == f"bytes 1000-2047/{len(raw)}"
    tail = client.get(f"/v1/datasets/{ds['id']}/download", headers={"Range": "bytes=-100"})
    assert tail.content == raw[-100:]
    bad = client.get(f"/v1/datasets/{ds['id']}/download",
                     headers={"Range": f"bytes={len(raw) + 10}-"})
    assert bad.status_code == 416  # RFC 9110: with the current length in Content-Range
    assert bad.headers["content-range"] == f"bytes */{len(raw)}"


def test_range_errors_are_json(client, movie101):
    """Range errors go through the one error table too (Starlette's own FileResponse
    answered them in text/plain, past the {error, detail} handler)."""
    path, _ = movie101
    ds = upload_and_wait(client, path)
    size = path.stat().st_size
    beyond = client.get(f"/v1/datasets/{ds['id']}/download",
                        headers={"Range": f"bytes={size + 10}-"})
    assert f"{size}" in error_of(beyond, 416, "range_not_satisfiable")
    malformed = client.get(f"/v1/datasets/{ds['id']}/download", headers={"Range": "bytes=abc"})
    assert "Range" in error_of(malformed, 400, "bad_request")


@pytest.mark.parametrize("params, reader", [
    ({"format": "mrc", "mode": 1}, "mrcfile"),
    ({"format": "mrc", "mode": 2, "endian": "big"}, "mrcfile"),
    ({"format": "mrc"}, "mrcfile"),
    ({"format": "mrcz", "codec": "lz4", "clevel": 5}, "mrcz"),
    ({"codec": "zlib", "mode": 1}, "mrcz"),
])
def test_converted_downloads_read_back_exactly(client, movie101, tmp_path, params, reader):
    path, data = movie101
    ds = upload_and_wait(client, path)
    response = client.get(f"/v1/datasets/{ds['id']}/download", params=params)
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    out = tmp_path / ("out.mrcz" if reader == "mrcz" else "out.mrc")
    out.write_bytes(response.content)
    if reader == "mrcfile":
        assert mrcfile.validate(str(out), print_file=io.StringIO())
        with mrcfile.open(str(out)) as m:
            values = m.data.copy()
            if "mode" in params:
                assert int(m.header.mode) == params["mode"]
    else:
        values, _ = mrcz.readMRC(str(out))
    assert np.array_equal(values, data)
    # Second request is served from the cache (no new job).
    jobs_before = len(client.get(f"/v1/datasets/{ds['id']}").json()["jobs"])
    again = client.get(f"/v1/datasets/{ds['id']}/download", params=params)
    assert again.content == response.content
    assert len(client.get(f"/v1/datasets/{ds['id']}").json()["jobs"]) == jobs_before


def test_lossy_and_bad_conversions_are_refused(client, tmp_path):
    data = synthetic(2, (2, 8, 8))  # float32 with fractions
    ds = upload_and_wait(client, write_raw_mrc(tmp_path / "f.mrc", data, 2))
    detail = error_of(client.get(f"/v1/datasets/{ds['id']}/download", params={"mode": 1}),
                      422, "lossy_conversion")
    assert detail["lossless_targets"] == [2, 4]  # float32: only float32 and complex64
    assert f"frame 0, row 0, column 0 holds {data[0, 0, 0].item()!r}" in detail["message"]
    assert "mode 2 -> 1 (int16) would change values" in detail["message"]
    assert error_of(client.get(f"/v1/datasets/{ds['id']}/download",
                               params={"format": "mrc", "codec": "zstd"}), 400,
                    "bad_request") == "codec applies to format=mrcz only"
    assert "unknown codec 'snappyx'" in error_of(client.get(
        f"/v1/datasets/{ds['id']}/download", params={"codec": "snappyx"}), 400, "bad_request")
    assert "unknown target mode 99" in error_of(client.get(
        f"/v1/datasets/{ds['id']}/download", params={"mode": 99}), 422, "conversion_refused")
    [problem] = error_of(client.get(f"/v1/datasets/{ds['id']}/download",
                                    params={"format": "tiff"}), 422, "invalid_request")
    assert (problem["where"], problem["input"]) == ("query.format", "tiff")
    assert files_under(tmp_path / "data" / "conversions") == []


def test_conversion_job_upload_and_target_in_one_request(client, movie101, tmp_path):
    path, data = movie101
    response = client.post("/v1/conversions", params={"mode": 1},
                           files={"file": ("movie.mrc", path.read_bytes())})
    assert response.status_code == 202, response.text
    job = wait_job(client, response.json()["job"]["id"])
    assert job["state"] == "done", job
    assert job["kind"] == "convert" and job["target"]["mode"] == 1
    result = client.get(job["links"]["result"])
    assert result.status_code == 200
    assert 'filename="movie.mode1.mrc"' in result.headers["content-disposition"]
    out = tmp_path / "r.mrc"
    out.write_bytes(result.content)
    with mrcfile.open(str(out)) as m:
        assert m.data.dtype == np.int16 and np.array_equal(m.data, data)


def test_conversion_job_for_a_stored_dataset_json(client, tmp_path):
    data = synthetic(2, (2, 8, 8))
    ds = upload_and_wait(client, write_raw_mrc(tmp_path / "f.mrc", data, 2))
    ok = client.post("/v1/conversions", json={"dataset_id": ds["id"], "format": "mrcz",
                                              "codec": "lz4"})
    assert ok.status_code == 202
    assert wait_job(client, ok.json()["job"]["id"])["state"] == "done"
    lossy = client.post("/v1/conversions", json={"dataset_id": ds["id"], "mode": 0})
    job = wait_job(client, lossy.json()["job"]["id"])
    assert job["state"] == "failed" and job["error"]["error"] == "lossy_conversion"
    assert job["error"]["detail"]["lossless_targets"] == [2, 4]
    assert "mode 2 -> 0 (int8) would change values" in job["error"]["detail"]["message"]
    detail = error_of(client.get(job["links"]["result"]), 409, "conflict")
    assert detail == {"message": f"job {job['id']} is failed", "error": job["error"]}
    assert error_of(client.post("/v1/conversions", json={"dataset_id": "nope"}), 404,
                    "not_found") == "no dataset 'nope'"
    [problem] = error_of(client.post("/v1/conversions", json={"mode": 1}), 422,
                         "invalid_request")
    assert problem["where"] == "dataset_id" and problem["message"] == "Field required"
    [problem] = error_of(client.post("/v1/conversions", content=b"{", headers={
        "content-type": "application/json"}), 422, "invalid_request")
    assert "Invalid JSON" in problem["message"]


def test_ingest_job_has_no_result_file(client, movie101):
    path, _ = movie101
    response = client.put("/v1/uploads/m.mrc", content=path.read_bytes())
    job = wait_job(client, response.json()["job"]["id"])
    detail = error_of(client.get(job["links"]["self"] + "/result"), 400, "bad_request")
    assert detail == f"job {job['id']} is an {job['kind']} job; it has no file to " \
                     "download (see its dataset)"


# -- settings, operations --------------------------------------------------------------

def test_no_archive_and_no_normalize_settings(tmp_path, movie101):
    path, data = movie101
    with make_client(tmp_path / "data", archive_codec="none") as c:
        ds = upload_and_wait(c, path)  # no archive: the file as received is kept
        assert ds["storage"]["form"] == "original" and ds["archive"]["restorable"] is False
        assert "ARCHIVE_CODEC=none" in ds["archive"]["reason"]
        assert c.get(f"/v1/datasets/{ds['id']}/download").content == path.read_bytes()
        normalized = c.get(f"/v1/datasets/{ds['id']}/download", params={"format": "mrc"})
        (tmp_path / "n.mrc").write_bytes(normalized.content)
        with mrcfile.open(tmp_path / "n.mrc") as m:  # normalized on request, raw counts
            assert m.data.dtype == np.int8 and np.array_equal(m.data, data)
    with make_client(tmp_path / "data2") as c:
        ds = upload_and_wait(c, path, normalize="false")
        assert ds["normalize"] is False and ds["archive"]["mode"] == 0  # MRCZ cannot hold 4-bit
        plain = write_raw_mrc(tmp_path / "p.mrc", synthetic(6, (2, 64, 64)) // 1024, 6)
        kept = upload_and_wait(c, plain, normalize="false")
        assert kept["archive"]["mode"] == 6 and kept["storage"]["form"] == "archive"


def test_healthz_and_metrics(client, movie101):
    path, _ = movie101
    upload_and_wait(client, path)
    client.put("/v1/uploads/j.mrc", content=b"junk" * 300)
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["catalog"] == "ok"
    text = client.get("/metrics").text
    assert 'mrc_ingest_uploads_total{outcome="accepted"} 1.0' in text
    assert 'mrc_ingest_uploads_total{outcome="not_mrc"} 1.0' in text
    assert 'mrc_ingest_datasets{status="ready"} 1.0' in text
    assert 'mrc_ingest_jobs_finished_total{kind="upload",state="done"} 1.0' in text
    assert 'route="/v1/uploads/{filename}"' in text


def test_unexpected_errors_are_json_500(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.config import Settings

    def boom(self, *a, **k):
        raise RuntimeError("disk on fire")
    from service.queries import Queries
    monkeypatch.setattr(Queries, "list_datasets", boom)
    app = create_app(Settings(data_dir=tmp_path / "d"))
    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/v1/datasets")
    assert response.status_code == 500
    assert response.json() == {"error": "internal_error",
                               "detail": "RuntimeError; see the server log"}


def test_openapi_docs(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/uploads/{filename}", "/v1/uploads", "/v1/registrations", "/v1/datasets",
                 "/v1/datasets/{dataset_id}", "/v1/datasets/{dataset_id}/frames/{k}.png",
                 "/v1/datasets/{dataset_id}/sum.png", "/v1/datasets/{dataset_id}/download",
                 "/v1/conversions", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result",
                 "/healthz", "/metrics"):
        assert path in schema["paths"], path
    assert client.get("/docs").status_code == 200
    assert os.environ.get("MRC_INGEST_DATA_DIR") is None  # tests never read the env


@pytest.mark.parametrize("mode", [3, 4])
def test_previews_of_complex_data_show_the_magnitude(client, tmp_path, mode):
    data = synthetic(mode, (2, 12, 10))
    ds = upload_and_wait(client, write_raw_mrc(tmp_path / "c.mrc", data, mode))
    assert ds["status"] == "ready"
    response = client.get(f"/v1/datasets/{ds['id']}/frames/1.png", params={"clip": 0})
    assert response.status_code == 200
    image = np.asarray(Image.open(io.BytesIO(response.content)))
    magnitude = (np.hypot(data[1, ..., 0].astype(np.float64), data[1, ..., 1]) if mode == 3
                 else np.abs(data[1]).astype(np.float64))
    assert np.abs(image.astype(int) - reference_preview(magnitude, 0)).max() <= 1
    total = client.get(f"/v1/datasets/{ds['id']}/sum.png", params={"clip": 0})
    image = np.asarray(Image.open(io.BytesIO(total.content)))
    magnitudes = (np.hypot(data[..., 0].astype(np.float64), data[..., 1]) if mode == 3
                  else np.abs(data).astype(np.float64))
    assert np.abs(image.astype(int) - reference_preview(magnitudes.sum(axis=0), 0)).max() <= 1
