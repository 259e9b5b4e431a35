"""End to end against a real server: ``mrc-ingest serve`` (uvicorn) on 127.0.0.1, a
304 MB 4-bit movie streamed through ``PUT`` by httpx, then metadata, a full-size frame
preview decoded with Pillow, and the archive download read back by ``mrcz``."""

from __future__ import annotations

import hashlib
import io
import socket
import time

import httpx
import mrcz
import numpy as np
import pytest
from PIL import Image

from tests.api_helpers import start_server
from tests.reference import raw_header

NX = NY = 4096
NZ = 38  # 38 x 8 MiB = 304 MiB of packed 4-bit data


def packed_frame(k: int) -> np.ndarray:
    """Frame k's packed bytes (two counts per byte, low nibble first): sparse counts, 0
    or 1 at random, with a few 15s, as a counting camera at low dose gives them."""
    rng = np.random.default_rng(k)
    packed = rng.integers(0, 256, size=(NY, NX // 2), dtype=np.uint8) & 0x11
    packed[::97, ::89] = 0xFF
    return packed


def unpacked(packed: np.ndarray) -> np.ndarray:
    """The obvious unpacking: low nibble is the even pixel, high nibble the odd one."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


@pytest.fixture(scope="module")
def movie(tmp_path_factory):
    path = tmp_path_factory.mktemp("live") / "big.mrc"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        header = raw_header(nx=NX, ny=NY, nz=NZ, mode=101, cella=(NX * 0.83, NY * 0.83, NZ))
        f.write(header)
        digest.update(header)
        for k in range(NZ):
            block = packed_frame(k).tobytes()
            f.write(block)
            digest.update(block)
    yield path, digest.hexdigest()
    path.unlink()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("live-data")
    proc, base = start_server(data_dir, "--workers", "2")
    yield base, data_dir
    proc.terminate()
    proc.wait(timeout=30)


def test_stream_300mb_movie_through_put(server, movie):
    server, _data_dir = server
    path, sha = movie
    size = path.stat().st_size
    assert size >= 300 * 10**6

    def body():
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    with httpx.Client(base_url=server, timeout=120) as client:
        response = client.put("/v1/uploads/big.mrc", content=body(),
                              headers={"Content-Length": str(size), "X-Content-SHA256": sha})
        assert response.status_code == 201, response.text  # ingested while it streamed
        job = client.get(f"/v1/jobs/{response.json()['job']['id']}").json()
        assert job["state"] == "done" and job["kind"] == "upload", job

        ds = client.get(response.headers["location"]).json()
        assert ds["status"] == "ready" and ds["sha256"] == sha and ds["size_bytes"] == size
        assert (ds["mode"], ds["nx"], ds["ny"], ds["frames"]) == (101, NX, NY, NZ)
        assert ds["pixel_size_angstrom"] == pytest.approx(0.83)
        assert ds["stats"]["dmin"] == 0 and ds["stats"]["dmax"] == 15

        k = 17
        frame = unpacked(packed_frame(k))
        png = client.get(f"/v1/datasets/{ds['id']}/frames/{k}.png",
                         params={"size": NX, "clip": 0})
        assert png.status_code == 200
        image = np.asarray(Image.open(io.BytesIO(png.content)))
        expected = np.floor(frame.astype(np.float64) * 255.0 / 15.0 + 0.5).astype(np.uint8)
        assert np.array_equal(image, expected)

        out = path.with_name("download.mrcz")
        with client.stream("GET", f"/v1/datasets/{ds['id']}/download",
                           params={"format": "mrcz"}) as download:
            assert download.status_code == 200
            length = int(download.headers["content-length"])
            with open(out, "wb") as f:
                for chunk in download.iter_bytes(1 << 20):
                    f.write(chunk)
        assert out.stat().st_size == length == ds["archive"]["bytes"]
        assert ds["storage"]["form"] == "archive" and ds["stored_bytes"] < size / 1.9
        received = hashlib.sha256()
        with client.stream("GET", f"/v1/datasets/{ds['id']}/download") as download:
            assert download.headers["content-length"] == str(size)
            for chunk in download.iter_bytes(1 << 20):
                received.update(chunk)
        assert received.hexdigest() == sha  # the file as received, rebuilt
    values, header = mrcz.readMRC(str(out))
    out.unlink()
    assert values.shape == (NZ, NY, NX) and values.dtype == np.int8
    for k in (0, 17, NZ - 1):
        assert np.array_equal(values[k], unpacked(packed_frame(k)))


def test_client_hanging_up_mid_upload_leaves_nothing(server, movie):
    """A microscope PC that loses the network mid-movie: the partial upload is removed,
    no dataset appears, and the server keeps serving."""
    base, data_dir = server
    path, _ = movie
    host, port = base.removeprefix("http://").split(":")
    before = httpx.get(f"{base}/v1/datasets").json()["items"]
    with socket.create_connection((host, int(port))) as sock, open(path, "rb") as f:
        sock.sendall(f"PUT /v1/uploads/cut.mrc HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Length: {path.stat().st_size}\r\n\r\n".encode())
        for _ in range(20):  # 20 MiB of a 304 MiB body, then the cable is pulled
            sock.sendall(f.read(1 << 20))
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while any((data_dir / "incoming").iterdir()):
        assert time.monotonic() < deadline, list((data_dir / "incoming").iterdir())
        time.sleep(0.05)
    assert httpx.get(f"{base}/v1/datasets").json()["items"] == before
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert [p for p in data_dir.rglob("*.part")] == []
