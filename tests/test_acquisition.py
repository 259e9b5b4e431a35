"""Acquisition metadata: .mdoc parsed as mdocfile (the oracle) reads it, compared both ways;
Direct Electron info.txt as DE-Server writes it (padded keys, units in parentheses, in any
spelling; -1 for what it does not know; X and Y pixel sizes that may differ); FEI/SERI
extended headers; one table-driven summary in fixed units where a source that lacks a fact
never erases another's and a placeholder (a 1 Å or a negative cell) ranks after every real
value; bad lines, placeholders, disagreements and non-square pixels are findings.
"""

from __future__ import annotations

import math
from pathlib import PurePath, PureWindowsPath

import mdocfile
import numpy as np
import pytest

from service.mrc import header as hdr
from service.mrc.acquisition import (AGREE_RTOL, FACT, FACTS, MEANINGS, PLACEHOLDER,
                                     PRECEDENCE, ROWS, ROWS_BY_FACT, UNITS, catalog_fields,
                                     convert, normalize, parse_key_values, parse_mdoc,
                                     summarize)
from service.mrc.extended import decode
from tests.reference import raw_header

#: A SerialEM tilt-series .mdoc: globals, two titles, two [ZValue] sections (the first with
#: everything SerialEM writes for a camera that saves frames, the second lean).
MDOC = r"""PixelSpacing = 0.83
Voltage = 300
ImageFile = movie.mrc
ImageSize = 4096 4096
DataMode = 101

[T = SerialEM: Digitized on EMBL Krios  14-Nov-26  10:00:01]

[T =     Tilt axis angle = 85.3, binning = 1  spot = 7  camera = 0]

[ZValue = 0]
TiltAngle = -0.002
StagePosition = 12.5 -3.25
StageZ = 1.5
Magnification = 105000
Intensity = 0.123
ExposureDose = 1.2
PixelSpacing = 0.83
SpotSize = 7
Defocus = -1.8
ImageShift = 0.01 -0.02
RotationAngle = 175.3
ExposureTime = 2.5
Binning = 1
CameraIndex = 0
DividedBy2 = 0
MagIndex = 31
CountsPerElectron = 32
TargetDefocus = -1.5
SubFramePath = X:\frames\movie_001.tif
NumSubFrames = 40
FrameDosesAndNumber = 0.03 40
DateTime = 14-Nov-26  10:00:05
FilterSlitAndLoss = 20 0

[ZValue = 1]
TiltAngle = 3.0
ExposureDose = 1.25
ExposureTime = 2.5
DateTime = 14-Nov-26  10:00:09
"""


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _same(ours, theirs) -> bool:
    """Our parsed value against mdocfile's typed one (tuples, paths, bools, floats)."""
    if isinstance(theirs, PurePath):
        return type(theirs)(PureWindowsPath(ours).as_posix()) == theirs
    if isinstance(theirs, list):  # FrameDosesAndNumber: [(dose, frames), ...]
        return _same(ours, tuple(v for pair in theirs for v in pair))
    if isinstance(theirs, tuple):
        return isinstance(ours, list) and len(ours) == len(theirs) and all(
            _same(a, b) for a, b in zip(ours, theirs))
    if isinstance(theirs, str):
        return str(ours) == theirs
    if isinstance(theirs, bool):
        return bool(ours) == theirs
    return not isinstance(ours, list) and math.isclose(ours, theirs)


def test_mdoc_agrees_with_mdocfile_both_ways(tmp_path):
    path = tmp_path / "movie.mrc.mdoc"
    path.write_text(MDOC)
    oracle = mdocfile.read(str(path)).to_dict("records")
    doc = parse_mdoc(MDOC)
    assert doc.findings == []
    assert doc.titles == ["SerialEM: Digitized on EMBL Krios  14-Nov-26  10:00:01",
                          "Tilt axis angle = 85.3, binning = 1  spot = 7  camera = 0"]
    assert len(doc.sections) == len(oracle) == 2
    for ours, theirs in zip(doc.sections, oracle):
        # mdocfile repeats the globals in every record: a key is ours if it is in the
        # section or, failing that, among the globals
        merged = {**doc.globals, **ours}
        theirs = {k: v for k, v in theirs.items() if k != "titles" and not _missing(v)}
        assert set(merged) == set(theirs), set(merged) ^ set(theirs)
        for key, value in merged.items():
            assert _same(value, theirs[key]), (key, value, theirs[key])


