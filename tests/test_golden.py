"""Checked-in files made once by third-party writers (tests/golden/make_golden.py)."""

from pathlib import Path

import numpy as np
import pytest

from service.mrc import MrcFile, Severity, validate

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name, mode, order, spacing", [
    ("mrcz_uint4.mrc", 101, "<", 0.5),
    ("mrcz_zstd_int16_be.mrcz", 1, ">", 1.25),
    ("mrcfile_float16.mrc", 12, "<", 0.83),
])
def test_golden_files(name, mode, order, spacing):
    expected = np.load(GOLDEN / Path(name).with_suffix(".npy").name)
    with MrcFile(GOLDEN / name) as f:
        assert (f.mode, f.byte_order) == (mode, order)
        np.testing.assert_array_equal(np.stack(list(f.frames())), expected)
        assert f.voxel_size[0] == pytest.approx(spacing, rel=1e-6)
    assert not [x for x in validate(GOLDEN / name) if x.severity is Severity.ERROR]
