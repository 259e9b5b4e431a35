"""4-bit packing against a slow per-pixel reference, and the lossless-conversion table."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from service.mrc import modes
from tests.reference import slow_pack_4bit, slow_unpack_4bit


@pytest.mark.parametrize("nx", [1, 2, 7, 8, 33, 64])
@pytest.mark.parametrize("ny", [1, 5])
def test_unpack_matches_slow_reference(nx, ny):
    rng = np.random.default_rng(nx * 100 + ny)
    raw = rng.integers(0, 256, size=ny * ((nx + 1) // 2), dtype=np.uint8).tobytes()
    packed = np.frombuffer(raw, dtype=np.uint8).reshape(ny, (nx + 1) // 2)
    assert np.array_equal(modes.unpack_4bit(packed, nx), slow_unpack_4bit(raw, nx, ny))


@pytest.mark.parametrize("nx", [1, 3, 8, 31, 4096])
def test_pack_matches_slow_reference_and_round_trips(nx):
    rng = np.random.default_rng(nx)
    values = rng.integers(0, 16, size=(3, nx), dtype=np.uint8)
    packed = modes.pack_4bit(values)
    assert packed.tobytes() == slow_pack_4bit(values)
    assert np.array_equal(modes.unpack_4bit(packed, nx), values)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.data())
def test_pack_unpack_property(nx, ny, data):
    seed = data.draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).integers(0, 16, size=(ny, nx), dtype=np.uint8)
    packed = modes.pack_4bit(values)
    assert packed.shape == (ny, (nx + 1) // 2)
    if nx % 2:  # the padding nibble is zero
        assert not (packed[:, -1] >> 4).any()
    assert np.array_equal(modes.unpack_4bit(packed, nx), values)


def test_low_nibble_is_the_lower_x_pixel():
    # IMOD mrc_format.txt: the first pixel is in the lower 4 bits.
    packed = np.array([[0x21, 0x03]], dtype=np.uint8)
    assert modes.unpack_4bit(packed, 3).tolist() == [[1, 2, 3]]


def test_frame_sizes():
    assert modes.frame_nbytes(101, 7, 3) == 4 * 3
    assert modes.frame_nbytes(101, 8, 3) == 4 * 3
    assert modes.frame_nbytes(4, 5, 2) == 80
    assert modes.frame_nbytes(3, 5, 2) == 40


def test_derived_maps_come_from_the_table():
    assert set(modes.MODES) == {0, 1, 2, 3, 4, 6, 7, 8, 12, 101}
    for spec in modes.MODE_TABLE:
        assert modes.MODES[spec.code] is spec
        if not spec.is_packed:
            assert modes.MODE_BY_DTYPE[spec.dtype] == spec.code


@pytest.mark.parametrize("source, dtype, expected", [
    (101, "u1", [0, 1, 2, 3, 4, 6, 7, 8, 12, 101]),
    (0, "i1", [0, 1, 2, 3, 4, 7, 12]),
    (0, "u1", [1, 2, 3, 4, 6, 7, 8, 12]),
    (1, "i2", [1, 2, 3, 4, 7]),
    (6, "u2", [2, 4, 6, 7, 8]),
    (12, "f2", [2, 4, 12]),
    (2, "f4", [2, 4]),
    (3, modes.COMPLEX_INT16, [3, 4]),
    (4, "c8", [4]),
])
def test_lossless_targets(source, dtype, expected):
    assert modes.lossless_targets(source, np.dtype(dtype)) == expected


def test_differences_treats_nan_as_equal_and_compares_complex_int16():
    a = np.array([[1.0, np.nan, 3.0]], dtype=np.float32)
    b = np.array([[1.0, np.nan, 4.0]], dtype=np.float32)
    assert modes.differences(a, b).tolist() == [[False, False, True]]
    assert not modes.differences(a, a.copy()).any()
    pairs = np.zeros((1, 2), dtype=modes.COMPLEX_INT16)
    pairs["real"], pairs["imag"] = [3, 5], [-4, 0]
    assert not modes.differences(pairs, np.array([[3 - 4j, 5]], dtype=np.complex64)).any()
    assert modes.differences(pairs, np.array([[3 - 4j, 6]], dtype=np.complex64)).tolist() \
        == [[False, True]]