def test_mdoc_summary():
    summary, findings = summarize(mdoc=parse_mdoc(MDOC))
    assert findings == []
    assert summary == {
        "voltage_kv": 300, "pixel_size_angstrom": 0.83, "pixel_size_y_angstrom": 0.83,
        "pixel_size_sources": [{"source": "mdoc", "key": "PixelSpacing", "value": 0.83}],
        "exposure_time_s": 2.5, "subframes": 40, "magnification": 105000,
        "dose_per_image": [1.2, 1.25], "total_dose": pytest.approx(2.45),
        "tilt_angles": [-0.002, 3.0], "stage_positions": [[12.5, -3.25]],
        "defocus_um": [-1.8], "datetimes": ["14-Nov-26  10:00:05", "14-Nov-26  10:00:09"],
        "binning": [1, 1], "sources": ["mdoc"]}


def test_mdoc_sections_past_the_file_are_not_images():
    summary, findings = summarize(mdoc=parse_mdoc(MDOC), n_frames=1)
    assert summary["tilt_angles"] == [-0.002] and summary["dose_per_image"] == [1.2]
    assert [(f.field, f.severity.value) for f in findings] == [("mdoc", "warning")]
    assert "1 [ZValue] sections describe images past the file's 1" in findings[0].message


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
    assert summarize(mdoc=parse_mdoc("\x00garbage")) == ({}, [])


# --- Direct Electron --------------------------------------------------------------------

#: (key, value) as DE-Server writes them (alphabetical, each key padded to one column),
#: with the look-alike keys that must not be taken for the real ones.
DE_LINES = (
    ("ADUs Per Electron", "51"),
    ("Autosave Movie Frames Written", "32"),
    ("Autosave Movie Sum Count", "2"),
    ("Binning X", "1"),
    ("Binning Y", "1"),
    ("Camera Model", "Apollo"),
    ("Camera Name", "Apollo"),
    ("Exposure Time (seconds)", "0.045712"),
    ("Exposure Time Max (seconds)", "1000000"),
    ("Frame Count", "32"),
    ("Frames Per Second", "700"),
    ("Frames Per Second (Max)", "959.093694"),
    ("Hardware Binning X", "2"),
    ("Hardware Binning Y", "2"),
    ("Hardware ROI Offset X", "448"),
    ("Hardware ROI Offset Y", "0"),
    ("Hardware ROI Size X", "4096"),
    ("Hardware ROI Size Y", "2048"),
    ("Instrument Accelerating Voltage (V)", "300000"),
    ("Instrument Accelerating Voltage (V) Allowed Values", "300000,200000,120000,80000,0"),
    ("Instrument Project Camera Length (centimeters)", "29.5"),
    ("Instrument Project Magnification", "105000"),
    ("Local time", "Mon Oct 21 14:36:50 2024"),
    ("Scan - Enable", "Disable"),
    ("Scan - Size X", "8"),
    ("Scan - Size Y", "32"),
    ("Server Software Version", "2.7.4.10190"),
    ("Specimen Pixel Size X (nanometers)", "0.0827"),
    ("Specimen Pixel Size Y (nanometers)", "0.0827"),
    ("Timestamp (seconds since Epoch)", "1729539410"),
)


def de_info_text(lines=DE_LINES, **replace: str) -> str:
    """An info.txt in DE-Server's layout; ``replace`` swaps the line of a key (by its
    exact key) for another line, written as given."""
    out = []
    for key, value in lines:
        out.append(replace.pop(key, f"{key:<64}= {value}"))
    return "\n".join(out + list(replace.values())) + "\n"


#: what the DE lines above say, in the summary's units
DE_SUMMARY = {
    "voltage_kv": 300, "pixel_size_angstrom": 0.827, "pixel_size_y_angstrom": 0.827,
    "pixel_size_sources": [{"source": "de_info", "key": "Specimen Pixel Size X",
                            "value": 0.827}],
    "exposure_time_s": 0.045712, "frames_per_second": 700, "frame_count": 32,
    "movie_sum_count": 2, "magnification": 105000, "camera": "Apollo",
    "camera_length_m": 0.295, "adus_per_electron": 51, "timestamps": [1729539410],
    "binning": [1, 1], "hardware_binning": [2, 2], "hardware_roi_offset": [448, 0],
    "hardware_roi_size": [4096, 2048], "sources": ["de_info"]}


