"""Whole files as each vendor writes them, read by MrcFile and summarized by
``sidecars.acquisition`` (the pipeline's entry point), compared with the values written
into them: an EPU image with its 1024 reserved FEI records in either byte order, a
SerialEM tilt series with a SERI header and its .mdoc, an MRCZ file written by the real
``mrcz`` package with its voltage word."""

from __future__ import annotations

import mrcz
import numpy as np
import pytest

from service.mrc import MrcFile
from service.sidecars import acquisition
from tests.reference import synthetic, write_raw_mrc
from tests.test_acquisition import MDOC, SERI_FLAGS, fei_records, seri_sections


def summary_of(path, sidecars=()):
    with MrcFile(path) as f:
        assert [x for x in f.findings if x.severity.value != "info"] == []
        return acquisition([{"kind": kind, "name": name, "text": text}
                            for kind, name, text in sidecars],
                           f.extended, f.header, f.n_frames)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("exttyp", [b"FEI1", b"FEI2"])
def test_epu_one_frame_image(tmp_path, exttyp, order):
    path = write_raw_mrc(tmp_path / "FoilHole_1_Data_2.mrc", synthetic(2, (1, 8, 8)), 2, order,
                         extended=fei_records(1, exttyp, reserved=1023, order=order),
                         exttyp=exttyp, cella=(8 * 0.83, 8 * 0.83, 1.0))
    summary, findings, parsed, columns = summary_of(path)
    assert findings == [] and parsed == {}
    assert summary["dose_per_image"] == [1.1] and summary["total_dose"] == 1.1
    assert summary["tilt_angles"] == [0.0] and summary["stage_positions"] == [[12.5, -3.25]]
    assert summary["timestamps"] == [1000.0] and summary["defocus_um"] == [-1.8]
    assert [s["source"] for s in summary["pixel_size_sources"]] == [
        "mrc_header", "fei_extended_header"]
    assert summary["sources"] == ["mrc_header", "fei_extended_header"]
    assert columns == {"voltage_kv": 300, "pixel_size": 0.83, "exposure_s": 0.05,
                       "magnification": 105000.0, "camera": "BM-Falcon", "total_dose": 1.1}


def test_serialem_tilt_series_with_seri_header_and_mdoc(tmp_path):
    """SerialEM reserves SERI room for more sections than it has written; the .mdoc is
    finer (mag to the unit, tilt to 0.001°) and wins, the SERI values stay unused."""
    path = write_raw_mrc(tmp_path / "tilt.st", synthetic(1, (2, 8, 8)), 1,
                         extended=seri_sections(((-0.0, 105000, 1.2), (3.0, 105000, 1.25)),
                                                reserved=6),
                         exttyp=b"SERI", nint=8, nreal=SERI_FLAGS,
                         cella=(8 * 0.83, 8 * 0.83, 2.0))
    summary, findings, parsed, columns = summary_of(path, [("mdoc", "tilt.st.mdoc", MDOC)])
    assert findings == []
    assert parsed["mdoc"]["name"] == "tilt.st.mdoc"
    assert summary["tilt_angles"] == [-0.002, 3.0]  # the mdoc's, not SERI's 0.0
    assert summary["dose_per_image"] == [1.2, 1.25]
    assert summary["sources"] == ["mrc_header", "mdoc"]
    lean = "\n".join(line for line in MDOC.splitlines()
                     if not line.startswith(("TiltAngle", "ExposureDose")))
    summary, *_ = summary_of(path, [("mdoc", "tilt.st.mdoc", lean)])
    assert summary["tilt_angles"] == [0.0, 3.0]  # from SERI, 2 of its 8 records
    assert summary["dose_per_image"] == pytest.approx([1.2, 1.25], abs=2 ** -8)
    assert summary["sources"] == ["mrc_header", "mdoc", "serialem_extended_header"]


def test_mrcz_voltage_word(tmp_path):
    path = tmp_path / "movie.mrcz"
    data = np.arange(2 * 8 * 8, dtype=np.int16).reshape(2, 8, 8)
    mrcz.writeMRC(data, str(path), pixelsize=[1.0, 0.9, 0.9], voltage=200.0,
                  compressor="zstd", clevel=1)
    summary, findings, _, columns = summary_of(path)
    assert summary["voltage_kv"] == 200.0 and columns["voltage_kv"] == 200.0
    assert columns["pixel_size"] == 0.9  # CELLA/MX with the M mrcz writes
    assert summary["sources"][0] == "mrc_header"
    plain = write_raw_mrc(tmp_path / "plain.mrc", data, 1)  # bytes 132-135 are not MRCZ's
    assert "voltage_kv" not in summary_of(plain)[0]
