"""cryoSPARC particle sets: .cs files written by cryosparc-tools (the library cryoSPARC
users script with) point into several stacks with repeated and out-of-order indices;
validation names bad rows, export matches the sources, every refusal says what and where."""

from __future__ import annotations

import io

import mrcfile
import numpy as np
import pytest
from cryosparc.dataset import CSDAT_FORMAT, Dataset

from service.mrc.particles import (ParticleSetError, export_stack, load_cs,
                                   open_particle_set)
from tests.reference import read_raw_header, synthetic, write_raw_mrc

#: The per-particle fields of a cryoSPARC extraction job's particles.cs (blob/*), plus
#: a location and an alignment field as later jobs add them.
PARTICLE_FIELDS = [("blob/path", "O"), ("blob/idx", "u4"), ("blob/shape", "u4", (2,)),
                   ("blob/psize_A", "f4"), ("blob/sign", "f4"), ("blob/import_sig", "u8"),
                   ("location/micrograph_path", "O"), ("location/center_x_frac", "f4"),
                   ("alignments2D/shift", "f4", (2,))]


def make_dataset(rows: list[tuple[str, int]]) -> Dataset:
    dset = Dataset.allocate(len(rows), PARTICLE_FIELDS)
    dset["uid"] = np.arange(1000, 1000 + len(rows), dtype=np.uint64)
    dset["blob/path"] = [path for path, _ in rows]
    dset["blob/idx"] = [idx for _, idx in rows]
    dset["blob/shape"] = [12, 12]
    dset["blob/psize_A"] = 1.06
    dset["blob/sign"] = -1.0
    dset["location/micrograph_path"] = [f"J2/motioncorrected/mic{k}.mrc"
                                        for k in range(len(rows))]
    dset["location/center_x_frac"] = np.linspace(0.1, 0.9, len(rows))
    dset["alignments2D/shift"] = np.array([(k, -k) for k in range(len(rows))], np.float32)
    return dset


def make_cs(rows: list[tuple[str, int]], **save) -> bytes:
    """A .cs as cryosparc-tools saves it (``Dataset.save``: numpy format, strings as
    fixed-width bytes)."""
    out = io.BytesIO()
    make_dataset(rows).save(out, **save)
    return out.getvalue()


def test_cryosparc_tools_cs_loads_with_its_fields_and_values():
    rows = [("J5/extract/a_particles.mrc", 3), ("J5/extract/b_particles.mrc", 0)]
    dset = make_dataset(rows)
    loaded = load_cs(make_cs(rows))
    assert list(loaded.dtype.names) == dset.fields()
    assert loaded.dtype["blob/path"].kind == "S"  # fixed-width bytes, not pickled objects
    for name in dset.fields():
        column = loaded[name]
        expected = dset[name]
        if column.dtype.kind == "S":
            assert [v.decode() for v in column] == list(expected), name
        else:
            assert column.tolist() == expected.tolist(), name
    # and cryosparc-tools reads the same bytes back to the same dataset
    again = Dataset.load(io.BytesIO(make_cs(rows)))
    assert list(again["blob/path"]) == [p for p, _ in rows]


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
    expected = np.stack([data[p.rsplit("/", 1)[1]][i] for p, i in ROWS])
    with mrcfile.open(str(out)) as m:
        assert np.array_equal(m.data, expected)
        assert float(m.voxel_size.x) == pytest.approx(1.06)
    header = read_raw_header(out.read_bytes())
    assert (header["ispg"], header["mxyz"][2]) == (0, 1)  # an image stack (MRC2014)
    assert (header["dmin"], header["dmax"]) == (expected.min(), expected.max())
    part = export_stack(pset, np.arange(1, 3), tmp_path / "part.mrc")
    with mrcfile.open(str(part)) as m:
        assert np.array_equal(m.data, expected[1:3])
    assert np.array_equal(pset.image(3), data["b_particles.mrc"][2])


def test_missing_stacks_and_bad_indices_are_findings_with_rows(stacks, tmp_path):
    folder, _ = stacks
    rows = ROWS + [("J5/extract/gone.mrc", 0), ("a_particles.mrc", 5),
                   ("b_particles.mrc", 7), ("J5/extract/gone.mrc", 1)]
    pset = open_particle_set(load_cs(make_cs(rows)), folder)
    found = [(f.severity.value, f.field, f.message) for f in pset.findings]
    assert sorted(found) == sorted([
        ("error", "blob/idx", "index out of range for 'b_particles.mrc' "
                              "(3 sections, 0-based): row 7"),
        ("error", "blob/idx", "index out of range for 'a_particles.mrc' "
                              "(5 sections, 0-based): row 6"),
        ("error", "blob/path", f"stack 'J5/extract/gone.mrc' not found as "
                               f"{str(folder / 'gone.mrc')!r}: rows 5, 8"),
    ])
    assert pset.valid_rows.tolist() == [True] * 5 + [False] * 4
    with pytest.raises(ParticleSetError, match=r"unusable rows \(rows 5, 6, 7, 8\)"):
        export_stack(pset, np.arange(len(rows)), tmp_path / "x.mrc")
    with pytest.raises(ParticleSetError, match="row 6 points at a missing stack or an index"):
        pset.image(6)
    assert not (tmp_path / "x.mrc").exists()