#: What DE-Server writes when the TEM channel is disconnected (and in imaging, for the
#: diffraction keys): -1 for every calibration it does not know. Lines as DE lays them out.
DE_NOT_KNOWN = {
    key: f"{key:<64}= -1" for key in (
        "Instrument Project Magnification", "Instrument Project Camera Length (centimeters)",
        "Specimen Pixel Size X (nanometers)", "Specimen Pixel Size Y (nanometers)",
        "Diffraction Pixel Size X", "Diffraction Pixel Size Y")}
#: A DE detector whose specimen pixel is not square (X and Y calibrated apart).
DE_NOT_SQUARE = {"Specimen Pixel Size Y (nanometers)":
                 f"{'Specimen Pixel Size Y (nanometers)':<64}= 0.0835"}
#: DE's header: CELLA = -10 Å per pixel, whatever the pixel size and the binning
DE_CELL_PER_PIXEL = -10.0


def test_direct_electron_info_as_written():
    values, findings = parse_key_values(de_info_text(), "de_info")
    assert findings == []
    assert values["Instrument Accelerating Voltage (V)"] == 300000  # the raw dump, as is
    assert values["Scan - Size X"] == 8 and values["Camera Model"] == "Apollo"
    summary, findings = summarize(de_info=values)
    assert findings == []
    assert summary == DE_SUMMARY  # no navigation grid: the scan was disabled
    assert catalog_fields(summary) == {"voltage_kv": 300, "pixel_size": 0.827,
                                       "exposure_s": 0.045712, "magnification": 105000.0,
                                       "camera": "Apollo", "total_dose": None}


@pytest.mark.parametrize("key, line, fact, expected", [
    ("Specimen Pixel Size X (nanometers)", "Specimen Pixel Size X (nm) = 0.0827",
     "pixel_size_angstrom", 0.827),
    ("Specimen Pixel Size X (nanometers)", "  specimen   pixel size x(NANOMETERS)=0.0827",
     "pixel_size_angstrom", 0.827),
    ("Specimen Pixel Size X (nanometers)", "Specimen Pixel Size X (Å) = 0.827",
     "pixel_size_angstrom", 0.827),
    ("Specimen Pixel Size X (nanometers)", "Specimen Pixel Size X (angstroms) = 0.827",
     "pixel_size_angstrom", 0.827),
    ("Specimen Pixel Size X (nanometers)", "Specimen Pixel Size X (\u00b5m) = 0.0000827",
     "pixel_size_angstrom", 0.827),
    ("Instrument Accelerating Voltage (V)", "Instrument Accelerating Voltage (kV) = 200",
     "voltage_kv", 200),
    ("Instrument Accelerating Voltage (V)", "INSTRUMENT ACCELERATING VOLTAGE ( v ) = 120000",
     "voltage_kv", 120),
    ("Exposure Time (seconds)", "Exposure Time (ms) = 45.712", "exposure_time_s", 0.045712),
    ("Instrument Project Camera Length (centimeters)",
     "Instrument Project Camera Length (mm) = 295", "camera_length_m", 0.295),
    ("Scan - Enable", "Scan - Enable = Enable", "navigation_shape", [32, 8]),
])
def test_direct_electron_keys_by_name_and_unit(key, line, fact, expected):
    values, _ = parse_key_values(de_info_text(**{key: line}), "de_info")
    summary, findings = summarize(de_info=values)
    assert findings == []
    assert summary[fact] == pytest.approx(expected)


def test_direct_electron_unit_we_cannot_read_is_a_finding():
    values, _ = parse_key_values(de_info_text(**{
        "Specimen Pixel Size X (nanometers)": "Specimen Pixel Size X (furlongs) = 2",
        "Instrument Accelerating Voltage (V)": "Instrument Accelerating Voltage (s) = 3"}),
        "de_info")
    summary, findings = summarize(de_info=values)
    assert "pixel_size_angstrom" not in summary and "voltage_kv" not in summary
    assert [(f.severity.value, f.field) for f in findings] == [("warning", "de_info")] * 2
    assert "'Instrument Accelerating Voltage (s)': the unit 's' is not one we read as V" \
        in findings[0].message
    assert "'Specimen Pixel Size X (furlongs)'" in findings[1].message


