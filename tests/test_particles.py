"""cryoSPARC particle sets: .cs files written with numpy point into several stacks with
repeated and out-of-order indices; validation names bad rows, export matches the sources."""

from __future__ import annotations

import io

import mrcfile
import numpy as np
import pytest

from service.mrc.particles import (ParticleSetError, export_stack, load_cs,
                                   open_particle_set)
from tests.reference import synthetic, write_raw_mrc


def make_cs(rows: list[tuple[str, int]], extra: bool = True) -> bytes:
    dtype = [("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4")]
    if extra:
        dtype += [("blob/psize_A", "<f4"), ("alignments2D/shift", "<f4", (2,))]
    array = np.zeros(len(rows), dtype=dtype)
    for k, (path, idx) in enumerate(rows):
        array[k]["uid"] = 1000 + k
        array[k]["blob/path"] = path.encode()
        array[k]["blob/idx"] = idx
        if extra:
            array[k]["blob/psize_A"] = 1.06
            array[k]["alignments2D/shift"] = (k, -k)
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


@pytest.fixture
def stacks(tmp_path):
    folder = tmp_path / "extract"
    folder.mkdir()
    data = {name: synthetic(2, (n, 12, 12), seed=i)
            for i, (name, n) in enumerate((("a_particles.mrc", 5), ("b_particles.mrc", 3)))}
    for name, images in data.items():
        write_raw_mrc(folder / name, images, 2, cella=(12 * 1.06, 12 * 1.06, 1))
    return folder, data


ROWS = [("J5/extract/b_particles.mrc", 2), ("J5/extract/a_particles.mrc", 4),
        ("J5/extract/a_particles.mrc", 0), ("J5/extract/b_particles.mrc", 2),
        ("J5/extract/a_particles.mrc", 3)]


def test_export_in_row_order_matches_the_sources(stacks, tmp_path):
    folder, data = stacks
    pset = open_particle_set(load_cs(make_cs(ROWS)), folder)
    assert pset.findings == []
    assert {n: s.sections for n, s in pset.stacks.items()} == {
        "J5/extract/b_particles.mrc": 3, "J5/extract/a_particles.mrc": 5}
    out = export_stack(pset, np.arange(len(ROWS)), tmp_path / "out.mrc")
    with mrcfile.open(str(out)) as m:
        expected = np.stack([data[p.rsplit("/", 1)[1]][i] for p, i in ROWS])
        assert np.array_equal(m.data, expected)
        assert float(m.voxel_size.x) == pytest.approx(1.06)
    part = export_stack(pset, np.arange(1, 3), tmp_path / "part.mrc")
    with mrcfile.open(str(part)) as m:
        assert np.array_equal(m.data, expected[1:3])
    assert np.array_equal(pset.image(3), data["b_particles.mrc"][2])


def test_missing_stacks_and_bad_indices_are_findings_with_rows(stacks, tmp_path):
    folder, _ = stacks
    rows = ROWS + [("J5/extract/gone.mrc", 0), ("a_particles.mrc", 5),
                   ("b_particles.mrc", 7), ("J5/extract/gone.mrc", 1)]
    pset = open_particle_set(load_cs(make_cs(rows)), folder)
    messages = sorted(f.message for f in pset.findings)
    assert any("gone.mrc" in m and "rows 5, 8" in m for m in messages)
    assert any("a_particles.mrc" in m and "5 sections" in m and "row 6" in m for m in messages)
    assert any("b_particles.mrc" in m and "row 7" in m for m in messages)
    assert pset.valid_rows.tolist() == [True] * 5 + [False] * 4
    with pytest.raises(Exception, match="unusable rows"):
        export_stack(pset, np.arange(len(rows)), tmp_path / "x.mrc")
    assert not (tmp_path / "x.mrc").exists()


