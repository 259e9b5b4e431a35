"""Shared storage written by someone hostile (issue "Nothing read outside the roots"):
sidecars and movies that are symlinks or hard links to files outside the roots, to
``/proc/self/environ`` or ``/etc/passwd``; a FIFO named like a sidecar; a sidecar far too
big; a folder swapped for a symlink after registration; a registered file replaced. In
every case no byte from outside reaches any answer, the request gets a finding or a 4xx
JSON error, and the service still answers. A real folder, a real service (TestClient)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.api_helpers import make_client, wait_job
from tests.reference import counting_movie, write_raw_mrc
from tests.test_acquisition import MDOC, de_info_text

#: text that must never appear in an answer: it lives only outside the roots
SECRET = "S3CRET-outside-the-roots-7f3a9c"


@pytest.fixture
def place(tmp_path):
    shared, outside = tmp_path / "shared", tmp_path / "outside"
    shared.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(
        de_info_text(**{"Secret": f"Secret = {SECRET}"}) + MDOC.replace("300", SECRET))
    with make_client(tmp_path / "data", allowed_roots=[shared]) as client:
        yield client, shared, outside


def register(client, path: Path) -> dict:
    response = client.post("/v1/registrations", json={"path": str(path)})
    assert response.status_code in (201, 202), response.text
    wait_job(client, response.json()["job"]["id"])
    return client.get(response.headers["location"]).json()


def all_answers(client, dataset_id: str) -> str:
    """Every answer a read token can get about the dataset, as one text."""
    parts = [client.get(f"/v1/datasets/{dataset_id}").text,
             client.get("/v1/datasets").text,
             client.get(f"/v1/datasets/{dataset_id}/frames/stats").text]
    return "\n".join(parts)


def environ_values() -> list[str]:
    """Values of this process's start-up environment long enough to be unmistakable."""
    raw = Path("/proc/self/environ").read_bytes().split(b"\0")
    values = [item.partition(b"=")[2].decode("utf-8", "replace") for item in raw]
    return [v for v in values if len(v) >= 12 and "/" in v]


def refused(ds: dict, name: str) -> list[dict]:
    return [f for f in ds["sidecar_findings"] if f["field"] == f"sidecar:{name}"]


@pytest.mark.parametrize("target", ["outside", "/proc/self/environ", "/etc/passwd"])
def test_symlinked_info_txt_is_a_finding_not_content(place, target):
    client, shared, outside = place
    write_raw_mrc(shared / "X_movie.mrc", counting_movie((2, 8, 8)), 101)
    os.symlink(outside / "secret.txt" if target == "outside" else target,
               shared / "X_info.txt")
    ds = register(client, shared / "X_movie.mrc")
    assert ds["status"] == "ready"
    assert "de_info" not in ds["sidecars"]
    (finding,) = refused(ds, "X_info.txt")
    assert finding["severity"] == "warning" and "symlink" in finding["message"]
    text = all_answers(client, ds["id"])
    assert SECRET not in text and "root:x:0:0" not in text
    assert not [v for v in environ_values() if v in text]


def test_symlinked_mdoc_and_hard_linked_info_are_refused(place):
    client, shared, outside = place
    write_raw_mrc(shared / "Y_movie.mrc", counting_movie((2, 8, 8)), 101)
    os.symlink(outside / "secret.txt", shared / "Y_movie.mrc.mdoc")
    os.link(outside / "secret.txt", shared / "Y_info.txt")
    ds = register(client, shared / "Y_movie.mrc")
    assert ds["status"] == "ready" and ds["sidecars"] == {}
    assert "symlink" in refused(ds, "Y_movie.mrc.mdoc")[0]["message"]
    assert "2 hard links" in refused(ds, "Y_info.txt")[0]["message"]
    assert SECRET not in all_answers(client, ds["id"])


def test_a_link_inside_the_roots_is_still_refused_as_a_sidecar(place):
    """A sidecar is a name beside its movie: a symlink there is refused even when it
    points inside the roots (it would let one user's text stand as another's)."""
    client, shared, _ = place
    write_raw_mrc(shared / "Z_movie.mrc", counting_movie((2, 8, 8)), 101)
    (shared / "elsewhere.txt").write_text(de_info_text())
    os.symlink(shared / "elsewhere.txt", shared / "Z_info.txt")
    ds = register(client, shared / "Z_movie.mrc")
    assert "de_info" not in ds["sidecars"] and refused(ds, "Z_info.txt")


def test_fifo_named_like_a_sidecar_does_not_hang(place):
    client, shared, _ = place
    write_raw_mrc(shared / "F_movie.mrc", counting_movie((2, 8, 8)), 101)
    os.mkfifo(shared / "F_info.txt")
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(ds=register(client,
                                                                    shared / "F_movie.mrc")))
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "registration hung on a FIFO"
    ds = done["ds"]
    assert ds["status"] == "ready" and "FIFO" in refused(ds, "F_info.txt")[0]["message"]
    assert client.get("/healthz").status_code == 200


def test_a_sidecar_of_100_MB_is_not_read(place):
    client, shared, _ = place
    write_raw_mrc(shared / "B_movie.mrc", counting_movie((2, 8, 8)), 101)
    with open(shared / "B_info.txt", "wb") as f:
        f.truncate(100 << 20)  # sparse: 100 MB of size, no disk
    ds = register(client, shared / "B_movie.mrc")
    assert ds["status"] == "ready" and "de_info" not in ds["sidecars"]
    assert "more than" in refused(ds, "B_info.txt")[0]["message"]