def test_direct_electron_minus_one_is_unknown_never_a_value():
    """DE's -1 (magnification, pixel sizes, camera length it does not know) is no value:
    not in the summary, not in the catalog, not a disagreement, not a finding."""
    values, findings = parse_key_values(de_info_text(**DE_NOT_KNOWN), "de_info")
    assert findings == [] and values["Instrument Project Magnification"] == -1
    summary, findings = summarize(de_info=values)
    assert findings == []
    gone = ("magnification", "camera_length_m", "pixel_size_angstrom", "pixel_size_y_angstrom",
            "pixel_size_sources")
    assert summary == {k: v for k, v in DE_SUMMARY.items() if k not in gone}
    assert catalog_fields(summary)["magnification"] is None
    assert catalog_fields(summary)["pixel_size"] is None


@pytest.mark.parametrize("line", ["Binning X = -1", "Binning X = -1.0"])
def test_direct_electron_minus_one_in_a_pair_makes_the_pair_unknown(line):
    values, _ = parse_key_values(de_info_text(**{"Binning X": line}), "de_info")
    summary, _ = summarize(de_info=values)
    assert "binning" not in summary and summary["hardware_binning"] == [2, 2]


def test_direct_electron_minus_one_does_not_erase_another_source():
    values, _ = parse_key_values(de_info_text(**DE_NOT_KNOWN), "de_info")
    summary, findings = summarize(mdoc=parse_mdoc(MDOC), de_info=values)
    assert findings == []
    assert summary["magnification"] == 105000 and summary["pixel_size_angstrom"] == 0.83


def test_direct_electron_pixel_not_square_keeps_both_and_says_so():
    values, _ = parse_key_values(de_info_text(**DE_NOT_SQUARE), "de_info")
    summary, findings = summarize(de_info=values)
    assert summary["pixel_size_angstrom"] == 0.827
    assert summary["pixel_size_y_angstrom"] == 0.835
    assert catalog_fields(summary)["pixel_size"] == 0.827  # the catalog column is x
    assert [(f.severity.value, f.field) for f in findings] == [
        ("warning", "pixel_size_y_angstrom")]
    assert findings[0].message == (
        "the pixels are not square: 0.827 Å in x (de_info Specimen Pixel Size X), 0.835 Å "
        "in y (de_info Specimen Pixel Size Y); both are kept, the catalog's pixel size is "
        "the x one")


def test_a_placeholder_says_nothing_about_the_pixel_shape():
    """x real from info.txt, y unknown there (-1): y falls to the header's placeholder,
    which is no evidence of non-square pixels."""
    values, _ = parse_key_values(de_info_text(**{
        "Specimen Pixel Size Y (nanometers)": DE_NOT_KNOWN[
            "Specimen Pixel Size Y (nanometers)"]}), "de_info")
    summary, findings = summarize(header=header_record(8, 8 * DE_CELL_PER_PIXEL),
                                  de_info=values)
    assert summary["pixel_size_angstrom"] == 0.827
    assert [f.field for f in findings] == ["pixel_size_angstrom"]  # the placeholder's info


def test_direct_electron_exposure_from_frames_and_rate():
    lines = [(k, v) for k, v in DE_LINES if not k.startswith("Exposure Time (")]
    values, _ = parse_key_values(de_info_text(lines), "de_info")
    summary, _ = summarize(de_info=values)
    assert summary["exposure_time_s"] == pytest.approx(32 / 700)


def test_repeated_info_key_is_a_finding():
    values, findings = parse_key_values("Frame Count = 3\nFrame Count = 4\nbroken\n", "de_info")
    assert values == {"Frame Count": 4}
    assert [f.message for f in findings] == [
        "line 2: Frame Count repeated; the last value wins",
        "line 3: not 'Key = Value': 'broken'; skipped"]


# --- FEI / SerialEM extended headers ------------------------------------------------------

FEI_DOSE = 1.1e20  # e-/m² (1.1 e-/Å²)