def test_bad_cs_files(tmp_path):
    with pytest.raises(ParticleSetError, match="not a numpy"):
        load_cs(b"junk" * 10)
    pickled = io.BytesIO()
    np.save(pickled, np.array([("x", 1)], dtype=[("blob/path", "O"), ("blob/idx", "<u4")]),
            allow_pickle=True)
    with pytest.raises(ParticleSetError, match="pickled"):
        load_cs(pickled.getvalue())
    plain = io.BytesIO()
    np.save(plain, np.arange(3))
    with pytest.raises(ParticleSetError, match="structured"):
        load_cs(plain.getvalue())
    no_idx = io.BytesIO()
    np.save(no_idx, np.zeros(2, dtype=[("blob/path", "S8")]))
    with pytest.raises(ParticleSetError, match="blob/idx"):
        load_cs(no_idx.getvalue())


# -- through the API -------------------------------------------------------------------

def test_particle_set_api(tmp_path, stacks):
    from PIL import Image

    from tests.api_helpers import make_client
    folder, data = stacks
    rows = ROWS + [("J5/extract/gone.mrc", 0)]
    with make_client(tmp_path / "data", allowed_roots=[folder.parent]) as c:
        created = c.post("/v1/particle-sets", params={"folder": str(folder)},
                         files={"file": ("P1_J5_particles.cs", make_cs(rows))})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["rows"] == 6 and body["usable_rows"] == 5
        assert body["findings"][0]["field"] == "blob/path" and "row 5" in \
            body["findings"][0]["message"]
        assert {f["name"] for f in body["fields"]} >= {"uid", "blob/path", "blob/idx"}
        base = created.headers["location"]
        page = c.get(f"{base}/particles", params={"offset": 1, "limit": 2}).json()
        assert page["total"] == 6 and page["next_offset"] == 3
        assert page["items"][0] == {"row": 1, "usable": True, "uid": 1001,
                                    "blob/path": "J5/extract/a_particles.mrc", "blob/idx": 4,
                                    "blob/psize_A": pytest.approx(1.06),
                                    "alignments2D/shift": [1.0, -1.0]}
        png = c.get(f"{base}/particles/3.png", params={"clip": 0})
        image = np.asarray(Image.open(io.BytesIO(png.content)))
        source = data["b_particles.mrc"][2].astype(np.float64)
        expected = np.floor((source - source.min()) * 255 / np.ptp(source) + 0.5)
        assert np.abs(image.astype(int) - expected).max() <= 1
        assert c.get(f"{base}/particles/5.png").status_code == 422  # its stack is gone
        assert c.get(f"{base}/particles/9.png").status_code == 404
        export = c.get(f"{base}/export", params={"rows": "0:5"})
        assert export.status_code == 200
        assert 'filename="P1_J5_particles-0-5.mrcs"' in export.headers["content-disposition"]
        out = tmp_path / "export.mrcs"
        out.write_bytes(export.content)
        with mrcfile.open(str(out)) as m:
            expected = np.stack([data[p.rsplit("/", 1)[1]][i] for p, i in ROWS])
            assert np.array_equal(m.data, expected)
        assert c.get(f"{base}/export").status_code == 422  # includes the missing stack
        assert c.get(f"{base}/export", params={"rows": "4:2"}).status_code == 400
        raw = c.post("/v1/particle-sets", params={"folder": str(folder), "name": "p.cs"},
                     content=make_cs(ROWS[:2]), headers={"content-type":
                                                         "application/octet-stream"})
        assert raw.status_code == 201 and raw.json()["findings"] == []
        outside = c.post("/v1/particle-sets", params={"folder": str(tmp_path.parent)},
                         content=make_cs(ROWS), headers={"content-type": "x/y"})
        assert outside.status_code == 403
        junk = c.post("/v1/particle-sets", params={"folder": str(folder), "name": "j.cs"},
                      content=b"junk" * 100, headers={"content-type": "x/y"})
        assert junk.status_code == 422 and "NUMPY" in junk.json()["detail"]
        assert c.delete(base).status_code == 200
        assert c.get(base).status_code == 404
    assert sorted(p.name for p in folder.iterdir()) == ["a_particles.mrc", "b_particles.mrc"]
