"""Running statistics against numpy's float64 results over the whole array."""

import numpy as np
import pytest

from service.mrc.modes import COMPLEX_INT16
from service.mrc.stats import StatsAccumulator


def accumulate(data):
    acc = StatsAccumulator()
    for frame in data:
        acc.add(frame)
    return acc.result()


@pytest.mark.parametrize("dtype", ["i1", "u1", "i2", "u2", "i4", "u4", "f2", "f4"])
def test_matches_numpy(dtype):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        data = rng.normal(50, 7, size=(5, 33, 40)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=(5, 33, 40), endpoint=True, dtype=dtype)
    s = accumulate(data)
    wide = data.astype(np.float64)
    assert (s.dmin, s.dmax) == (wide.min(), wide.max())
    assert s.dmean == pytest.approx(wide.mean(), rel=1e-12)
    assert s.rms == pytest.approx(wide.std(), rel=1e-9)
    assert s.count == data.size


def test_large_mean_small_spread_stays_accurate():
    """Sum-of-squares would cancel catastrophically here; block moments do not."""
    data = (1e6 + np.random.default_rng(1).normal(0, 0.01, size=(4, 300, 300))).astype("f8")
    s = accumulate(data.astype(np.float32))
    assert s.rms == pytest.approx(data.astype(np.float32).astype(np.float64).std(), rel=1e-6)


def test_blocks_larger_than_one_chunk():
    data = np.arange(3 * 1200 * 1000, dtype=np.int16).reshape(3, 1200, 1000) % 1000
    s = accumulate(data)
    assert s.dmean == pytest.approx(data.astype(np.float64).mean(), rel=1e-15)
    assert s.rms == pytest.approx(data.astype(np.float64).std(), rel=1e-12)


def test_complex_only_rms_is_defined():
    rng = np.random.default_rng(2)
    data = (rng.normal(size=(2, 8, 8)) + 1j * rng.normal(size=(2, 8, 8))).astype(np.complex64)
    s = accumulate(data)
    assert (s.dmin, s.dmax, s.dmean) == (0.0, -1.0, -2.0)
    assert s.rms == pytest.approx(np.std(data.astype(np.complex128)), rel=1e-9)
    pairs = np.zeros((1, 4, 4), dtype=COMPLEX_INT16)
    pairs["real"], pairs["imag"] = 3, -4
    assert accumulate(pairs).rms == 0.0


def test_empty_is_undetermined():
    assert StatsAccumulator().result().as_tuple() == (0.0, -1.0, -2.0, -1.0)


@pytest.mark.parametrize("dtype, value", [("i1", -128), ("i1", 127), ("u1", 255)])
def test_8bit_rows_are_exact_at_the_float32_limit(dtype, value):
    """Rows of extreme bytes sum exactly to the 2**24 bound of the float32 path; the
    size is not a multiple of the row length, so the integer tail is exercised too."""
    data = np.full((2, 1500, 1399), value, dtype=dtype)
    data[1, 0, :7] = 0
    s = accumulate(data)
    wide = data.astype(np.float64)
    n = data.size
    total, squares = int(data.astype(np.int64).sum()), int((data.astype(np.int64) ** 2).sum())
    assert s.dmean == total / n
    assert s.rms == pytest.approx(((squares * n - total * total) / (n * n)) ** 0.5, rel=1e-15)
    assert s.rms == pytest.approx(wide.std(), rel=1e-9)


# -- the narrow byte path (4-bit counts and other one-byte data spanning <= 15) --------

from service.mrc.stats import NARROW_SPAN, NarrowBytes, exact_int_moments  # noqa: E402

MIB = 1 << 20


def wide_moments(values: np.ndarray) -> tuple[int, int]:
    wide = values.astype(np.int64)
    return int(wide.sum()), int((wide * wide).sum())


@pytest.mark.parametrize("dtype, lo", [(np.uint8, 0), (np.uint8, 3), (np.uint8, 240),
                                       (np.int8, -128), (np.int8, -8), (np.int8, 0),
                                       (np.int8, 112)])
@pytest.mark.parametrize("size", [MIB, MIB + 1, 3 * MIB - 5, 4 * MIB])
def test_narrow_bytes_equal_a_wide_sum(dtype, lo, size):
    rng = np.random.default_rng(size + lo)
    values = (rng.integers(0, NARROW_SPAN + 1, size) + lo).astype(dtype)
    values[0], values[-1] = lo, lo + NARROW_SPAN  # the whole span, at the block edges
    assert NarrowBytes().moments(values, lo, lo + NARROW_SPAN) == wide_moments(values)