def fei_records(n: int, exttyp: bytes = b"FEI1", reserved: int = 0, order: str = "<",
                **fields) -> bytes:
    """``n`` filled records and ``reserved`` all-zero ones, built with mrcfile's dtype
    (the oracle for the layout), as EPU writes them; ``fields`` override by name."""
    from mrcfile.dtypes import get_ext_header_dtype
    dtype = get_ext_header_dtype(exttyp, order)
    records = np.zeros(n + reserved, dtype=dtype)
    filled = records[:n]
    filled["Metadata size"] = dtype.itemsize
    filled["Metadata version"] = 0
    filled["HT"] = 300e3
    filled["Dose"] = [FEI_DOSE + k * 1e18 for k in range(n)]
    filled["Pixel size X"] = filled["Pixel size Y"] = 0.83e-10
    filled["Integration time"] = 0.05
    filled["Alpha tilt"] = [10.0 * k for k in range(n)]
    filled["X-Stage"], filled["Y-Stage"] = 12.5e-6, -3.25e-6
    filled["Defocus"] = -1.8e-6
    filled["Magnification"] = 105000.0
    filled["Camera length"] = 0.0  # not diffraction
    filled["Camera name"] = b"BM-Falcon"
    filled["Binning Width"] = filled["Binning Height"] = 1
    filled["Timestamp"] = [1000.0 + k for k in range(n)]
    for name, value in fields.items():
        filled[name] = value
    return records.tobytes()


def test_fei_extended_header_summary():
    ext, findings = decode(fei_records(3), b"FEI1", 0, 0, "<", 3)
    summary, findings = summarize(extended=ext)
    assert findings == []
    assert summary == {
        "voltage_kv": 300, "pixel_size_angstrom": 0.83, "pixel_size_y_angstrom": 0.83,
        "pixel_size_sources": [{"source": "fei_extended_header", "key": "pixel_size_x",
                                "value": 0.83}],
        "exposure_time_s": 0.05, "magnification": 105000, "camera": "BM-Falcon",
        "dose_per_image": [1.1, 1.11, 1.12], "total_dose": pytest.approx(3.33),
        "tilt_angles": [0.0, 10.0, 20.0], "stage_positions": [[12.5, -3.25]] * 3,
        "defocus_um": [-1.8] * 3, "timestamps": [1000.0, 1001.0, 1002.0],
        "binning": [1, 1], "sources": ["fei_extended_header"]}


def test_one_frame_epu_image_lists_one_record_of_1024():
    ext, findings = decode(fei_records(1, reserved=1023), b"FEI1", 0, 0, "<", 1)
    assert findings == [] and len(ext.records) == 1024 and ext.filled.count(True) == 1
    assert ext.to_dict(max_records=1)["n_filled"] == 1
    for n_frames in (1, None):  # the reserved records are empty whatever NZ says
        summary, _ = summarize(extended=ext, n_frames=n_frames)
        assert summary["dose_per_image"] == [1.1] and summary["total_dose"] == 1.1
        assert summary["tilt_angles"] == [0.0] and summary["timestamps"] == [1000.0]


def test_fei_records_past_the_frames_are_not_images():
    ext, _ = decode(fei_records(3), b"FEI1", 0, 0, "<", 3)
    summary, _ = summarize(extended=ext, n_frames=2)
    assert summary["dose_per_image"] == [1.1, 1.11] and summary["tilt_angles"] == [0, 10]


def test_fei2_commercial_detector_name_is_the_camera():
    ext, _ = decode(fei_records(1, b"FEI2", **{"Detector commercial name": b"Falcon 4i"}),
                    b"FEI2", 0, 0, "<", 1)
    summary, _ = summarize(extended=ext)
    assert summary["camera"] == "Falcon 4i"


