"""Sidecars through the API: .mdoc uploaded after or before its movie, found beside a
registered file, Direct Electron info.txt pairing, FEI extended headers; everything shows
in the dataset detail and filters the list."""

from __future__ import annotations

import pytest

from tests.api_helpers import make_client, upload_and_wait, wait_job
from tests.reference import counting_movie, synthetic, write_raw_mrc
from tests.test_acquisition import MDOC, fei_records


@pytest.fixture
def client(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    with make_client(tmp_path / "data", allowed_roots=[shared]) as c:
        yield c


@pytest.fixture
def movie(tmp_path):
    return write_raw_mrc(tmp_path / "movie.mrc", counting_movie((2, 16, 16)), 101)


def put_sidecar(client, name: str, text: str):
    return client.put(f"/v1/uploads/{name}", content=text.encode())


def test_mdoc_after_the_movie(client, movie):
    ds = upload_and_wait(client, movie)
    assert ds["acquisition"] == {} and ds["voltage_kv"] is None
    response = put_sidecar(client, "movie.mrc.mdoc", MDOC)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["sidecar"] == {"name": "movie.mrc.mdoc", "kind": "mdoc", "dataset_id": ds["id"]}
    assert body["dataset"]["voltage_kv"] == 300
    detail = client.get(f"/v1/datasets/{ds['id']}").json()
    acq = detail["acquisition"]
    assert acq["voltage_kv"] == 300 and acq["tilt_angles"] == [-0.002, 3.0]
    assert acq["total_dose"] == pytest.approx(2.45) and acq["sources"] == ["mdoc"]
    assert detail["sidecars"]["mdoc"]["globals"]["ImageSize"] == [4096, 4096]
    assert detail["total_dose"] == pytest.approx(2.45)
    ids = lambda **p: [d["id"] for d in client.get("/v1/datasets", params=p).json()["items"]]  # noqa: E731
    assert ids(voltage_kv=300) == [ds["id"]] and ids(voltage_kv=200) == []
    assert ids(min_dose=2) == [ds["id"]] and ids(min_dose=3) == [] and ids(max_dose=2) == []


def test_mdoc_before_the_movie(client, movie):
    early = put_sidecar(client, "movie.mdoc", MDOC)
    assert early.status_code == 201 and early.json()["sidecar"]["dataset_id"] is None
    ds = upload_and_wait(client, movie)
    assert ds["acquisition"]["voltage_kv"] == 300
    assert ds["sidecars"]["mdoc"]["name"] == "movie.mdoc"


def test_sidecars_beside_a_registered_movie(client, tmp_path):
    shared = tmp_path / "shared"
    write_raw_mrc(shared / "scan7_movie.mrc", counting_movie((2, 8, 8)), 101)
    (shared / "scan7_info.txt").write_text("Scan - Size X = 64\nScan - Size Y = 32\n"
                                           "Voltage = 200\n")
    write_raw_mrc(shared / "tilt.mrc", counting_movie((2, 8, 8)), 101)
    (shared / "tilt.mrc.mdoc").write_text(MDOC)
    results = {}
    for name in ("scan7_movie.mrc", "tilt.mrc"):
        response = client.post("/v1/registrations", json={"path": str(shared / name)})
        wait_job(client, response.json()["job"]["id"])
        results[name] = client.get(response.headers["location"]).json()
    de = results["scan7_movie.mrc"]["acquisition"]
    assert de["navigation_shape"] == [32, 64] and de["voltage_kv"] == 200
    assert results["tilt.mrc"]["acquisition"]["tilt_angles"] == [-0.002, 3.0]


def test_de_info_pairs_with_its_movie_by_name(client, tmp_path):
    other = upload_and_wait(client, write_raw_mrc(tmp_path / "scan8_other.mrc",
                                                  counting_movie((2, 8, 8), seed=1), 101))
    ds = upload_and_wait(client, write_raw_mrc(tmp_path / "scan8_movie.mrc",
                                               counting_movie((2, 8, 8), seed=2), 101))
    response = put_sidecar(client, "scan8_info.txt", "Scan - Size X = 10\nScan - Size Y = 5\n")
    assert response.json()["sidecar"]["dataset_id"] == ds["id"]
    assert client.get(f"/v1/datasets/{ds['id']}").json()["acquisition"]["navigation_shape"] \
        == [5, 10]
    assert client.get(f"/v1/datasets/{other['id']}").json()["acquisition"] == {}


def test_fei_extended_header_fills_the_acquisition(client, tmp_path):
    ext = fei_records(2)
    path = write_raw_mrc(tmp_path / "epu.mrc", synthetic(1, (2, 8, 8)), 1, extended=ext,
                         exttyp=b"FEI1")
    ds = upload_and_wait(client, path)
    assert ds["status"] == "ready"
    assert ds["acquisition"]["voltage_kv"] == 300
    assert ds["acquisition"]["dose_per_image"] == pytest.approx([1.1, 1.11])
    assert ds["voltage_kv"] == 300
    listed = client.get("/v1/datasets", params={"voltage_kv": 300}).json()["items"]
    assert [d["id"] for d in listed] == [ds["id"]]


def test_bad_sidecars(client, movie):
    ds = upload_and_wait(client, movie)
    response = put_sidecar(client, "movie.mrc.mdoc", "Voltage = 300\nthis is not a key\n"
                                                     "[ZValue = 0\n")
    assert response.status_code == 201
    detail = client.get(f"/v1/datasets/{ds['id']}").json()
    messages = [f["message"] for f in detail["sidecar_findings"]]
    assert any(m.startswith("line 2") for m in messages)
    assert any(m.startswith("line 3") for m in messages)
    assert detail["acquisition"]["voltage_kv"] == 300
    binary = client.put("/v1/uploads/x.mdoc", content=b"\x00\x01\x02")
    assert binary.status_code == 400 and binary.json()["error"] == "bad_request"
    big = client.put("/v1/uploads/y.mdoc", content=b"a = 1\n" * (3 << 20))
    assert big.status_code == 413


@pytest.mark.parametrize("mdoc_first", [False, True])
def test_mdoc_uploaded_with_the_movie_in_one_multipart_request(client, movie, mdoc_first):
    parts = [("file", ("movie.mrc", movie.read_bytes())),
             ("mdoc", ("notes-for-it.mdoc", MDOC.encode()))]
    if mdoc_first:
        parts.reverse()
    response = client.post("/v1/uploads", files=parts)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["dataset"]["name"] == "movie.mrc"
    assert body["sidecars"] == [{"name": "notes-for-it.mdoc", "kind": "mdoc",
                                 "dataset_id": body["dataset"]["id"]}]
    wait_job(client, body["job"]["id"])
    ds = client.get(response.headers["location"]).json()
    assert ds["acquisition"]["voltage_kv"] == 300 and ds["status"] == "ready"