def test_bad_cs_files(tmp_path):
    with pytest.raises(ParticleSetError, match="not a numpy"):
        load_cs(b"junk" * 10)
    # cryosparc-tools' records without fixed=True keep Python strings: saving them needs
    # pickling, which the loader refuses (unpickling a client's file runs its code)
    pickled = io.BytesIO()
    np.save(pickled, make_dataset(ROWS).to_records(), allow_pickle=True)
    with pytest.raises(ParticleSetError, match="object \\(pickled\\) columns"):
        load_cs(pickled.getvalue())
    # cryosparc-tools' compressed-stream format is recognised and explained
    with pytest.raises(ParticleSetError, match=r"compressed-stream \(CSDAT\).*Dataset\.save"):
        load_cs(make_cs(ROWS, format=CSDAT_FORMAT))
    plain = io.BytesIO()
    np.save(plain, np.arange(3))
    with pytest.raises(ParticleSetError, match="1-D structured array"):
        load_cs(plain.getvalue())
    no_idx = io.BytesIO()
    np.save(no_idx, make_dataset(ROWS).to_records(fixed=True)[["uid", "blob/path"]])
    with pytest.raises(ParticleSetError, match="no blob/idx field; it has \\['uid', 'blob/path'\\]"):
        load_cs(no_idx.getvalue())
    path = tmp_path / "on_disk.cs"  # cryosparc-tools writing a file; the loader reading it
    make_dataset(ROWS).save(path)
    assert load_cs(path)["blob/idx"].tolist() == [i for _, i in ROWS]


# -- through the API -------------------------------------------------------------------

def test_particle_set_api(tmp_path, stacks):
    from PIL import Image

    from tests.api_helpers import make_client
    from tests.test_api import error_of
    folder, data = stacks
    rows = ROWS + [("J5/extract/gone.mrc", 0)]
    dset = make_dataset(rows)
    with make_client(tmp_path / "data", allowed_roots=[folder.parent]) as c:
        created = c.post("/v1/particle-sets", params={"folder": str(folder)},
                         files={"file": ("P1_J5_particles.cs", make_cs(rows))})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["rows"] == 6 and body["usable_rows"] == 5
        assert body["findings"] == [{
            "severity": "error", "field": "blob/path",
            "message": f"stack 'J5/extract/gone.mrc' not found as "
                       f"{str(folder / 'gone.mrc')!r}: row 5"}]
        assert [f["name"] for f in body["fields"]] == dset.fields()
        base = created.headers["location"]
        page = c.get(f"{base}/particles", params={"offset": 1, "limit": 2}).json()
        assert page["total"] == 6 and page["next_offset"] == 3
        for item, k in zip(page["items"], (1, 2)):  # every field as cryosparc-tools holds it
            values = {name: dset[name][k] for name in dset.fields()}
            assert item == {"row": k, "usable": True, **{
                name: v.tolist() if isinstance(v, np.ndarray | np.generic) else v
                for name, v in values.items()}}
        png = c.get(f"{base}/particles/3.png", params={"clip": 0})
        image = np.asarray(Image.open(io.BytesIO(png.content)))
        source = data["b_particles.mrc"][2].astype(np.float64)
        expected = np.floor((source - source.min()) * 255 / np.ptp(source) + 0.5)
        assert np.abs(image.astype(int) - expected).max() <= 1
        detail = error_of(c.get(f"{base}/particles/5.png"), 422, "unprocessable")
        assert "row 5 points at a missing stack" in detail  # its stack is gone
        detail = error_of(c.get(f"{base}/particles/9.png"), 404, "not_found")
        assert detail == "particle 9 out of range: the set has 6 rows"
        export = c.get(f"{base}/export", params={"rows": "0:5"})
        assert export.status_code == 200
        assert 'filename="P1_J5_particles-0-5.mrcs"' in export.headers["content-disposition"]
        out = tmp_path / "export.mrcs"
        out.write_bytes(export.content)
        with mrcfile.open(str(out)) as m:
            expected = np.stack([data[p.rsplit("/", 1)[1]][i] for p, i in ROWS])
            assert np.array_equal(m.data, expected)
        detail = error_of(c.get(f"{base}/export"), 422, "unprocessable")
        assert "unusable rows (row 5)" in detail  # includes the missing stack
        detail = error_of(c.get(f"{base}/export", params={"rows": "4:2"}), 400, "bad_request")
        assert "'4:2'" in detail and "0:6" in detail
        raw = c.post("/v1/particle-sets", params={"folder": str(folder), "name": "p.cs"},
                     content=make_cs(ROWS[:2]), headers={"content-type":
                                                         "application/octet-stream"})
        assert raw.status_code == 201 and raw.json()["findings"] == []
        assert raw.json()["rows"] == 2 and raw.json()["usable_rows"] == 2
        outside = c.post("/v1/particle-sets", params={"folder": str(tmp_path.parent)},
                         content=make_cs(ROWS), headers={"content-type": "x/y"})
        detail = error_of(outside, 403, "path_not_allowed")
        assert repr(str(tmp_path.parent)) in detail and "outside the allowed roots" in detail
        junk = c.post("/v1/particle-sets", params={"folder": str(folder), "name": "j.cs"},
                      content=b"junk" * 100, headers={"content-type": "x/y"})
        assert "NUMPY magic" in error_of(junk, 422, "unprocessable")
        csdat = c.post("/v1/particle-sets", params={"folder": str(folder), "name": "s.cs"},
                       content=make_cs(ROWS, format=CSDAT_FORMAT),
                       headers={"content-type": "x/y"})
        assert "CSDAT" in error_of(csdat, 422, "unprocessable")
        assert c.delete(base).json() == {"deleted": base.rsplit("/", 1)[1]}
        assert "no particle set" in error_of(c.get(base), 404, "not_found")
    assert sorted(p.name for p in folder.iterdir()) == ["a_particles.mrc", "b_particles.mrc"]
