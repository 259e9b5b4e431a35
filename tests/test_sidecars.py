"""Sidecars through the API: .mdoc uploaded after or before its movie, found beside a
registered file, Direct Electron info.txt pairing, FEI extended headers; everything shows
in the dataset detail and the catalog columns, and filters the list; refusals say why."""

from __future__ import annotations

import pytest

from tests.api_helpers import make_client, upload_and_wait, wait_job
from tests.reference import counting_movie, synthetic, write_raw_mrc
from tests.test_acquisition import (DE_CELL_PER_PIXEL, DE_NOT_KNOWN, DE_NOT_SQUARE, DE_SUMMARY,
                                   MDOC, de_info_text, fei_records)


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
    (shared / "scan7_info.txt").write_text(de_info_text(**{
        "Scan - Enable": "Scan - Enable = Enable",
        "Instrument Accelerating Voltage (V)": "Instrument Accelerating Voltage (V) = 200000"}))
    write_raw_mrc(shared / "tilt.mrc", counting_movie((2, 8, 8)), 101)
    (shared / "tilt.mrc.mdoc").write_text(MDOC)
    results = {}
    for name in ("scan7_movie.mrc", "tilt.mrc"):
        response = client.post("/v1/registrations", json={"path": str(shared / name)})
        wait_job(client, response.json()["job"]["id"])
        results[name] = client.get(response.headers["location"]).json()
    de = results["scan7_movie.mrc"]["acquisition"]
    assert de["navigation_shape"] == [32, 8] and de["voltage_kv"] == 200
    assert results["scan7_movie.mrc"]["voltage_kv"] == 200
    assert results["tilt.mrc"]["acquisition"]["tilt_angles"] == [-0.002, 3.0]


def register_de(client, shared, movie_id: str, info_text: str, frames: int = 2) -> dict:
    """A DE movie as DE writes it (CELLA -10 Å per pixel, whatever the pixel size) and
    its info.txt, registered in place; the dataset once its job is done."""
    nx = 8
    write_raw_mrc(shared / f"{movie_id}_movie.mrc", counting_movie((frames, nx, nx)), 101,
                  cella=(nx * DE_CELL_PER_PIXEL, nx * DE_CELL_PER_PIXEL,
                         frames * DE_CELL_PER_PIXEL))
    (shared / f"{movie_id}_info.txt").write_text(info_text)
    response = client.post("/v1/registrations",
                           json={"path": str(shared / f"{movie_id}_movie.mrc")})
    wait_job(client, response.json()["job"]["id"])
    return client.get(response.headers["location"]).json()


def test_direct_electron_movie_fills_the_catalog(client, tmp_path):
    """DE writes CELLA as -10 Å per pixel and its facts in info.txt. The negative cell is
    a placeholder ranked after info.txt (it used to be taken as the pixel size, its
    magnitude first): the pixel size is info.txt's, with no "sources disagree" warning;
    the rest comes from info.txt too, into the detail and the catalog columns."""
    ds = register_de(client, tmp_path / "shared", "20241021_00405", de_info_text())
    assert ds["status"] == "ready"
    assert {k: ds[k] for k in ("voltage_kv", "pixel_size_angstrom", "exposure_s",
                               "magnification", "camera", "total_dose")} == {
        "voltage_kv": 300, "pixel_size_angstrom": pytest.approx(0.827),
        "exposure_s": 0.045712, "magnification": 105000, "camera": "Apollo",
        "total_dose": None}
    acq = ds["acquisition"]
    assert acq["pixel_size_sources"] == [
        {"source": "de_info", "key": "Specimen Pixel Size X", "value": 0.827},
        {"source": "mrc_header", "key": "CELLA/MX", "value": 10.0, "placeholder": True}]
    assert {k: v for k, v in acq.items() if k != "pixel_size_sources"} \
        == {k: v for k, v in DE_SUMMARY.items() if k != "pixel_size_sources"}
    assert acq["sources"] == ["de_info"]
    assert [(f["severity"], f["field"]) for f in ds["sidecar_findings"]] == [
        ("info", "pixel_size_angstrom")]
    assert "-10 Å is a placeholder" in ds["sidecar_findings"][0]["message"]
    assert "cell length x is negative" in " ".join(f["message"] for f in ds["findings"])
    listed = client.get("/v1/datasets", params={"camera": "Apollo", "min_exposure": 0.04,
                                                "max_pixel_size": 0.83}).json()["items"]
    assert [d["id"] for d in listed] == [ds["id"]]


def test_direct_electron_minus_one_is_unknown_in_the_catalog(client, tmp_path):
    """TEM channel off: DE writes -1 for magnification, camera length and pixel sizes.
    None of them is a value: the catalog's magnification is unknown (not -1), and so is
    its pixel size: the only one left is the header's placeholder (-10 Å/px), which is
    listed and said to be one, never used as a value (#20 item 6)."""
    ds = register_de(client, tmp_path / "shared", "20241021_00406",
                     de_info_text(**DE_NOT_KNOWN))
    assert ds["status"] == "ready"
    assert ds["magnification"] is None and ds["voltage_kv"] == 300
    acq = ds["acquisition"]
    assert not {"magnification", "camera_length_m"} & set(acq)
    assert acq["pixel_size_sources"] == [
        {"source": "mrc_header", "key": "CELLA/MX", "value": 10.0, "placeholder": True}]
    assert ds["pixel_size_angstrom"] is None and "pixel_size_angstrom" not in acq
    assert [(f["severity"], f["field"]) for f in ds["sidecar_findings"]] == [
        ("info", "pixel_size_angstrom")]
    assert ds["sidecar_findings"][0]["message"].endswith(
        "no source has a real value, so the pixel size is unknown (a placeholder is never "
        "used as one)")
    ids = [d["id"] for d in client.get("/v1/datasets",
                                       params={"camera": "Apollo"}).json()["items"]]
    assert ids == [ds["id"]]