@pytest.mark.parametrize("fill", [0, 15, 255])
def test_narrow_bytes_at_the_lane_limits(fill):
    """Every byte at the top of its span: each lane holds its largest sum."""
    values = np.full(2 * MIB + 7, fill, np.uint8)
    lo = 0 if fill <= NARROW_SPAN else fill - NARROW_SPAN
    assert NarrowBytes().moments(values, lo, fill) == wide_moments(values)
    values[::3] = lo
    assert NarrowBytes().moments(values, lo, fill) == wide_moments(values)


def test_narrow_bytes_refuse_what_they_cannot_sum():
    with pytest.raises(ValueError):
        NarrowBytes().moments(np.zeros(MIB, np.uint8), 0, 16)
    with pytest.raises(ValueError):
        NarrowBytes().moments(np.zeros(MIB, np.uint16), 0, 15)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("size", [2 * MIB + 1000, 3 * MIB + 3, 5 * MIB - 1])
def test_moments_and_range_block_by_block_equal_a_wide_sum(dtype, size):
    """Blocks of every kind in one array: a narrow one at the top of the type, a wide
    one (summed the ordinary way), narrow ones lower down, a short last block."""
    rng = np.random.default_rng(size)
    info = np.iinfo(dtype)
    values = (rng.integers(0, NARROW_SPAN + 1, size) + info.min + 40).astype(dtype)
    values[:MIB] = rng.integers(info.max - NARROW_SPAN, info.max + 1, MIB)  # narrow, high
    values[MIB:MIB + 1000] = rng.integers(info.min, info.max + 1, 1000)     # wide
    lo, hi = int(values.min()), int(values.max())
    narrow = NarrowBytes()
    calls = []
    real = narrow.moments
    narrow.moments = lambda block, b_lo, b_hi: calls.append(b_lo) or real(block, b_lo, b_hi)
    assert narrow.moments_and_range(values) == (*wide_moments(values), lo, hi)
    assert calls[0] >= info.max - NARROW_SPAN and len(calls) == size // MIB - 1


def test_moments_and_range_refuse_what_they_cannot_sum():
    with pytest.raises(ValueError):
        NarrowBytes().moments_and_range(np.zeros(MIB, np.uint16))
    with pytest.raises(ValueError):
        NarrowBytes().moments_and_range(np.zeros(0, np.uint8))


def test_the_accumulator_across_frames_of_one_byte_counts():
    """Whole-movie and per-frame figures of one-byte frames (narrow, wide, negative) as
    the float64 reference gives them."""
    rng = np.random.default_rng(23)
    frames = [np.minimum(rng.poisson(1.0, (1024, 1100)), 15).astype(np.int8),
              rng.integers(-128, 128, (1024, 1100)).astype(np.int8),
              (rng.integers(0, 10, (1024, 1100)) - 60).astype(np.int8)]
    acc = StatsAccumulator()
    for frame in frames:
        got = acc.add(frame)
        wide = frame.astype(np.float64)
        assert (got.dmin, got.dmax) == (wide.min(), wide.max())
        assert got.mean == pytest.approx(wide.mean(), rel=1e-14)
        assert got.std == pytest.approx(wide.std(), rel=1e-12)
    every = np.stack(frames).astype(np.float64)
    total = acc.result()
    assert (total.dmin, total.dmax) == (every.min(), every.max())
    assert total.dmean == pytest.approx(every.mean(), rel=1e-14)
    assert total.rms == pytest.approx(every.std(), rel=1e-12)


def test_the_accumulator_takes_the_narrow_path_with_the_same_figures():
    """A K3-sized 4-bit frame and a frame spanning 16 values (the ordinary path) give
    the statistics the exact integer path gives."""
    rng = np.random.default_rng(19)
    counts = np.minimum(rng.poisson(1.0, (4092, 5760)), 15).astype(np.uint8)
    wide = counts.astype(np.float64)
    got = StatsAccumulator().add(counts)
    assert got.mean == pytest.approx(wide.mean(), rel=1e-15)
    assert got.std == pytest.approx(wide.std(), rel=1e-12)
    s, q = exact_int_moments(counts.reshape(-1), 0, 15)
    assert (s, q) == wide_moments(counts)
    assert NarrowBytes().moments(counts.reshape(-1), 0, 15) == (s, q)


@pytest.mark.parametrize("nan_frame", [0, 1, 2])
def test_a_nan_in_any_frame_makes_the_movies_extremes_nan(nan_frame):
    """As numpy's min and max over the whole movie: NaN wherever it is. (Python's min()
    and max() keep their first argument against a NaN, so a NaN in a later frame was
    lost.)"""
    movie = np.arange(3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16)
    movie[nan_frame, 3, 3] = np.nan
    acc = StatsAccumulator()
    for frame in movie:
        acc.add(frame)
    result = acc.result()
    assert np.isnan(movie.min()) and np.isnan(result.dmin) and np.isnan(result.dmax)
    assert result.to_dict() == {"dmin": None, "dmax": None, "dmean": None, "rms": None}
