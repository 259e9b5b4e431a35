"""Checked-in files made once by third-party writers (tests/golden/make_golden.py)."""

from pathlib import Path

import numpy as np
import pytest

from service.mrc import MrcFile, Severity, validate

GOLDEN = Path(__file__).parent / "golden"
#: python-mrcz leaves MX/MY at 0 and writes header statistics that are not the data's
#: (checked against mrcz 0.6 and mrcfile 1.5); mrcfile's float16 file is clean.
MRCZ_WARNINGS = {"mx", "my", "dmin", "dmax", "dmean", "rms"}


@pytest.mark.parametrize("name, mode, order, spacing, warned", [
    ("mrcz_uint4.mrc", 101, "<", 0.5, MRCZ_WARNINGS - {"dmin"}),
    ("mrcz_zstd_int16_be.mrcz", 1, ">", 1.25, MRCZ_WARNINGS),
    ("mrcfile_float16.mrc", 12, "<", 0.83, set()),
])
def test_golden_files(name, mode, order, spacing, warned):
    expected = np.load(GOLDEN / Path(name).with_suffix(".npy").name)
    with MrcFile(GOLDEN / name) as f:
        assert (f.mode, f.byte_order) == (mode, order)
        assert f.shape == expected.shape
        np.testing.assert_array_equal(np.stack(list(f.frames())), expected)
        assert f.voxel_size[0] == pytest.approx(spacing, rel=1e-6)
    findings = validate(GOLDEN / name)
    assert all(x.severity is Severity.WARNING for x in findings), findings
    assert {x.field for x in findings} == warned
    # each statistics warning quotes the data's value as numpy computes it
    values = expected.astype(np.float64)
    truth = {"dmin": f"{values.min()}", "dmax": f"{values.max()}",
             "dmean": f"{values.mean():.6g}", "rms": f"{values.std():.6g}"}
    for x in findings:
        if x.field in truth:
            assert x.message.endswith(f"the data's is {truth[x.field]}"), x.message