def test_direct_electron_pixel_not_square_through_the_api(client, tmp_path):
    """Specimen Pixel Size Y differs from X: both in the detail, the catalog's pixel size
    is X, and a warning says the pixels are not square. Sent after its movie."""
    ds = upload_and_wait(client, write_raw_mrc(tmp_path / "scan9_movie.mrc",
                                               counting_movie((2, 8, 8), seed=5), 101))
    response = put_sidecar(client, "scan9_info.txt", de_info_text(**DE_NOT_SQUARE))
    assert response.json()["sidecar"]["dataset_id"] == ds["id"]
    detail = client.get(f"/v1/datasets/{ds['id']}").json()
    assert detail["pixel_size_angstrom"] == pytest.approx(0.827)
    assert detail["acquisition"]["pixel_size_angstrom"] == 0.827
    assert detail["acquisition"]["pixel_size_y_angstrom"] == 0.835
    assert [(f["severity"], f["field"]) for f in detail["sidecar_findings"]] == [
        ("warning", "pixel_size_y_angstrom")]
    assert "the pixels are not square" in detail["sidecar_findings"][0]["message"]


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
    assert ds["voltage_kv"] == 300 and ds["camera"] == "BM-Falcon"
    assert ds["pixel_size_angstrom"] == 0.83 and ds["exposure_s"] == 0.05
    listed = client.get("/v1/datasets", params={"voltage_kv": 300}).json()["items"]
    assert [d["id"] for d in listed] == [ds["id"]]


def test_one_frame_epu_image_and_a_disagreeing_mdoc(client, tmp_path):
    """1024 reserved FEI1 records, one filled: one value per list. An .mdoc that says
    another pixel size: the header's stays in the catalog, with a finding that says so."""
    path = write_raw_mrc(tmp_path / "FoilHole_1_Data_2.mrc", synthetic(1, (1, 8, 8)), 1,
                         extended=fei_records(1, reserved=1023), exttyp=b"FEI1",
                         cella=(8 * 0.83, 8 * 0.83, 1.0))
    ds = upload_and_wait(client, path)
    acq = ds["acquisition"]
    assert acq["dose_per_image"] == [1.1] and acq["tilt_angles"] == [0.0]
    assert acq["timestamps"] == [1000.0] and ds["total_dose"] == 1.1
    assert ds["file"]["extended_header"]["n_records"] == 1024
    assert ds["file"]["extended_header"]["n_filled"] == 1
    assert ds["sidecar_findings"] == []
    mdoc = MDOC.replace("PixelSpacing = 0.83", "PixelSpacing = 1.66")
    body = put_sidecar(client, "FoilHole_1_Data_2.mrc.mdoc", mdoc).json()
    assert body["dataset"]["pixel_size_angstrom"] == pytest.approx(0.83)
    detail = client.get(f"/v1/datasets/{ds['id']}").json()
    assert detail["acquisition"]["sources"] == ["mrc_header", "mdoc", "fei_extended_header"]
    assert detail["acquisition"]["voltage_kv"] == 300
    assert detail["acquisition"]["tilt_angles"] == [-0.002]  # the mdoc's, for the 1 image
    warnings = [f for f in detail["sidecar_findings"] if f["field"] == "pixel_size_angstrom"]
    assert len(warnings) == 1 and warnings[0]["severity"] == "warning"
    assert "mdoc PixelSpacing: 1.66 Å" in warnings[0]["message"]
    assert warnings[0]["message"].endswith("the catalog uses 0.83 Å from mrc_header")


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
    assert (binary.status_code, binary.json()) == (400, {
        "error": "bad_request",
        "detail": "x.mdoc: a sidecar is text; this body holds NUL bytes"})
    big = client.put("/v1/uploads/y.mdoc", content=b"a = 1\n" * (3 << 20))
    assert (big.status_code, big.json()) == (413, {
        "error": "too_large", "detail": f"y.mdoc: a sidecar may be at most {16 << 20} bytes"})
    assert client.get("/v1/datasets", params={"name": ".mdoc"}).json()["items"] == []


@pytest.mark.parametrize("mdoc_first", [False, True])
def test_mdoc_uploaded_with_the_movie_in_one_multipart_request(client, movie, mdoc_first):
    parts = [("file", ("movie.mrc", movie.read_bytes())),
             ("mdoc", ("notes-for-it.mdoc", MDOC.encode()))]
    if mdoc_first:
        parts.reverse()
    response = client.post("/v1/uploads", files=parts)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["dataset"]["name"] == "movie.mrc"
    assert body["sidecars"] == [{"name": "notes-for-it.mdoc", "kind": "mdoc",
                                 "dataset_id": body["dataset"]["id"]}]
    wait_job(client, body["job"]["id"])
    ds = client.get(response.headers["location"]).json()
    assert ds["acquisition"]["voltage_kv"] == 300 and ds["status"] == "ready"
