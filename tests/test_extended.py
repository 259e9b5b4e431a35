"""Extended headers built byte by byte from the published layouts (FEI via mrcfile's
dtype as the oracle; SerialEM shorts per IMOD's mrc_format.txt)."""

import struct

import numpy as np
import pytest
from mrcfile.dtypes import get_ext_header_dtype

from service.mrc import MrcFile
from service.mrc.extended import FEI_RECORD_SIZES, fei_dtype, serialem_float, seri_bytes_for_flags
from tests.reference import synthetic, write_raw_mrc


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("exttyp, size", [(b"FEI1", 768), (b"FEI2", 888)])
def test_fei_records_decode(tmp_path, exttyp, size, order):
    oracle = get_ext_header_dtype(exttyp, order)
    assert oracle.itemsize == size
    records = np.zeros(3, dtype=oracle)
    records["Metadata size"] = size
    records["HT"] = 300e3
    records["Dose"] = [1.1e20, 1.2e20, 1.3e20]
    records["Pixel size X"] = 0.83e-10
    records["Magnification"] = 105000.0
    records["Integration time"] = 0.05
    records["Camera name"] = b"Falcon 4i"
    records["Fraction number"] = [0, 1, 2]
    path = write_raw_mrc(tmp_path / "f.mrc", synthetic(1, (3, 2, 2)), 1, order,
                         extended=records.tobytes(), exttyp=exttyp)
    with MrcFile(path) as f:
        assert f.extended.kind == exttyp.decode()
        got = f.extended.records
        assert f.findings == []
    assert [r["dose"] for r in got] == [1.1e20, 1.2e20, 1.3e20]
    assert {r["ht"] for r in got} == {300e3}
    assert got[0]["pixel_size_x"] == 0.83e-10
    assert got[0]["magnification"] == 105000.0
    assert got[0]["integration_time"] == 0.05
    assert got[0]["camera_name"] == "Falcon 4i"
    assert [r["fraction_number"] for r in got] == [0, 1, 2]


@pytest.mark.parametrize("exttyp", [b"FEI1", b"FEI2"])
def test_every_surfaced_fei_field_sits_where_mrcfile_has_it(exttyp):
    oracle = get_ext_header_dtype(exttyp, "<")
    at = {offset: dtype for dtype, offset in oracle.fields.values()}
    ours = fei_dtype(exttyp, "<")
    assert ours.itemsize == oracle.itemsize == FEI_RECORD_SIZES[exttyp]
    for name in ours.names:
        dtype, offset = ours.fields[name]
        assert at[offset] == dtype, name
    assert ("detector_commercial_name" in ours.names) == (exttyp == b"FEI2")


def test_epu_image_reserves_1024_records_and_fills_one(tmp_path):
    """A one-frame EPU image: NSYMBT holds 1024 records, only the first filled."""
    records = np.zeros(1024, dtype=get_ext_header_dtype(b"FEI1", "<"))
    records[0]["Metadata size"] = 768
    records[0]["HT"] = 300e3
    records[0]["Dose"] = 40e20
    records[1]["Metadata size"] = 768  # a size alone says nothing about an image
    path = write_raw_mrc(tmp_path / "epu.mrc", synthetic(1, (1, 4, 4)), 1,
                         extended=records.tobytes(), exttyp=b"FEI1")
    with MrcFile(path) as f:
        ext, findings = f.extended, f.findings
    assert findings == []
    assert len(ext.records) == 1024 and ext.filled[:3] == [True, False, False]
    assert [r["dose"] for r in ext.image_records()] == [40e20]
    assert [r["dose"] for r in ext.image_records(1)] == [40e20]
    assert ext.to_dict(max_records=2)["n_records"] == 1024
    assert ext.to_dict(max_records=2)["n_filled"] == 1


def test_fei_record_size_mismatch_is_a_warning(tmp_path):
    records = np.zeros(1, dtype=get_ext_header_dtype(b"FEI1", "<"))
    records["Metadata size"] = 700
    path = write_raw_mrc(tmp_path / "f.mrc", synthetic(1, (1, 2, 2)), 1,
                         extended=records.tobytes(), exttyp=b"FEI1")
    with MrcFile(path) as f:
        assert [x.field for x in f.findings] == ["extended_header"]