def test_a_plain_sidecar_still_counts(place):
    client, shared, _ = place
    write_raw_mrc(shared / "P_movie.mrc", counting_movie((2, 8, 8)), 101)
    (shared / "P_movie.mrc.mdoc").write_text(MDOC)
    ds = register(client, shared / "P_movie.mrc")
    assert ds["acquisition"]["voltage_kv"] == 300 and ds["sidecar_findings"] == []


@pytest.mark.parametrize("kind", ["fifo", "symlink_out", "hard_link", "proc"])
def test_a_hostile_movie_is_refused_at_registration(place, kind):
    client, shared, outside = place
    path = shared / "m.mrc"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink_out":
        write_raw_mrc(outside / "m.mrc", counting_movie((2, 8, 8)), 101)
        os.symlink(outside / "m.mrc", path)
    elif kind == "hard_link":
        write_raw_mrc(outside / "m.mrc", counting_movie((2, 8, 8)), 101)
        os.link(outside / "m.mrc", path)
    else:
        os.symlink("/proc/self/environ", path)
    response = client.post("/v1/registrations", json={"path": str(path)})
    body = response.json()
    if kind == "fifo":
        assert (response.status_code, body["error"]) == (422, "unprocessable")
        assert "is not a regular file (a FIFO)" in body["detail"]
    else:
        assert (response.status_code, body["error"]) == (403, "path_not_allowed"), body
    assert str(path) in body["detail"]
    assert client.get("/v1/datasets").json()["items"] == []


def incompressible_movie(path: Path) -> Path:
    """Random bytes in mode 0: no archive is smaller, so the registered file stays the
    source and is read again for every as-received download."""
    import numpy as np
    data = np.random.default_rng(7).integers(-128, 128, (2, 64, 64), dtype=np.int8)
    return write_raw_mrc(path, data, 0)


def test_folder_swapped_for_a_symlink_after_registration(place):
    client, shared, outside = place
    (shared / "run").mkdir()
    movie = incompressible_movie(shared / "run" / "m.mrc")
    original = movie.read_bytes()
    ds = register(client, movie)
    assert ds["status"] == "ready" and ds["storage"]["form"] == "registered", ds["storage"]
    download = client.get(f"/v1/datasets/{ds['id']}/download")
    assert download.status_code == 200 and download.content == original
    # Someone moves the folder away and puts a link to their own copy in its place.
    os.rename(shared / "run", outside / "run-moved")
    (outside / "evil").mkdir()
    (outside / "evil" / "m.mrc").write_bytes(original[:1024] + SECRET.encode()
                                             * ((len(original) - 1024) // len(SECRET) + 1))
    os.symlink(outside / "evil", shared / "run")
    response = client.get(f"/v1/datasets/{ds['id']}/download")
    assert response.status_code == 409, response.text
    assert SECRET not in response.text and "symlink" in response.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_registered_file_replaced_after_registration(place):
    client, shared, _ = place
    movie = incompressible_movie(shared / "r.mrc")
    ds = register(client, movie)
    identity = ds["storage"]["form"]
    assert identity == "registered"
    replacement = movie.with_name("r.new")
    replacement.write_bytes(movie.read_bytes())  # same bytes, another file
    os.replace(replacement, movie)
    response = client.get(f"/v1/datasets/{ds['id']}/download")
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert "changed after it was registered" in detail and "ino" in detail


def test_particle_stacks_are_opened_inside_the_roots(place):
    """A stack linked out of the roots is a finding; a link inside them is followed (as
    cryoSPARC's imported folders do); a stack replaced after the set was registered is a
    409 at its next open, with no byte of the new file served."""
    import numpy as np

    from tests.test_particles import make_cs
    client, shared, outside = place
    folder = shared / "J5" / "extract"
    folder.mkdir(parents=True)
    stack = np.arange(2 * 12 * 12, dtype=np.float32).reshape(2, 12, 12)
    write_raw_mrc(outside / "evil.mrc", stack, 2)
    os.symlink(outside / "evil.mrc", folder / "evil.mrc")
    write_raw_mrc(shared / "real.mrc", stack, 2)
    os.symlink(shared / "real.mrc", folder / "good.mrc")
    rows = [("J5/extract/good.mrc", 0), ("J5/extract/good.mrc", 1), ("J5/extract/evil.mrc", 0)]
    created = client.post("/v1/particle-sets", params={"folder": str(folder)},
                          files={"file": ("P_particles.cs", make_cs(rows))})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["usable_rows"] == 2
    (finding,) = body["findings"]
    assert "'J5/extract/evil.mrc'" in finding["message"] and "outside" in finding["message"]
    base = created.headers["location"]
    assert client.get(f"{base}/particles/1.png").status_code == 200
    # The target of the good link is replaced by another file (another inode).
    write_raw_mrc(shared / "real.new", stack[::-1].copy(), 2)
    os.replace(shared / "real.new", shared / "real.mrc")
    client.app.state.service.particle_sets._loaded.clear()  # as after a restart
    response = client.get(f"{base}/particles/0.png")
    assert response.status_code == 409, response.text
    assert "changed after the set was registered" in response.json()["detail"]
