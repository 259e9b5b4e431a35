"""Acquisition metadata: .mdoc parsed like mdocfile (the oracle) reads it, Direct Electron
info.txt, FEI/SERI extended headers summarized in fixed units; bad lines are findings."""

from __future__ import annotations

import math

import mdocfile
import numpy as np
import pytest

from service.mrc.acquisition import parse_key_values, parse_mdoc, summarize
from service.mrc.extended import decode

MDOC = """PixelSpacing = 0.83
Voltage = 300
ImageFile = movie.mrc
ImageSize = 4096 4096
DataMode = 101

[T = SerialEM: Digitized on EMBL Krios  14-Nov-26  10:00:01]

[ZValue = 0]
TiltAngle = -0.002
StagePosition = 12.5 -3.25
StageZ = 1.5
Magnification = 105000
Intensity = 0.123
ExposureDose = 1.2
PixelSpacing = 0.83
SpotSize = 7
ExposureTime = 2.5
Binning = 1
NumSubFrames = 40
DateTime = 14-Nov-26  10:00:05

[ZValue = 1]
TiltAngle = 3.0
ExposureDose = 1.25
ExposureTime = 2.5
DateTime = 14-Nov-26  10:00:09
"""


def test_mdoc_agrees_with_mdocfile(tmp_path):
    path = tmp_path / "movie.mrc.mdoc"
    path.write_text(MDOC)
    oracle = mdocfile.read(str(path)).to_dict("records")
    doc = parse_mdoc(MDOC)
    assert doc.findings == []
    assert doc.titles == ["SerialEM: Digitized on EMBL Krios  14-Nov-26  10:00:01"]
    assert len(doc.sections) == len(oracle) == 2
    for ours, theirs in zip(doc.sections, oracle):
        for key, value in ours.items():
            expected = theirs[key]
            if isinstance(expected, tuple):
                assert list(expected) == value, key
            elif isinstance(expected, float):
                assert math.isclose(expected, value), key
            else:
                assert expected == value, key
    for key in ("PixelSpacing", "Voltage", "DataMode"):
        assert float(oracle[0][key]) == doc.globals[key]
    assert list(oracle[0]["ImageSize"]) == doc.globals["ImageSize"]


def test_mdoc_summary():
    summary = summarize(mdoc=parse_mdoc(MDOC))
    assert summary["voltage_kv"] == 300 and summary["pixel_size_angstrom"] == 0.83
    assert summary["dose_per_image"] == [1.2, 1.25]
    assert summary["total_dose"] == pytest.approx(2.45)
    assert summary["exposure_time_s"] == 2.5
    assert summary["tilt_angles"] == [-0.002, 3.0]
    assert summary["magnification"] == 105000
    assert summary["stage_positions"] == [[12.5, -3.25]]
    assert summary["datetimes"] == ["14-Nov-26  10:00:05", "14-Nov-26  10:00:09"]
    assert summary["subframes"] == 40 and summary["sources"] == ["mdoc"]


def test_malformed_mdoc_lines_are_findings():
    doc = parse_mdoc("Voltage = 300\njunk line\n[ZValue = 0\n= 5\n[ZValue = 0]\nTiltAngle = "
                     "1\nTiltAngle = 2\n\x00\x01 = x\n[Weird = 1]\n")
    messages = [f"{f.severity.value}: {f.message}" for f in doc.findings]
    assert any("line 2" in m and "not 'Key = Value'" in m for m in messages)
    assert any("line 3" in m and "malformed section" in m for m in messages)
    assert any("line 4" in m for m in messages)
    assert any("line 7" in m and "repeated" in m for m in messages)
    assert any("line 8" in m for m in messages)
    assert any("Weird" in m for m in messages)
    assert doc.sections[0] == {"ZValue": 0, "TiltAngle": 2}
    assert summarize(mdoc=parse_mdoc("\x00garbage")) == {"sources": ["mdoc"]}


def test_direct_electron_info():
    text = ("Scan - Size X = 256\nScan - Size Y = 128\nVoltage = 200\n"
            "Frames Per Second = 1500.5\nCamera Model = Apollo\nbroken line\n")
    values, findings = parse_key_values(text, "de_info")
    assert values["Scan - Size X"] == 256 and values["Camera Model"] == "Apollo"
    assert values["Frames Per Second"] == 1500.5
    assert [f.field for f in findings] == ["de_info"] and "line 6" in findings[0].message
    summary = summarize(de_info=values)
    assert summary["navigation_shape"] == [128, 256] and summary["voltage_kv"] == 200


def fei_records(n: int) -> bytes:
    """FEI1 records built from mrcfile's published dtype (the oracle for the layout)."""
    from mrcfile.dtypes import get_ext_header_dtype
    records = np.zeros(n, dtype=get_ext_header_dtype(b"FEI1", "<"))
    records["Metadata size"] = 768
    records["HT"] = 300e3
    records["Dose"] = [1.1e20 + k * 1e18 for k in range(n)]  # e-/m²
    records["Pixel size X"] = 0.83e-10
    records["Integration time"] = 0.05
    records["Alpha tilt"] = [10.0 * k for k in range(n)]
    records["Magnification"] = 105000.0
    records["Timestamp"] = [1000.0 + k for k in range(n)]
    return records.tobytes()


def test_fei_extended_header_summary():
    ext, findings = decode(fei_records(3), b"FEI1", 0, 0, "<", 3)
    summary = summarize(extended=ext)
    assert summary["voltage_kv"] == 300
    assert summary["pixel_size_angstrom"] == pytest.approx(0.83)
    assert summary["dose_per_image"] == pytest.approx([1.1, 1.11, 1.12])
    assert summary["total_dose"] == pytest.approx(3.33)
    assert summary["exposure_time_s"] == 0.05
    assert summary["tilt_angles"] == [0.0, 10.0, 20.0]
    assert summary["magnification"] == 105000
    assert summary["timestamps"] == [1000.0, 1001.0, 1002.0]
    assert summary["sources"] == ["fei_extended_header"]


def test_serialem_extended_header_summary():
    # Flags 1 (tilt x100) + 8 (mag/100) + 32 (dose as a two-short float): 8 bytes/section.
    sections = []
    for tilt, mag, dose in ((-30.0, 81000, 1.5), (0.0, 81000, 3.0)):
        mantissa = int(dose * 2 ** 8)  # dose = mantissa * 2^-8 = (s1*256 + |s2| % 256) ...
        s1, s2 = mantissa // 256, -(8 * 256 + mantissa % 256)  # ... * 2^(-(|s2| // 256))
        sections.append(np.array([round(tilt * 100), mag // 100, s1, s2], "<i2").tobytes())
    ext, findings = decode(b"".join(sections), b"SERI", 8, 1 | 8 | 32, "<", 2)
    assert findings == []
    summary = summarize(extended=ext)
    assert summary["tilt_angles"] == [-30.0, 0.0]
    assert summary["magnification"] == 81000
    assert summary["dose_per_image"] == pytest.approx([1.5, 3.0])
    assert summary["sources"] == ["serialem_extended_header"]


def test_mdoc_wins_over_extended_header():
    ext, _ = decode(fei_records(2), b"FEI1", 0, 0, "<", 2)
    summary = summarize(mdoc=parse_mdoc(MDOC), extended=ext)
    assert summary["voltage_kv"] == 300 and summary["tilt_angles"] == [-0.002, 3.0]
    assert summary["timestamps"] == [1000.0, 1001.0]  # only the header has those
    assert summary["sources"] == ["mdoc", "fei_extended_header"]