def two_short_float(value: float) -> tuple[int, int]:
    """Encode as SerialEM does (IMOD doc): |s1|*256 + (|s2| mod 256) scaled by 2**exp."""
    exp = 0
    mantissa = abs(value)
    while mantissa >= 32768 * 256:
        mantissa /= 2
        exp += 1
    while mantissa and mantissa < 32768 and exp > -127:
        mantissa *= 2
        exp -= 1
    m = int(round(mantissa))
    s1, low = m // 256, m % 256
    s2 = low + 256 * abs(exp)
    return (-s1 if value < 0 else s1), (-s2 if exp < 0 else s2)


@pytest.mark.parametrize("value", [0.0, 1.0, 2.5, 37.125, 1234.5])
def test_serialem_float_rule(value):
    s1, s2 = two_short_float(value)
    assert serialem_float(s1, s2) == pytest.approx(value, rel=1e-6)


def test_serialem_float_examples_from_the_formula():
    assert serialem_float(1, 0) == 256.0
    assert serialem_float(1, 3) == 259.0
    assert serialem_float(-1, 3 + 256) == -518.0
    assert serialem_float(1, -(256 * 2)) == 64.0


@pytest.mark.parametrize("order", ["<", ">"])
def test_seri_sections(tmp_path, order):
    flags = 1 | 2 | 4 | 8 | 16 | 32
    nint = seri_bytes_for_flags(flags)
    assert nint == 2 + 6 + 4 + 2 + 2 + 4
    sections = []
    for k, tilt in enumerate([-60.0, 0.0, 45.5]):
        s1, s2 = two_short_float(3.25 + k)
        shorts = [int(tilt * 100), 10 + k, 20, 40000 - 65536, round(12.4 * 25), int(-3 * 25),
                  810, int(0.5 * 25000), s1, s2]
        sections.append(struct.pack(order + "10h", *shorts))
    path = write_raw_mrc(tmp_path / "s.mrc", synthetic(1, (3, 2, 2)), 1, order,
                         extended=b"".join(sections), exttyp=b"SERI", nint=nint, nreal=flags)
    with MrcFile(path) as f:
        recs = f.extended.records
    assert [r["tilt_angle"] for r in recs] == [-60.0, 0.0, 45.5]
    assert recs[1]["piece_coordinates"] == [11, 20, 40000]
    assert recs[0]["stage_position"] == [12.4, -3.0]
    assert recs[0]["magnification"] == 81000
    assert recs[0]["intensity"] == 0.5
    assert [r["exposure_dose"] for r in recs] == pytest.approx([3.25, 4.25, 5.25])


def test_seri_flags_not_matching_nint_are_reported(tmp_path):
    path = write_raw_mrc(tmp_path / "s.mrc", synthetic(1, (1, 2, 2)), 1,
                         extended=b"\x00" * 32, exttyp=b"SERI", nint=32, nreal=1)
    with MrcFile(path) as f:
        assert f.extended.records == []
        assert [x.field for x in f.findings] == ["nint"]


def test_ccp4_symmetry_text_and_unknown_types(tmp_path):
    text = "X,Y,Z".ljust(80).encode() + "-X,Y+1/2,-Z".ljust(80).encode()
    path = write_raw_mrc(tmp_path / "c.mrc", synthetic(1, (1, 2, 2)), 1, extended=text,
                         exttyp=b"CCP4")
    with MrcFile(path) as f:
        assert f.extended.text == ["X,Y,Z", "-X,Y+1/2,-Z"]
    path = write_raw_mrc(tmp_path / "a.mrc", synthetic(1, (1, 2, 2)), 1, extended=b"\x01" * 8,
                         exttyp=b"AGAR")
    with MrcFile(path) as f:
        assert f.extended.kind == "AGAR" and f.extended.raw == b"\x01" * 8
        assert f.findings[0].severity.value == "info"