def seri_sections(values=((-30.0, 81000, 1.5), (0.0, 81000, 3.0)), reserved: int = 0) -> bytes:
    """SERI sections with flags 1 (tilt x100) + 8 (mag/100) + 32 (dose as a two-short
    float, IMOD mrc_format.txt): 8 bytes each; ``reserved`` zero sections after them."""
    sections = []
    for tilt, mag, dose in values:
        mantissa = int(dose * 2 ** 8)  # dose = mantissa * 2^-8 = (s1*256 + |s2| % 256) ...
        s1, s2 = mantissa // 256, -(8 * 256 + mantissa % 256)  # ... * 2^(-(|s2| // 256))
        sections.append(np.array([round(tilt * 100), mag // 100, s1, s2], "<i2").tobytes())
    return b"".join(sections) + bytes(8 * reserved)


SERI_FLAGS = 1 | 8 | 32


def test_serialem_extended_header_summary():
    ext, findings = decode(seri_sections(reserved=3), b"SERI", 8, SERI_FLAGS, "<", 2)
    assert findings == [] and len(ext.records) == 5
    summary, findings = summarize(extended=ext, n_frames=2)
    assert summary == {"magnification": 81000, "dose_per_image": [1.5, 3.0],
                       "total_dose": 4.5, "tilt_angles": [-30.0, 0.0],
                       "sources": ["serialem_extended_header"]}


# --- precedence ------------------------------------------------------------------------


def header_record(nx: int = 8, cell_x: float = 0.0, cell_y: float | None = None,
                  **fields) -> np.record:
    """A header built by the independent test writer, parsed by our dtype."""
    cell_y = cell_x if cell_y is None else cell_y
    return hdr.parse(raw_header(nx=nx, ny=nx, nz=1, mode=1, cella=(cell_x, cell_y, 1.0),
                                **fields), "<")


def test_mdoc_wins_over_extended_header():
    ext, _ = decode(fei_records(2), b"FEI1", 0, 0, "<", 2)
    summary, _ = summarize(mdoc=parse_mdoc(MDOC), extended=ext)
    assert summary["voltage_kv"] == 300 and summary["tilt_angles"] == [-0.002, 3.0]
    assert summary["timestamps"] == [1000.0, 1001.0]  # only the header has those
    assert summary["camera"] == "BM-Falcon"
    assert summary["sources"] == ["mdoc", "fei_extended_header"]


def test_an_mdoc_without_voltage_does_not_erase_the_fei_header():
    lean = "\n".join(line for line in MDOC.splitlines()
                     if not line.startswith(("Voltage", "PixelSpacing")))
    ext, _ = decode(fei_records(2), b"FEI1", 0, 0, "<", 2)
    summary, _ = summarize(mdoc=parse_mdoc(lean), extended=ext)
    assert summary["voltage_kv"] == 300 and summary["pixel_size_angstrom"] == 0.83
    assert summary["tilt_angles"] == [-0.002, 3.0]  # the mdoc still wins what it has


def test_an_unset_fei_voltage_does_not_erase_direct_electron():
    ext, _ = decode(fei_records(1, HT=0.0, **{"Pixel size X": 0.0}), b"FEI1", 0, 0, "<", 1)
    values, _ = parse_key_values(de_info_text(), "de_info")
    summary, _ = summarize(extended=ext, de_info=values)
    assert summary["voltage_kv"] == 300 and summary["pixel_size_angstrom"] == 0.827
    assert summary["magnification"] == 105000 and summary["camera"] == "BM-Falcon"
    assert summary["sources"] == ["fei_extended_header", "de_info"]


def test_header_pixel_size_first_and_every_source_listed():
    ext, _ = decode(fei_records(1), b"FEI1", 0, 0, "<", 1)
    summary, findings = summarize(header=header_record(8, 8 * 0.8305), mdoc=parse_mdoc(MDOC),
                                  extended=ext)
    assert findings == []  # 0.8305, 0.83, 0.83 agree within AGREE_RTOL
    assert summary["pixel_size_angstrom"] == 0.8305
    assert summary["pixel_size_sources"] == [
        {"source": "mrc_header", "key": "CELLA/MX", "value": 0.8305},
        {"source": "mdoc", "key": "PixelSpacing", "value": 0.83},
        {"source": "fei_extended_header", "key": "pixel_size_x", "value": 0.83}]
    assert summary["sources"] == ["mrc_header", "mdoc", "fei_extended_header"]


def test_disagreeing_pixel_sizes_are_a_finding_naming_the_choice():
    summary, findings = summarize(header=header_record(8, 8 * 1.06), mdoc=parse_mdoc(MDOC))
    assert summary["pixel_size_angstrom"] == 1.06
    assert [(f.severity.value, f.field) for f in findings] == [
        ("warning", "pixel_size_angstrom")]
    assert findings[0].message == (
        "the sources disagree (mrc_header CELLA/MX: 1.06 Å; mdoc PixelSpacing: 0.83 Å); "
        "the catalog uses 1.06 Å from mrc_header")
    assert catalog_fields(summary)["pixel_size"] == 1.06


def test_a_one_angstrom_header_is_a_placeholder_ranked_last():
    """A placeholder that differs from a real value is not a disagreement (it used to be
    a "sources disagree" warning): an info finding says what it is and what is used."""
    summary, findings = summarize(header=header_record(8, 8.0), mdoc=parse_mdoc(MDOC))
    assert summary["pixel_size_angstrom"] == summary["pixel_size_y_angstrom"] == 0.83
    assert summary["pixel_size_sources"] == [
        {"source": "mdoc", "key": "PixelSpacing", "value": 0.83},
        {"source": "mrc_header", "key": "CELLA/MX", "value": 1.0, "placeholder": True}]
    assert summary["sources"] == ["mdoc"]  # the header gave nothing that was used
    assert [(f.severity.value, f.field) for f in findings] == [("info", "pixel_size_angstrom")]
    assert findings[0].message == (
        "mrc_header CELLA/MX: 1 Å is a placeholder (CELLA equal to the grid: what IMOD and "
        "EMAN write when they know no pixel size); ranked after every real value: the "
        "catalog uses 0.83 Å from mdoc")
    # Alone it is no pixel size at all: unknown (never a value), and said to be one.
    alone, findings = summarize(header=header_record(8, 8.0))
    assert "pixel_size_angstrom" not in alone and catalog_fields(alone)["pixel_size"] is None
    assert alone["pixel_size_sources"] == [
        {"source": "mrc_header", "key": "CELLA/MX", "value": 1.0, "placeholder": True}]
    assert [f.message.endswith("no source has a real value, so the pixel size is unknown "
                               "(a placeholder is never used as one)")
            for f in findings] == [True]


def test_negative_cell_is_direct_electrons_placeholder_ranked_after_info_txt():
    """DE writes CELLA as -10 Å per pixel whatever the pixel size and binning. This used
    to be read as a real pixel size (its magnitude, ranked first, with an info finding),
    which put 10 Å/px in the catalog over info.txt's Specimen Pixel Size. It is now a
    placeholder, ranked with the 1 Å one: info.txt wins, and no disagreement is raised."""
    values, _ = parse_key_values(de_info_text(), "de_info")
    header = header_record(8, 8 * DE_CELL_PER_PIXEL)
    summary, findings = summarize(header=header, de_info=values)
    assert summary["pixel_size_angstrom"] == summary["pixel_size_y_angstrom"] == 0.827
    assert summary["pixel_size_sources"] == [
        {"source": "de_info", "key": "Specimen Pixel Size X", "value": 0.827},
        {"source": "mrc_header", "key": "CELLA/MX", "value": 10.0, "placeholder": True}]
    assert summary["sources"] == ["de_info"]
    assert [(f.severity.value, f.field) for f in findings] == [("info", "pixel_size_angstrom")]
    assert findings[0].message == (
        "mrc_header CELLA/MX: -10 Å is a placeholder (a negative cell: Direct Electron "
        "writes CELLA as -10 Å per pixel whatever the pixel size); ranked after every real "
        "value: the catalog uses 0.827 Å from de_info")
    assert catalog_fields(summary)["pixel_size"] == 0.827


def test_negative_cell_ranks_after_every_real_value_and_never_disagrees():
    """Any negative cell is the placeholder, not only DE's -10: an .mdoc's 0.83 wins over
    a -1.06 Å header, silently but for the info finding."""
    summary, findings = summarize(header=header_record(8, -8 * 1.06), mdoc=parse_mdoc(MDOC))
    assert summary["pixel_size_angstrom"] == 0.83
    assert [f.severity.value for f in findings] == ["info"]
    assert "-1.06 Å is a placeholder" in findings[0].message


def test_negative_cell_alone_is_an_unknown_pixel_size_and_says_so():
    """DE's info.txt with -1 pixel sizes and a -10 Å/px header: nothing real is known, so
    (as with the 1 Å placeholder) the pixel size is unknown, never 10 Å, and a finding
    says the header's is a placeholder."""
    values, _ = parse_key_values(de_info_text(**DE_NOT_KNOWN), "de_info")
    summary, findings = summarize(header=header_record(8, 8 * DE_CELL_PER_PIXEL),
                                  de_info=values)
    assert "pixel_size_angstrom" not in summary and "magnification" not in summary
    assert catalog_fields(summary)["pixel_size"] is None
    assert summary["pixel_size_sources"] == [
        {"source": "mrc_header", "key": "CELLA/MX", "value": 10.0, "placeholder": True}]
    assert [(f.severity.value, f.field) for f in findings] == [("info", "pixel_size_angstrom")]
    assert findings[0].message.endswith("no source has a real value, so the pixel size is "
                                        "unknown (a placeholder is never used as one)")


def test_header_pixel_not_square_keeps_both_and_says_so():
    summary, findings = summarize(header=header_record(8, 8 * 0.83, 8 * 0.86))
    assert summary["pixel_size_angstrom"] == 0.83 and summary["pixel_size_y_angstrom"] == 0.86
    assert [(f.severity.value, f.field) for f in findings] == [
        ("warning", "pixel_size_y_angstrom")]
    assert "0.83 Å in x (mrc_header CELLA/MX), 0.86 Å in y (mrc_header CELLA/MY)" \
        in findings[0].message
    square, findings = summarize(header=header_record(96, 96 * 0.8305))
    assert square["pixel_size_y_angstrom"] == 0.8305 and findings == []


def test_no_header_pixel_size_and_no_sources_is_empty():
    assert summarize(header=header_record(8, 0.0)) == ({}, [])
    assert catalog_fields({}) == dict.fromkeys(
        ("voltage_kv", "pixel_size", "exposure_s", "magnification", "camera", "total_dose"))


def test_catalog_exposure_is_the_whole_exposure():
    assert catalog_fields({"exposure_time_s": 2.5})["exposure_s"] == 2.5
    assert catalog_fields({"exposure_time_s": [1.0, 2.0]})["exposure_s"] == 3.0
    assert catalog_fields({"camera": "x" * 100})["camera"] == "x" * 64


# --- the table itself -------------------------------------------------------------------


def test_every_row_converts_into_its_facts_unit():
    for row in ROWS:
        fact = FACT[row.fact]
        assert (row.unit is None) == (fact.unit is None), row
        if row.unit is not None:
            convert(1.0, row.unit, fact.unit)  # raises for a unit of another quantity
    assert {row.fact for row in ROWS} == {f.name for f in FACTS}


def test_rows_follow_the_documented_precedence():
    """Within each fact, sources in PRECEDENCE order, without exception: a placeholder is
    a property of a (source, value) in MEANINGS, not a row of its own."""
    for name, rows in ROWS_BY_FACT.items():
        ranks = [PRECEDENCE.index(r.source) for r in rows]
        assert ranks == sorted(ranks), name
    for meaning in MEANINGS:
        assert meaning.source in PRECEDENCE
        assert meaning.facts is None or set(meaning.facts) <= set(FACT)
    placeholders = {m.source for m in MEANINGS if m.meaning == PLACEHOLDER}
    assert placeholders == {"mrc_header"}


@pytest.mark.parametrize("value, unit, to, expected", [
    (0.1, "nm", "Å", 1.0), (300000, "V", "kV", 300.0), (0.83e-10, "m", "Å", 0.83),
    (1.1e20, "e-/m²", "e-/Å²", 1.1), (29.5, "centimeters", "m", 0.295),
    ([12.5e-6, -3.25e-6], "m", "µm", [12.5, -3.25]), ("Apollo", None, None, "Apollo")])
def test_conversions_are_exact_in_decimal(value, unit, to, expected):
    assert convert(value, unit, to) == expected


def test_unit_spellings_normalize():
    assert normalize("  Micro\u00b5m ") == normalize("micro\u03bcm")
    assert UNITS[normalize("\u212b")] == UNITS[normalize("Å")] == ("length", -10)
    with pytest.raises(ValueError):
        convert(1, "V", "Å")
    assert 0 < AGREE_RTOL < 0.05
